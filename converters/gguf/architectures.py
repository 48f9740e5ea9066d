"""Which family reads which llama.cpp architecture: each family file names its GGUF
architecture and conventions (`Family.gguf`); this is the lookup over them."""

from __future__ import annotations

from converters.gguf.reader import GGUFError, GGUFFile
from jaxlin.families import FAMILIES, Family
from jaxlin.families._base import GGUFNames

# general.architecture → the family whose GGUF names it carries.
GGUF_FAMILIES: dict[str, Family] = {
    family.gguf.architecture: family for family in FAMILIES if family.gguf is not None
}
SUPPORTED_GGUF_ARCHITECTURES: tuple[str, ...] = tuple(sorted(GGUF_FAMILIES))


def gguf_family(file: GGUFFile) -> Family:
    """The family of the file's general.architecture; GGUFError for an unsupported one
    (naming the supported ones) or for one shard of a split model."""
    architecture = file.value("general.architecture")
    if architecture not in GGUF_FAMILIES:
        raise GGUFError(
            f"{file.path}: GGUF architecture {architecture!r} (general.architecture) is not "
            f"supported; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    # A model split by llama-gguf-split keeps most tensors in the other shards.
    split_count = file.value("split.count", default=1)
    if split_count != 1:
        raise GGUFError(
            f"{file.path}: one shard of a {split_count}-way split GGUF (split.count); "
            "merge the shards first (llama-gguf-split --merge)"
        )
    return GGUF_FAMILIES[architecture]


def gguf_names(file: GGUFFile) -> GGUFNames:
    """How llama.cpp's converter wrote the file's family (`gguf_family(file).gguf`)."""
    names = gguf_family(file).gguf
    assert names is not None  # GGUF_FAMILIES holds only families with GGUF names
    return names
