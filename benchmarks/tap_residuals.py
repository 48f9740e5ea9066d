"""What a layer tap's detached Jacobian holds and what its products cost, with the tap
taken under `jax.checkpoint` (as jaxlin does, `model.tap_values`) against the same
program without it (as before: the layer `cond`'s linearization returns every layer's
weights as fresh residuals). Gemma 3 270M, float32, real weights; one process, the two
variants side by side. The tap's `jax.checkpoint` (the one call given a `policy`) is
bypassed for the "copying" variant while that variant is traced; the attention's and
the dequantization's own checkpoints stay (the compile caches are cleared between
variants).

Per tap: J's own residual bytes (its leaves that are not the caller's params), the time
of `batch` Jᵀ·u and of `batch` J·v (the fastest of `repeats`, the two variants timed in
turn so that a busy machine slows both alike), and the largest relative difference of
the two variants' products (the same map).

    taskset -c 1 python benchmarks/tap_residuals.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

import _common as C
import jax
import numpy as np

from jaxlin.jacobian import DetachedJacobian, linearize
from jaxlin.model import Tap


@contextlib.contextmanager
def without_checkpoint() -> Iterator[None]:
    original = jax.checkpoint
    jax.checkpoint = lambda fn, **kw: fn if "policy" in kw else original(fn, **kw)  # ty: ignore
    jax.clear_caches()
    try:
        yield
    finally:
        jax.checkpoint = original
        jax.clear_caches()


def own_bytes(jacobian: DetachedJacobian, params: Any) -> int:
    own = {leaf.unsafe_buffer_pointer() for leaf in jax.tree_util.tree_leaves(params)}
    leaves = jax.tree_util.tree_leaves(jacobian.linear)
    return sum(leaf.nbytes for leaf in leaves if leaf.unsafe_buffer_pointer() not in own)


def prepare(model: Any, x: jax.Array, tap: Tap | None, batch: int) -> dict[str, Any]:
    """J, its products compiled, and their results (for the comparison)."""
    jacobian = jax.block_until_ready(linearize(model.params, x, model.config, tap=tap))
    us = jax.random.normal(jax.random.key(0), (batch, x.shape[1]), x.dtype)
    vs = jax.random.normal(jax.random.key(1), (batch, *x.shape), x.dtype)
    pull = jax.jit(lambda j, u: jax.vmap(j.rmatvec)(u))
    push = jax.jit(lambda j, v: jax.vmap(j.matvec)(v))
    return {
        "own_bytes": own_bytes(jacobian, model.params),
        "rmatvec": lambda: pull(jacobian, us),
        "matvec": lambda: push(jacobian, vs),
        "products": (np.asarray(pull(jacobian, us)), np.asarray(push(jacobian, vs))),
    }


def fastest(variants: dict[str, dict[str, Any]], product: str, repeats: int) -> dict[str, float]:
    """The fastest of `repeats` calls of each variant's `product`, the variants in turn."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, variant in variants.items():
            times[name].append(C.timed(variant[product]))
    return {name: min(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 64 only, fewer repeats")
    args = parser.parse_args()
    model = C.load_model()
    last = model.config.num_layers - 1
    lengths = [64] if args.quick else [64, 512]
    batch, repeats = 8, (2 if args.quick else 5)
    taps = {
        "whole J": None,
        f"residual @ {last}": Tap(last, "residual"),
        "mlp @ 8": Tap(8, "mlp"),
        "mlp @ 8 (local)": Tap(8, "mlp", local=True),
    }
    rows = []
    for n in lengths:
        x = C.embeddings(model, n)
        for name, tap in taps.items():
            referring = prepare(model, x, tap, batch)
            with without_checkpoint():
                copying = prepare(model, x, tap, batch)
            variants = {"copying": copying, "referring": referring}
            rmatvec, matvec = fastest(variants, "rmatvec", repeats), fastest(variants, "matvec", repeats)
            difference = max(
                float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
                for a, b in zip(referring["products"], copying["products"], strict=True)
            )
            rows.append(
                {
                    "N": n,
                    "tap": name,
                    "own_MB_copying": copying["own_bytes"] / 1e6,
                    "own_MB_referring": referring["own_bytes"] / 1e6,
                    "rmatvec_s_copying": rmatvec["copying"],
                    "rmatvec_s_referring": rmatvec["referring"],
                    "matvec_s_copying": matvec["copying"],
                    "matvec_s_referring": matvec["referring"],
                    "max_relative_difference": difference,
                }
            )
            print(rows[-1], flush=True)
    C.report("tap_residuals", rows, args.quick, batch=batch, repeats=repeats, dtype="float32")


if __name__ == "__main__":
    main()
