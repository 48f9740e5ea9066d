"""Steering with the detached Jacobian of a concept prompt.

J_S = ∂h_ℓ(last concept token)/∂X_S, the cumulative detached Jacobian of the residual
stream after layer ℓ for the concept prompt S (T_S tokens, blocks J_S[:, k, :]). While
greedily generating from a new prompt, the running sum s_i = Σ_{k≤i} J_S[:, k mod T_S, :]·e_k
of the new sequence's embeddings e_k is added to its layer-ℓ hidden states, rescaled to
λ/2·‖h_i‖ (the published rule). Variant "singular": add the concept Jacobian's top left
singular direction instead, with the same scale. λ = 0 is plain greedy decoding.

Generation runs on a fixed-length buffer (prompt + new tokens) so one compiled step
serves every position and every λ; causality makes the unused tail irrelevant.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlin import operator
from jaxlin._config import ModelConfig
from jaxlin._modules import Transformer
from jaxlin.analyses.base import RunAnalysis
from jaxlin.errors import JaxlinError
from jaxlin.jacobian import DEFAULT_ATTENTION_CHUNK, linearize
from jaxlin.loading import LoadedModel
from jaxlin.memory import linearization_bytes, product_bytes
from jaxlin.model import Params, Tap, embed, layer_slice, module
from jaxlin.operator import rows
from jaxlin.plan import Abstracts, ProgramMemory, nbytes, program_memory
from jaxlin.run_config import RunConfig, SteeringSection
from jaxlin.tokens import tokenize

# Transposed products per batch when J_S's rows are computed.
CONCEPT_ROWS_CHUNK = 64


def concept_jacobian(config: ModelConfig, params: Params, concept_ids: np.ndarray, layer: int) -> jax.Array:
    """J_S as (T_S, d, d) blocks: block k maps concept token k's embedding to the
    residual stream after `layer` at the last concept token."""
    inputs = embed(config, params, jnp.asarray(concept_ids))
    tap = Tap(layer, "residual", final_norm=False)
    return concept_blocks(rows(linearize(params, inputs, config, tap=tap), chunk=CONCEPT_ROWS_CHUNK))


def concept_blocks(dense: jax.Array) -> jax.Array:
    """J_S's rows (d, T_S, d) as blocks (T_S, d, d)."""
    return jnp.moveaxis(dense, 1, 0)


def top_direction(blocks: jax.Array) -> jax.Array:
    """The top left singular vector of the whole J_S (d × T_S·d)."""
    d = blocks.shape[1]
    flat = jnp.moveaxis(blocks, 0, 1).reshape(d, -1)
    u, _, _ = jnp.linalg.svd(flat.astype(jnp.promote_types(flat.dtype, jnp.float32)), full_matrices=False)
    return u[:, 0]


def _steering_vectors(blocks: jax.Array, embeddings: jax.Array, mode: str, direction: jax.Array) -> jax.Array:
    """Unit steering direction per position (N, d)."""
    n = embeddings.shape[0]
    if mode == "singular":
        return jnp.broadcast_to(direction, (n, direction.shape[0]))
    picked = blocks[jnp.arange(n) % blocks.shape[0]]  # (N, d, d): J_S[:, k mod T_S, :]
    running = jnp.cumsum(jnp.einsum("kij,kj->ki", picked, embeddings), axis=0)
    norms = jnp.linalg.norm(running, axis=-1, keepdims=True)
    return running / jnp.maximum(norms, jnp.finfo(running.dtype).tiny)


@functools.partial(jax.jit, static_argnames=("config", "layer", "mode"))
def _next_token(
    params: Params,
    ids: jax.Array,
    position: jax.Array,
    strength: jax.Array,
    blocks: jax.Array,
    direction: jax.Array,
    config: ModelConfig,
    layer: int,
    mode: str,
) -> jax.Array:
    """Greedy next token after `position` (the last filled slot of the buffer `ids`)."""
    lower_config, lower = layer_slice(config, params, 0, layer + 1)
    lower_module = module(lower_config, lower)
    embeddings = lower_module.apply({"params": lower}, ids, method=Transformer.embed)
    h = lower_module.apply({"params": lower}, embeddings, method=Transformer.scale_embeddings)
    h, _ = lower_module.apply({"params": lower}, h, method=Transformer.blocks)
    unit = _steering_vectors(blocks, embeddings, mode, direction).astype(h.dtype)
    h = h + (strength / 2) * jnp.linalg.norm(h, axis=-1, keepdims=True) * unit
    if layer + 1 < config.num_layers:
        upper_config, upper = layer_slice(config, params, layer + 1, config.num_layers)
        h, _ = module(upper_config, upper).apply({"params": upper}, h, method=Transformer.blocks)
    top = module(config, params)
    hidden = top.apply({"params": params}, h, method=Transformer.normalize)
    last = jax.lax.dynamic_index_in_dim(hidden, position, keepdims=False)
    return jnp.argmax(top.apply({"params": params}, last, method=Transformer.logits))


@dataclasses.dataclass(frozen=True)
class SteeringSetup:
    layer: int
    mode: str
    blocks: jax.Array
    direction: jax.Array


def steering_layer(config: ModelConfig, layer: int | None) -> int:
    """The layer steered: the configured one, by default the one two thirds deep."""
    return round(2 * config.num_layers / 3) - 1 if layer is None else layer


def prepare(
    config: ModelConfig, params: Params, concept_ids: np.ndarray, layer: int | None, mode: str
) -> SteeringSetup:
    if mode not in ("jacobian", "singular"):
        raise ValueError(f"steering mode {mode!r} is not one of jacobian, singular")
    layer = steering_layer(config, layer)
    if not 0 <= layer < config.num_layers:
        raise ValueError(f"steering layer {layer} is outside 0..{config.num_layers - 1}")
    blocks = concept_jacobian(config, params, concept_ids, layer)
    return SteeringSetup(layer, mode, blocks, top_direction(blocks))


def generate(
    config: ModelConfig,
    params: Params,
    prompt_ids: np.ndarray,
    max_new_tokens: int,
    strength: float,
    setup: SteeringSetup,
    stop_ids: tuple[int, ...] = (),
) -> list[int]:
    """Greedy continuation of `prompt_ids` with steering strength λ = `strength`."""
    length = len(prompt_ids) + max_new_tokens
    buffer = np.zeros(length, dtype=np.int32)
    buffer[: len(prompt_ids)] = prompt_ids
    generated: list[int] = []
    dtype = params["embedder"]["embedding"].dtype
    for position in range(len(prompt_ids) - 1, length - 1):
        token = int(
            _next_token(
                params,
                jnp.asarray(buffer),
                jnp.asarray(position),
                jnp.asarray(strength, dtype),
                setup.blocks,
                setup.direction,
                config,
                setup.layer,
                setup.mode,
            )
        )
        buffer[position + 1] = token
        generated.append(token)
        if token in stop_ids:
            break
    return generated


@dataclasses.dataclass(frozen=True, eq=False)
class SteeringResult:
    concept: str
    prompt: str
    layer: int
    mode: str
    runs: list[dict[str, Any]]  # per strength λ (0 first): the continuation's text and ids

    def summary_entries(self) -> dict[str, Any]:
        return {
            "steering": {
                "concept": self.concept,
                "prompt": self.prompt,
                "layer": self.layer,
                "mode": self.mode,
                "baseline": self.runs[0]["text"],
                "runs": self.runs,
            }
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return {}


def steer(loaded: LoadedModel, section: SteeringSection, add_bos: bool | None) -> SteeringResult:
    """Baseline and steered greedy continuations, side by side (both prompts tokenized
    as the analysed text is)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    concept = tokenize(tokenizer, section.concept, add_bos)
    prompt = tokenize(tokenizer, section.prompt, add_bos)
    try:
        setup = prepare(model.config, model.params, concept, section.layer, section.mode)
    except ValueError as error:
        raise JaxlinError(f"steering: {error}") from None
    stop = tuple(i for i in (tokenizer.eos_token_id,) if i is not None)
    runs = []
    for strength in [0.0, *[x for x in section.lambdas if x != 0.0]]:
        tokens = generate(model.config, model.params, prompt, section.max_new_tokens, strength, setup, stop)
        runs.append({"lambda": strength, "text": tokenizer.decode(tokens), "token_ids": tokens})
    return SteeringResult(section.concept, section.prompt, setup.layer, section.mode, runs)


def enabled(config: RunConfig) -> bool:
    return config.steering.enabled


def program_bytes(config: RunConfig, model: ModelConfig, dtype: Any, tokens_of: Callable[[str], int]) -> int:
    """Conservative: the concept's linearization and its rows twice (J_S's rows, then
    moved into blocks), and one forward over the generation buffer with dense attention."""
    section = config.steering
    concept = tokens_of(section.concept)
    buffer = tokens_of(section.prompt) + section.max_new_tokens
    item = jnp.dtype(dtype).itemsize
    wide = jnp.dtype(jnp.promote_types(dtype, jnp.float32)).itemsize
    total = linearization_bytes(model, concept, dtype, DEFAULT_ATTENTION_CHUNK)
    batch = min(CONCEPT_ROWS_CHUNK, model.hidden_size)
    total += product_bytes(model, concept, dtype, batch, DEFAULT_ATTENTION_CHUNK)
    total += 2 * model.hidden_size * concept * model.hidden_size * item
    forward = product_bytes(model, buffer, dtype, 1, None) + buffer * buffer * model.num_heads * wide
    return total + forward


def programs(
    config: RunConfig, tokens_of: Callable[[str], int], planned: Abstracts
) -> Iterator[ProgramMemory]:
    """Its programs, with no input's J held (steering runs after the analyses of the
    inputs): J_S of the concept (T_S tokens), its rows moved into (T_S, d, d) blocks, the
    top direction, and the greedy step over the prompt + new tokens buffer."""
    section, model = config.steering, planned.config
    layer = steering_layer(model, section.layer)
    concept = planned.embeddings(tokens_of(section.concept))
    tap = Tap(layer, "residual", final_norm=False)
    program, jacobian, held = planned.linearization(
        concept, DEFAULT_ATTENTION_CHUNK, tap, name="steering: linearize"
    )
    yield program
    identity = jax.ShapeDtypeStruct((model.hidden_size,) * 2, jacobian.dtype)
    program, dense = planned.program(
        "steering: concept rows", operator._rows, jacobian, identity, CONCEPT_ROWS_CHUNK, held=held
    )
    yield program
    # J_S is dropped once its rows exist; they are moved into blocks, then only those stay.
    program, blocks = planned.program("steering: blocks", jax.jit(concept_blocks), dense, held=nbytes(dense))
    yield program
    program, direction = planned.program(
        "steering: direction", jax.jit(top_direction), blocks, held=nbytes(blocks)
    )
    yield program
    buffer = planned.replicated((tokens_of(section.prompt) + section.max_new_tokens,), jnp.int32)
    position = planned.replicated((), jnp.int32)
    strength = planned.replicated((), planned.dtype)
    lowered = _next_token.lower(
        planned.params, buffer, position, strength, blocks, direction, model, layer, section.mode
    )
    yield program_memory("steering: greedy step", lowered, nbytes((blocks, direction)))


def step(config: RunConfig) -> str:
    return f"steering ({len(config.steering.lambdas)} strengths)"


def run(loaded: LoadedModel, config: RunConfig) -> SteeringResult:
    return steer(loaded, config.steering, config.add_bos)


ANALYSIS = RunAnalysis("steering", run, enabled, step, program_bytes=program_bytes, programs=programs)
