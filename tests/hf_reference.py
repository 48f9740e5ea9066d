"""Hugging Face reference models for testing the JAX ports.

Two pieces:

* ``make_tiny_model`` writes a tiny, randomly initialised Hugging Face checkpoint
  (``config.json`` + ``model.safetensors``, float32) for one of the supported
  decoder families.  Every parameter is re-drawn from a seeded NumPy generator so
  the weights are deterministic and *non-trivial*: HF's own init leaves norm
  weights at 1 (Llama/Qwen) or 0 (Gemma's ``1 + w``) and uses std 0.02, which
  makes attention almost uniform and activations almost linear, so many port
  bugs (wrong norm offset, wrong scaling, swapped gate/up, ...) would be
  invisible.

* ``hf_forward`` runs the HF PyTorch model (eager attention) and returns the
  final-norm hidden states and logits.  ``dtype="exact_float64"`` runs it inside
  ``exact_float64_mode()``, which removes HF's internal float32 upcasts so the
  whole computation is float64 and can be compared with a float64 port at the
  ~1e-14 level instead of the ~1e-7 level.

Float32 casts neutralised by ``exact_float64_mode`` (transformers 5.23):

* ``LlamaRMSNorm`` / ``Qwen3RMSNorm``: ``hidden_states.to(torch.float32)``.
* ``Gemma3RMSNorm``: ``x.float()`` and ``self.weight.float()``.
* ``eager_attention_forward`` (all three): ``softmax(..., dtype=torch.float32)``.
* Rotary embeddings ``forward`` (all three): ``position_ids[..., None].float()``
  and ``inv_freq.to(dtype=torch.float)``.
* ``compute_default_rope_parameters`` (all three) and
  ``modeling_rope_utils._compute_llama3_parameters``: ``torch.arange(...,
  dtype=torch.float)`` / ``.to(dtype=torch.float)``, i.e. ``inv_freq`` itself is
  computed (and rounded) in float32; the model is built (``from_config``, whose
  constructor and ``_init_weights`` both compute it) inside the context.
* ``Gemma3TextScaledWordEmbedding.embed_scale``: ``torch.tensor(python_float)``
  takes the default dtype, so the default dtype is float64 during construction.

The same patch covers the extra families (``EXTRA_FAMILIES``), whose casts are
spelled the same way: the RMSNorms (``Mistral``/``Qwen2``/``Olmo2``/``Phi3``:
``.to(torch.float32)``; ``Gemma2``: ``.float()``), the eager softmax
(``dtype=torch.float32``), the rotary ``forward``s and default ``inv_freq``
(``torch.float``; Olmo2's rotary even returns float32 cos/sin that are then
mixed into float64 q/k), ``Gemma2TextScaledWordEmbedding.embed_scale``, and in
``modeling_rope_utils``: yarn's ``torch.arange(..., dtype=torch.float32)`` ramp
and ``.to(dtype=torch.float)``, longrope's ``torch.tensor(factors,
dtype=torch.float32)`` and ``.float()``, and dynamic NTK's ``.to(dtype=torch.float)``
(its base, regrown in the forward from the input length, is a tensor of the default
dtype, float64 inside the mode).  Longrope builds its long-factor
``inv_freq`` lazily in the first *forward* with a sequence longer than
``original_max_position_embeddings`` (a plain attribute, not a buffer), which is
why the model must also run inside the mode.  GPT-2's default eager path has no
float32 cast at all (its softmax runs in the input dtype); only its optional
``reorder_and_upcast_attn`` path allocates ``torch.float32`` scores and calls
``.float()``, and the patch reaches those too.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

Family = Literal[
    "gemma3",
    "llama",
    "llama3_rope",
    "qwen3",
    "mistral",
    "qwen2",
    "qwen2_yarn",
    "gemma2",
    "olmo2",
    "phi3",
    "phi3_partial",
    "phi3_longrope",
    "gpt2",
]
RefDType = Literal["float32", "float64", "exact_float64"]

# The original four families (the ones jaxlin ports).  Kept as is because other
# tests may parametrize over it and expect a JAX port for each entry.
FAMILIES: tuple[str, ...] = ("gemma3", "llama", "llama3_rope", "qwen3")
# Reference-only families, for ports still to come.
EXTRA_FAMILIES: tuple[str, ...] = (
    "mistral",
    "qwen2",
    "qwen2_yarn",
    "gemma2",
    "olmo2",
    "phi3",
    "phi3_partial",
    "phi3_longrope",
    "gpt2",
)
# Everything ``make_tiny_model`` accepts.
ALL_FAMILIES: tuple[str, ...] = FAMILIES + EXTRA_FAMILIES
REF_DTYPES: tuple[str, ...] = ("float32", "float64", "exact_float64")

# Std of the linear layers.  With hidden 64 and unit-RMS normalised inputs this
# gives pre-activations of std ~1.2 (silu/gelu well inside their nonlinear
# range) and attention logits of std ~1-2 (softmax far from uniform).
LINEAR_STD = 0.15
# Std of the random part of norm weights: Llama/Qwen use ``w`` (so 1 + N(0, s)),
# Gemma uses ``1 + w`` (so w ~ N(0, s)).  Non-trivial so a port that drops the
# weight, or gets Gemma's ``+1`` wrong, fails.
NORM_STD = 0.1
# Mean gain of the per-head q/k norms (Qwen3, Gemma3).  Those norms fix |q| and
# |k|, so with gain 1 and head_dim 16 the attention logits have std ~1 and the
# softmax is close to uniform; trained checkpoints have gains well above 1.
# (Olmo2's full-width q/k norms get the same gain.)
QK_NORM_GAIN = 1.6
# Std of GPT-2's learned position embeddings: half the token embeddings' std,
# so positions visibly shift the residual stream without drowning the tokens.
POSITION_EMBEDDING_STD = 0.5

# Families whose RMSNorm stores w for a gain of (1 + w) and whose embeddings are
# multiplied by sqrt(hidden_size).
_GEMMA_FAMILIES = ("gemma2", "gemma3")

_COMMON: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Per-family default config fields.  Rope thetas are small (and differ between
# families / layer types) so that, over test sequences of a few dozen tokens,
# every rotary frequency pair turns appreciably and a wrong theta shows up.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        **_COMMON,
        "num_hidden_layers": 2,
        "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100.0},
    },
    # Llama 3.1/3.2-style rope scaling.  With head_dim 16 and theta 1e4 the
    # wavelengths are 6.3, 19.9, 62.8, ... so, with original context 32 and
    # low/high freq factors 1/4 (wavelength thresholds 32 and 8), the
    # high-frequency (unchanged), medium (smoothed) and low-frequency (divided
    # by ``factor``) branches of the llama3 formula are all exercised.
    "llama3_rope": {
        **_COMMON,
        "num_hidden_layers": 2,
        "max_position_embeddings": 256,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    },
    "qwen3": {
        **_COMMON,
        "num_hidden_layers": 2,
        "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "default", "rope_theta": 200.0},
        "use_sliding_window": False,
    },
    "gemma3": {
        **_COMMON,
        "num_hidden_layers": 4,
        "max_position_embeddings": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        # Deliberately != head_dim (16): a port that scales by head_dim**-0.5
        # instead of query_pre_attn_scalar**-0.5 fails.
        "query_pre_attn_scalar": 24,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 20.0},
            "full_attention": {"rope_type": "default", "rope_theta": 100.0},
        },
        # Gemma 3 ships with tied embeddings.
        "tie_word_embeddings": True,
    },
    # Mistral (v0.1 style): MistralModel in transformers 5.23 builds one mask
    # from config.sliding_window, so the window applies to *every* layer.  6 <
    # the ~20-token test inputs, so it really cuts.  (Overriding layer_types
    # changes the class: AutoConfig reads a "mistral" config.json that has
    # layer_types as "ministral", whose layers follow layer_types.)
    "mistral": {
        **_COMMON,
        "num_hidden_layers": 2,
        "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "default", "rope_theta": 50.0},
        "sliding_window": 6,
    },
    # Qwen2 / Qwen2.5: q/k/v projections always carry biases (o_proj does not).
    "qwen2": {
        **_COMMON,
        "num_hidden_layers": 2,
        "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "default", "rope_theta": 150.0},
        "use_sliding_window": False,
    },
    # Qwen2.5 long-context style YaRN.  HF computes yarn frequencies once, at
    # init, independent of the input length, so inputs shorter than
    # original_max_position_embeddings are affected too.  With theta 20 the
    # correction range is dims [0, 3): the frequency ramp has pure-extrapolation,
    # blended and pure-interpolation (divided by factor) pairs.  cos/sin are
    # scaled by 0.1 ln(4) + 1.  max_position_embeddings = factor * original
    # keeps HF's consistency check quiet.
    "qwen2_yarn": {
        **_COMMON,
        "num_hidden_layers": 2,
        "max_position_embeddings": 64,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 20.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        "use_sliding_window": False,
        "tie_word_embeddings": True,
    },
    # Gemma 2: sandwich norms like Gemma 3 but no q/k norms, one rope for all
    # layers, and attention-logit softcapping that HF *does* apply in eager
    # attention (unlike Gemma 3).  layer_types is left to HF's default,
    # alternating sliding/full starting with sliding (also for overridden depths).
    "gemma2": {
        **_COMMON,
        "num_hidden_layers": 4,
        "max_position_embeddings": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        # != head_dim (16), and small: Gemma 2 has no q/k norms, so with
        # 16**-0.5 the softcapped attention would be nearly uniform.  8 gives
        # scaled logits of std ~2.
        "query_pre_attn_scalar": 8,
        "sliding_window": 6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 60.0},
        # Both caps bite: removing the attention cap changes the final hidden
        # states by ~50% (max-norm); raw logits have std ~1 and reach ~3.9.
        "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 3.0,
        "tie_word_embeddings": True,
    },
    # OLMo 2: no pre-norms; RMSNorm on each sub-block's *output* before the
    # residual add, and q/k RMSNorms over the full projection width (all heads
    # at once, before the head split).
    "olmo2": {
        **_COMMON,
        "num_hidden_layers": 2,
        "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "default", "rope_theta": 80.0},
    },
    # Phi-3: fused qkv_proj ([q | k | v] rows) and gate_up_proj ([gate | up] rows).
    # sliding_window stays None (HF's default); when set (Phi-3-mini-4k ships
    # 2047) it applies to every layer, as in Mistral.
    "phi3": {
        **_COMMON,
        "num_hidden_layers": 2,
        "max_position_embeddings": 256,
        "original_max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "default", "rope_theta": 120.0},
    },
    # Phi-4-mini style partial rotary: only the first half of each head
    # (8 of 16 dims) is rotated, with frequencies over the rotary width.
    "phi3_partial": {
        **_COMMON,
        "num_hidden_layers": 2,
        "max_position_embeddings": 256,
        "original_max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "default", "rope_theta": 120.0, "partial_rotary_factor": 0.5},
    },
    # Phi-3.5-mini / Phi-3-128k style longrope.  As in the real configs there is
    # no "factor": HF uses max_position_embeddings / original (= 4) for the
    # cos/sin attention factor sqrt(1 + ln 4 / ln 16).  HF switches the whole
    # sequence to long_factor once max(position_ids) + 1 > 16.  Phi-3 keeps its
    # own top-level original_max_position_embeddings, which takes precedence
    # over the one in rope_parameters, so both are set.
    "phi3_longrope": {
        **_COMMON,
        "num_hidden_layers": 2,
        "max_position_embeddings": 64,
        "original_max_position_embeddings": 16,
        "rope_parameters": {
            "rope_type": "longrope",
            "rope_theta": 100.0,
            "short_factor": [1.0, 1.0, 1.05, 1.1, 1.2, 1.4, 1.7, 2.0],
            "long_factor": [1.0, 1.2, 1.6, 2.2, 3.0, 4.0, 5.5, 7.0],
        },
    },
    # GPT-2: learned positions, pre-LayerNorm (with bias) blocks, Conv1D
    # weights stored (in, out), biases everywhere, fused c_attn, gelu_new MLP
    # of width n_inner = None -> 4 * n_embd (as in every real GPT-2 config),
    # lm_head tied to wte.
    "gpt2": {
        "vocab_size": 128,
        "n_embd": 64,
        "n_head": 4,
        "n_layer": 2,
        "n_positions": 64,
        "activation_function": "gelu_new",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": True,
    },
}

_CLASSES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "llama3_rope": (LlamaConfig, LlamaForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen2_yarn": (Qwen2Config, Qwen2ForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
    "phi3_partial": (Phi3Config, Phi3ForCausalLM),
    "phi3_longrope": (Phi3Config, Phi3ForCausalLM),
    "gpt2": (GPT2Config, GPT2LMHeadModel),
}


def _gemma_layer_types(num_layers: int) -> list[str]:
    # Gemma 3's real pattern is 5 sliding : 1 full; for a tiny model use every
    # third layer full so both kinds appear for any num_layers >= 3.
    return ["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(num_layers)]


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    """The HF config ``make_tiny_model`` would use (defaults + ``overrides``)."""
    if family not in _DEFAULTS:
        raise ValueError(f"unknown family {family!r}; expected one of {ALL_FAMILIES}")
    fields = {**_DEFAULTS[family], **overrides}
    if family == "gemma3" and "num_hidden_layers" in overrides and "layer_types" not in overrides:
        # Keep layer_types consistent with an overridden depth.
        fields["layer_types"] = _gemma_layer_types(fields["num_hidden_layers"])
    if family in ("qwen3", "qwen2", "qwen2_yarn") and "max_window_layers" not in fields:
        # HF's default (28) would silently make every tiny layer full attention
        # even with use_sliding_window=True; slide from layer 1 on instead so a
        # qwen2/qwen3 sliding model mixes both layer types.
        fields["max_window_layers"] = 1
    config_cls, _ = _CLASSES[family]
    return config_cls(**fields)


def _randomize_(model: PreTrainedModel, family: str, seed: int) -> None:
    """Overwrite every parameter in place with seeded random values."""
    rng = np.random.default_rng(seed)
    hidden = model.config.hidden_size
    # named_parameters() yields each tensor once, so tied lm_head/embedding
    # weights are drawn once and stay tied.  Sorting makes the draw order
    # independent of module registration order.
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        shape = tuple(param.shape)
        if name.endswith("norm.weight"):
            gain = QK_NORM_GAIN if name.endswith(("q_norm.weight", "k_norm.weight")) else 1.0
            # Gemma stores w for an effective gain of (1 + w).
            offset = gain - 1.0 if family in _GEMMA_FAMILIES else gain
            value = offset + rng.normal(0.0, NORM_STD, size=shape)
        elif _is_gpt2_layer_norm(name):
            # GPT-2's LayerNorms (ln_1, ln_2, ln_f): gain 1 + N(0, s) and a
            # random bias, so a port that drops either fails.
            offset = 1.0 if name.endswith(".weight") else 0.0
            value = offset + rng.normal(0.0, NORM_STD, size=shape)
        elif name.endswith(("embed_tokens.weight", "wte.weight")):
            # Aim for a unit-RMS residual stream at layer 0: Gemma multiplies
            # embeddings by sqrt(hidden), the others do not.
            std = hidden**-0.5 if family in _GEMMA_FAMILIES else 1.0
            value = rng.normal(0.0, std, size=shape)
        elif name.endswith("wpe.weight"):
            value = rng.normal(0.0, POSITION_EMBEDDING_STD, size=shape)
        elif name.endswith(".bias") or (name.endswith(".weight") and param.ndim == 2):
            # Linear (and GPT-2 Conv1D) layers and all their biases (Qwen2's
            # q/k/v, GPT-2's everywhere, or any a config enables).
            value = rng.normal(0.0, LINEAR_STD, size=shape)
        else:  # pragma: no cover - guards against new parameter kinds
            raise AssertionError(f"no init rule for parameter {name} {shape}")
        with torch.no_grad():
            param.copy_(torch.from_numpy(value.astype(np.float32)))


def _is_gpt2_layer_norm(name: str) -> bool:
    # transformer.h.{i}.ln_1 / ln_2 and transformer.ln_f (weight and bias).
    return name.rsplit(".", 2)[-2].startswith("ln_")


def make_tiny_model(family: str, directory: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Build, randomise and save a tiny HF causal LM of ``family``; return ``directory``.

    ``family`` is one of ``ALL_FAMILIES``; ``overrides`` are HF config fields (e.g.
    ``tie_word_embeddings``, ``num_key_value_heads``, ``sliding_window``,
    ``layer_types``, ``attn_logit_softcapping``, ``final_logit_softcapping``,
    ``use_sliding_window``/``max_window_layers`` for qwen2/qwen3, ``head_dim``,
    ``rope_parameters``; GPT-2 takes its own names: ``n_embd``, ``n_layer``, ...).
    Weights are float32 and a deterministic function of ``(family, overrides, seed)``.
    """
    directory = Path(directory)
    config = tiny_config(family, **overrides)
    _, model_cls = _CLASSES[family]
    model = model_cls(config).to(torch.float32)
    _randomize_(model, family, seed)
    # transformers 5 always saves safetensors (the old safe_serialization flag
    # is gone), as model.safetensors for a single shard.
    model.save_pretrained(directory)
    if not (directory / "model.safetensors").is_file():  # pragma: no cover
        raise RuntimeError(f"save_pretrained did not write {directory / 'model.safetensors'}")
    return directory


@contextlib.contextmanager
def exact_float64_mode() -> Iterator[None]:
    """Make "float32" mean float64 inside HF modelling code.

    HF upcasts to float32 in RMSNorm, softmax and RoPE, and computes ``inv_freq``
    in float32; in a float64 model those casts *round* to float32 and leave
    ~1e-7 relative error.  The casts are spelled ``torch.float32``,
    ``torch.float`` or ``Tensor.float()`` and looked up at call time, so
    rebinding those names makes every such cast a float64 cast.  The default
    dtype is float64 as well so tensors built from Python floats (Gemma's
    ``embed_scale``) are float64.  Models must be *constructed* inside the
    context (their float32 buffers are computed at init) and *run* inside it.
    Do not read checkpoints inside it: safetensors resolves "F32" to
    ``torch.float32`` at call time and would misread float32 data as float64
    (``load_hf_model`` reads weights first, then builds the model in here).

    Everything is restored on exit, including on exceptions.  This mutates the
    global ``torch`` module: not thread-safe, test use only.
    """
    saved_default = torch.get_default_dtype()
    saved_float32 = torch.float32
    saved_float = torch.float
    # Tensor.float is inherited from the C base class; remember whether the
    # Python subclass had its own attribute so restoring leaves no trace.
    had_own_float = "float" in vars(torch.Tensor)
    saved_tensor_float = vars(torch.Tensor).get("float")
    try:
        torch.set_default_dtype(torch.float64)
        torch.float32 = torch.float64  # type: ignore[misc]
        torch.float = torch.float64  # type: ignore[misc]
        torch.Tensor.float = torch.Tensor.double  # type: ignore[method-assign]
        yield
    finally:
        if had_own_float:
            torch.Tensor.float = saved_tensor_float  # type: ignore[method-assign]
        elif "float" in vars(torch.Tensor):
            del torch.Tensor.float
        torch.float = saved_float  # type: ignore[misc]
        torch.float32 = saved_float32  # type: ignore[misc]
        torch.set_default_dtype(saved_default)


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype == "float32":
        return torch.float32
    if dtype in ("float64", "exact_float64"):
        return torch.float64
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {REF_DTYPES}")


def _load(model_dir: Path, dtype: str) -> PreTrainedModel:
    """Stock HF loading: ``from_pretrained`` in the requested dtype."""
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=_torch_dtype(dtype), attn_implementation="eager", local_files_only=True
    )
    return model.eval()


def _load_exact(model_dir: Path) -> PreTrainedModel:
    """Build the model inside ``exact_float64_mode`` and load the saved weights.

    ``from_pretrained`` cannot run inside the mode: its safetensors reader
    resolves "F32" to ``torch.float32`` at call time and then misreads the
    bytes as float64.  So config and weights are read here, with torch
    untouched, and only construction (which computes the float32-prone buffers
    ``inv_freq`` and ``embed_scale``) happens inside the mode.  Must be called
    *outside* the mode; the caller then runs the model inside its own
    ``exact_float64_mode`` (the buffers are already float64 by then).
    """
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    state = {k: v.to(torch.float64) for k, v in load_file(model_dir / "model.safetensors").items()}
    with exact_float64_mode():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float64, attn_implementation="eager")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Only tied weights (lm_head -> embed_tokens) may be absent from the file;
    # they share storage with their source, which load_state_dict did fill.
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"exact_float64 load: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings and model.lm_head.weight is not model.get_input_embeddings().weight:
        raise RuntimeError("exact_float64 load: lm_head is not tied to the input embedding")
    return model.eval()


def _check_all_float64(model: PreTrainedModel) -> None:
    # Defensive: if a future transformers computes a buffer outside our reach
    # (or from_pretrained keeps something in fp32), fail loudly rather than
    # silently comparing against a half-float32 reference.
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.dtype != torch.float64:
            raise RuntimeError(f"exact_float64: {name} is {tensor.dtype}, expected float64")


@contextlib.contextmanager
def load_hf_model(model_dir: Path, dtype: str) -> Iterator[PreTrainedModel]:
    """Load the saved model (eager attention) for running in ``dtype``.

    A context manager because an ``"exact_float64"`` model must also be *run*
    inside ``exact_float64_mode()`` (the softmax/RMSNorm/RoPE casts happen at
    call time); the body of the ``with`` executes inside that mode and under
    ``torch.no_grad()``.
    """
    model_dir = Path(model_dir)
    if dtype == "exact_float64":
        model = _load_exact(model_dir)
        _check_all_float64(model)
        mode: contextlib.AbstractContextManager[None] = exact_float64_mode()
    else:
        model = _load(model_dir, dtype)
        mode = contextlib.nullcontext()
    with mode, torch.no_grad():
        yield model


def _final_norm(model: PreTrainedModel) -> torch.nn.Module:
    # GPT-2 keeps its decoder in .transformer with a final LayerNorm ln_f; the
    # Llama-style families keep it in .model with a final RMSNorm norm.
    if isinstance(model, GPT2LMHeadModel):
        return model.transformer.ln_f
    return model.model.norm


def hf_forward(model_dir: Path, token_ids: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """Run the HF model on one sequence of ``token_ids`` (shape ``(N,)``).

    Returns float64 arrays ``{"last_hidden_state": (N, d), "logits": (N, vocab)}``;
    ``last_hidden_state`` is the output of the final norm (the lm_head input;
    GPT-2's ``ln_f``), ``logits`` include Gemma's final softcapping if configured.
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    input_ids = torch.from_numpy(ids.astype(np.int64))[None, :]
    with load_hf_model(model_dir, dtype) as model:
        captured: list[torch.Tensor] = []
        # HF's outputs.hidden_states[-1] is not reliably post-norm across
        # versions; hooking the final norm gives exactly the lm_head input.
        hook = _final_norm(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            out = model(input_ids=input_ids, use_cache=False)
        finally:
            hook.remove()
        (hidden,) = captured
        return {
            "last_hidden_state": hidden[0].double().numpy(),
            "logits": out.logits[0].double().numpy(),
        }


def read_config(model_dir: Path) -> dict[str, Any]:
    """The saved ``config.json`` as a dict (convenience for ports and tests)."""
    return json.loads((Path(model_dir) / "config.json").read_text())


def gguf_model(path: Path) -> PreTrainedModel:
    """Hugging Face's own float32 model from a GGUF file (its loader dequantizes it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def hidden_and_logits(model: PreTrainedModel, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Final hidden states (N, d) and the last token's logits, in float64."""
    with torch.no_grad():
        hidden = model.model(torch.as_tensor(ids)[None]).last_hidden_state
        logits = model.lm_head(hidden[:, -1])
    return hidden[0].double().numpy(), logits[0].double().numpy()
