"""Cost of one Lanczos step on J·Jᵀ against the input length N: jaxlin (the products of
one linearization, chunked attention) vs the published algorithm (a fresh `jax.vjp`
then `jax.jvp` of the full detached forward, dense attention, at every step: each
recomputes the forward, see `_baseline._afresh`), and vs the same code with XLA free to
hoist the loop-invariant forward (a stronger baseline than the published one).

Both run inside one jit as a `lax.scan` of m steps, each feeding the previous result
back (so no step is dead code or loop-invariant): jaxlin's per-step cost is
(T(2) − T(0))/2 with T(0) = the linearization alone; the baseline's is T(2) − T(1)
(its first step's one-off work is excluded, in its favour). A whole-J top-k run is
depth × this, so the ratio is the speed-up at equal Krylov depth — i.e. at equal
accuracy, since both build the same Krylov space from the same start vector.

    taskset -c 1 python benchmarks/lanczos_step.py [--quick] [--sizes 256 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import _common as C
import jax
import jax.numpy as jnp
from _baseline import gram_product

from jaxlin.jacobian import linearize
from jaxlin.spectral import widened


def steps_jaxlin(config: Any, params: Any, x: jax.Array, vectors: jax.Array, m: int) -> jax.Array:
    op = linearize(params, x, config)
    matvec, rmatvec, _ = widened(op)

    def body(carry: jax.Array, u: jax.Array) -> tuple[jax.Array, None]:
        return carry + matvec(rmatvec(u + 1e-3 * carry)), None

    return jax.lax.scan(body, jnp.zeros_like(op.output), vectors[:m])[0] + op.output


def steps_baseline(
    config: Any, params: Any, x: jax.Array, vectors: jax.Array, m: int, recompute: bool
) -> jax.Array:
    gram = gram_product(config, params, x, recompute)

    def body(carry: jax.Array, u: jax.Array) -> tuple[jax.Array, None]:
        return carry + gram(u + 1e-3 * carry), None

    return jax.lax.scan(body, jnp.zeros(vectors.shape[1], x.dtype), vectors[:m])[0]


def per_step(fn: Any, low: int, high: int, repeats: int) -> dict[str, Any]:
    times = {}
    for m in (low, high):
        call = functools.partial(fn, m)
        times[m] = C.time_repeats(call, repeats)["median_s"]
    return {"T": times, "per_step_s": (times[high] - times[low]) / (high - low)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 32, smoke run")
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    model = C.load_model()
    config, params = model.config, model.params
    sizes = [32] if args.quick else args.sizes
    vectors = jax.random.normal(jax.random.key(0), (2, config.hidden_size), jnp.float32)
    jaxlin_fn = jax.jit(functools.partial(steps_jaxlin, config), static_argnames="m")
    baseline_fn = jax.jit(functools.partial(steps_baseline, config), static_argnames=("m", "recompute"))
    rows = []
    repeats = args.repeats
    for n in sizes:
        x = C.embeddings(model, n)
        ours = per_step(lambda m, x=x: jaxlin_fn(params, x, vectors, m=m), 0, 2, repeats)
        base, hoisted = (
            per_step(lambda m, x=x, r=r: baseline_fn(params, x, vectors, m=m, recompute=r), 1, 2, repeats)
            for r in (True, False)
        )
        row = {
            "N": n,
            "jaxlin_step_s": ours["per_step_s"],
            "jaxlin_linearize_s": ours["T"][0],
            "baseline_step_s": base["per_step_s"],
            "speedup_per_step": base["per_step_s"] / ours["per_step_s"],
            "baseline_xla_hoisted_step_s": hoisted["per_step_s"],
            "speedup_vs_xla_hoisted": hoisted["per_step_s"] / ours["per_step_s"],
        }
        print(row, flush=True)
        rows.append(row)
    C.report("lanczos_step", rows, args.quick)


if __name__ == "__main__":
    main()
