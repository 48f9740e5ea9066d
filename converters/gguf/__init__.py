"""GGUF checkpoints (llama.cpp) as Hugging Face configs, Hugging Face–named, HF-laid-out
numpy state dicts and tokenizers, so that the rest of jaxlin only knows HF checkpoints.

One stage, four modules sharing one parsed file (`read_gguf` once per load; every
function below takes the `GGUFFile` or a path):
- `reader`: the binary header, metadata and tensor index (`GGUFFile`);
- `config`: metadata → HF config (transformers' GGUF_CONFIG_MAPPING, rebuilt without torch);
- `tensors`: tensor data → dequantized HF-named arrays (or, `keep_quantized`, quantized
  matrices kept as `jaxlin.quantized.QuantizedArray`s decoded by `quantized`);
- `tokenizer`: transformers' GGUF tokenizer builders, without torch.
What differs per architecture (llama.cpp's tensor names, metadata keys, conventions) is
data on the family, beside its HF tensor table (`Family.gguf` in jaxlin/families/).
Architectures: gemma2, gemma3, gpt2, llama, olmo2, phi3, qwen2, qwen3. Mistral has no GGUF
architecture of its own (gguf 0.19 knows only "mistral3"/"mistral4"): llama.cpp writes
Mistral 7B as "llama", read as such.

Nothing is unpickled and torch is never needed. Tests check config, tensors and
tokenizer against transformers' own GGUF loader.
"""

from converters.gguf.architectures import GGUF_FAMILIES, SUPPORTED_GGUF_ARCHITECTURES
from converters.gguf.config import read_gguf_config
from converters.gguf.reader import GGUFError, GGUFFile, GGUFFileNotFoundError, GGUFTensor, read_gguf
from converters.gguf.tensors import read_gguf_state_dict
from converters.gguf.tokenizer import load_gguf_tokenizer

__all__ = [
    "GGUF_FAMILIES",
    "SUPPORTED_GGUF_ARCHITECTURES",
    "GGUFError",
    "GGUFFile",
    "GGUFFileNotFoundError",
    "GGUFTensor",
    "load_gguf_tokenizer",
    "read_gguf",
    "read_gguf_config",
    "read_gguf_state_dict",
]
