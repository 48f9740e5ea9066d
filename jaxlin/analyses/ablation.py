"""Token ablation, linear against real: how far the equivalent linear map predicts what
the model does when a token is dropped.

For every input token t:
- linear: the detached map's prediction without t's contribution, y − c_t (the bias
  term stays), read through the unembedding;
- removed: the model's own forward on the text with token t deleted (a shorter input,
  re-embedded, so positions shift as they would in the text);
- zeroed: the model's own forward with t's input row set to zero (positions kept; for
  learned absolute positions the row is token + position embedding, both zeroed).
Each gives the change of the predicted token's logit and the new top token. The
Spearman rank correlation of the linear changes with each real one says how well the
linear map ranks the tokens' counterfactual effect.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlin import model as model_fns
from jaxlin._config import ModelConfig
from jaxlin.analyses.base import Analysis, Context
from jaxlin.analyses.certificate import CertificateResult
from jaxlin.devices import map_in_batches
from jaxlin.distributed import to_host
from jaxlin.jacobian import DetachedJacobian
from jaxlin.memory import product_bytes
from jaxlin.model import Params
from jaxlin.plan import Abstracts, ProgramMemory, nbytes, program_memory
from jaxlin.run_config import AnalysisSection
from jaxlin.tokens import token_text


@dataclasses.dataclass(frozen=True)
class Ablation:
    """Per token (N,): the change of the predicted token's logit and the top token after
    the edit, for the linear prediction and the two real edits."""

    predicted_token_id: int
    linear_change: np.ndarray
    linear_top: np.ndarray
    removed_change: np.ndarray
    removed_top: np.ndarray
    zeroed_change: np.ndarray
    zeroed_top: np.ndarray

    @property
    def spearman_removed(self) -> float | None:
        return spearman(self.linear_change, self.removed_change)

    @property
    def spearman_zeroed(self) -> float | None:
        return spearman(self.linear_change, self.zeroed_change)


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None below 3 points or when
    either side is constant."""
    if len(a) < 3:
        return None
    ranks = [_average_ranks(np.asarray(x, np.float64)) for x in (a, b)]
    if any(np.ptp(r) == 0 for r in ranks):
        return None
    return float(np.corrcoef(*ranks)[0, 1])


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):  # ties share the mean of their ranks
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _read(config: ModelConfig, params: Params, hidden: jax.Array, token: jax.Array) -> tuple[jax.Array, ...]:
    """The predicted token's logit and the top token for one final hidden state."""
    logits = model_fns.logits(config, params, hidden)
    return logits[token], jnp.argmax(logits)


@functools.partial(jax.jit, static_argnames=("config", "chunk"))
def _ablate(
    params: Params,
    ids: jax.Array,
    hidden: jax.Array,
    contributions: jax.Array,
    token: jax.Array,
    config: ModelConfig,
    chunk: int | None,
) -> tuple[jax.Array, ...]:
    inputs = model_fns.embed(config, params, ids)
    n = ids.shape[0]
    base, _ = _read(config, params, hidden, token)

    def linear(t: jax.Array) -> tuple[jax.Array, ...]:
        return _read(config, params, hidden - contributions[t].astype(hidden.dtype), token)

    def removed(t: jax.Array) -> tuple[jax.Array, ...]:
        keep = jnp.arange(n - 1)
        shorter = model_fns.embed(config, params, ids[keep + (keep >= t)])
        return _read(config, params, model_fns.final_hidden(config, params, shorter)[-1], token)

    def zeroed(t: jax.Array) -> tuple[jax.Array, ...]:
        edited = inputs * (jnp.arange(n) != t)[:, None].astype(inputs.dtype)
        return _read(config, params, model_fns.final_hidden(config, params, edited)[-1], token)

    tokens = jnp.arange(n)
    out = []
    for edit in (linear, removed, zeroed):
        logit, top = map_in_batches(edit, tokens, chunk)
        out += [logit - base, top]
    return tuple(out)


def ablate(
    config: ModelConfig,
    params: Params,
    ids: np.ndarray,
    hidden: jax.Array,
    contributions: jax.Array,
    chunk: int | None = 16,
) -> Ablation:
    """Every token's ablation (see the module docstring). `hidden` is y, the final hidden
    state of the last token; `contributions` the c_t (N, d) of the detached map."""
    if len(ids) < 2:
        raise ValueError("token ablation needs at least two tokens")
    token = int(jnp.argmax(model_fns.logits(config, params, hidden)))
    chunk = None if chunk is None or chunk >= len(ids) else chunk
    arrays = _ablate(params, jnp.asarray(ids), hidden, contributions, jnp.asarray(token), config, chunk)
    linear, linear_top, removed, removed_top, zeroed, zeroed_top = to_host(arrays)
    return Ablation(token, linear, linear_top, removed, removed_top, zeroed, zeroed_top)


def summary(result: Ablation, decode: Any, tokens: list[str]) -> dict[str, Any]:
    """The run record's "ablation" section: one row per token and the rank correlations.
    `decode(id)` gives a token's text."""
    rows = [
        {
            "position": t,
            "token": tokens[t],
            "linear_logit_change": float(result.linear_change[t]),
            "linear_top_token": decode(int(result.linear_top[t])),
            "removed_logit_change": float(result.removed_change[t]),
            "removed_top_token": decode(int(result.removed_top[t])),
            "zeroed_logit_change": float(result.zeroed_change[t]),
            "zeroed_top_token": decode(int(result.zeroed_top[t])),
        }
        for t in range(len(tokens))
    ]
    predicted = result.predicted_token_id
    flips = {
        kind: (np.asarray(top) != predicted)
        for kind, top in (
            ("linear", result.linear_top),
            ("removed", result.removed_top),
            ("zeroed", result.zeroed_top),
        )
    }
    return {
        "predicted_token": decode(predicted),
        "spearman_linear_vs_removed": result.spearman_removed,
        "spearman_linear_vs_zeroed": result.spearman_zeroed,
        # How often the linear map's "does the prediction change?" agrees with the model's.
        "top_change_agreement_removed": float(np.mean(flips["linear"] == flips["removed"])),
        "top_change_agreement_zeroed": float(np.mean(flips["linear"] == flips["zeroed"])),
        "rows": rows,
    }


@dataclasses.dataclass(frozen=True, eq=False)
class AblationResult:
    ablation: Ablation
    record: dict[str, Any]  # the run record's "ablation" section (see `summary`)

    def summary_entries(self) -> dict[str, Any]:
        return {"ablation": self.record}

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "ablation_linear": self.ablation.linear_change,
            "ablation_removed": self.ablation.removed_change,
            "ablation_zeroed": self.ablation.zeroed_change,
        }


def enabled(options: AnalysisSection, n: int) -> bool:
    return options.ablation and n > 1


def edits_at_once(options: AnalysisSection, n: int) -> int | None:
    """How many edited inputs go through the model together (None: all n)."""
    chunk = min(options.chunk, 16)
    return None if chunk >= n else chunk


def program_bytes(config: ModelConfig, n: int, dtype: Any, options: AnalysisSection) -> int:
    """Conservative: `edits_at_once` forwards at a time, each with dense attention
    (`model.final_hidden`): the widest activations and every head's N × N probabilities."""
    edits = edits_at_once(options, n) or n
    wide = jnp.dtype(jnp.promote_types(dtype, jnp.float32)).itemsize
    probabilities = edits * n * n * config.num_heads * wide
    return product_bytes(config, n, dtype, edits, None) + probabilities + n * config.hidden_size * wide


def programs(options: AnalysisSection, planned: Abstracts) -> Iterator[ProgramMemory]:
    """The one program of `ablate`: 2·N forwards on edited inputs, `edits_at_once` at a
    time, while the input's J and the certificate's contributions c (N, d) are held."""
    assert planned.jacobian is not None
    n, d = planned.inputs.shape
    ids = planned.replicated((n,), jnp.int32)
    contributions = planned.replicated((n, d), planned.jacobian.dtype)
    hidden, token = planned.jacobian.output, planned.replicated((), jnp.int32)
    chunk = edits_at_once(options, n)
    lowered = _ablate.lower(planned.params, ids, hidden, contributions, token, planned.config, chunk)
    yield program_memory("ablation: edited forwards", lowered, planned.held + nbytes(contributions))


def run(jacobian: DetachedJacobian, context: Context) -> AblationResult:
    n = len(context.ids)
    tokenizer = context.tokenizer
    with context.timer.step(f"token ablation, linear vs real ({n} tokens, {2 * n} forwards)"):
        contributions = context.earlier(CertificateResult).contributions
        ablated = ablate(
            context.config,
            context.params,
            context.ids,
            jacobian.output,
            contributions,
            edits_at_once(context.options, n),
        )
        record = summary(ablated, lambda i: tokenizer.decode([i]), token_text(tokenizer, context.ids))
    return AblationResult(ablated, record)


ANALYSIS = Analysis("ablation", run, enabled=enabled, programs=programs, program_bytes=program_bytes)
