"""Cost of one J·v and one Jᵀ·u of the detached Jacobian after linearization, against
one plain forward pass (Gemma 3 270M, float32).

Inside one jit: linearize once, then apply m products sequentially (`lax.scan` over m
random vectors, accumulating the results so nothing is dead code). Per-product cost =
(T(m) − T(0)) / m with T(0) = the same program with m = 0 (linearize alone; XLA then
keeps only the primal forward, since no product consumes the residuals). The slope
(T(m) − T(m/2)) / (m/2) is reported too: it excludes the one-off residual work.

    taskset -c 1 python benchmarks/operator_cost.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import _common as C
import jax
import jax.numpy as jnp

from jaxlin._policy import FreezePolicy
from jaxlin.jacobian import linearize, target_function

TARGET_RATIO = 1.5


def make_programs(config: Any, chunk: int | None) -> dict[str, Any]:
    @jax.jit
    def forward(params: Any, x: jax.Array) -> jax.Array:
        return target_function(config, params, FreezePolicy.DETACHED, chunk)(x)

    @jax.jit
    def plain_forward(params: Any, x: jax.Array) -> jax.Array:
        return target_function(config, params, FreezePolicy.DETACHED, None)(x)

    @jax.jit
    def jv(params: Any, x: jax.Array, vs: jax.Array) -> tuple[jax.Array, jax.Array]:
        op = linearize(params, x, config, attention_chunk=chunk)

        def step(acc: jax.Array, v: jax.Array) -> tuple[jax.Array, None]:
            return acc + op.matvec(v), None

        acc, _ = jax.lax.scan(step, jnp.zeros_like(op.output), vs)
        return op.output, acc

    @jax.jit
    def jtu(params: Any, x: jax.Array, us: jax.Array) -> tuple[jax.Array, jax.Array]:
        op = linearize(params, x, config, attention_chunk=chunk)

        def step(acc: jax.Array, u: jax.Array) -> tuple[jax.Array, None]:
            return acc + op.rmatvec(u), None

        acc, _ = jax.lax.scan(step, jnp.zeros_like(x), us)
        return op.output, acc

    return {"forward": forward, "plain_forward": plain_forward, "jv": jv, "jtu": jtu}


def run_size(model: Any, n: int, chunk: int | None, ms: tuple[int, int], repeats: int) -> dict[str, Any]:
    config, params = model.config, model.params
    x = C.embeddings(model, n)
    d = config.hidden_size
    progs = make_programs(config, chunk)
    key = jax.random.key(0)
    m_half, m = ms
    row: dict[str, Any] = {"N": n, "attention_chunk": chunk, "m": m, "m_half": m_half, "repeats": repeats}

    fwd = C.time_repeats(functools.partial(progs["forward"], params, x), repeats)
    row["forward_s"] = fwd["median_s"]
    row["forward_first_call_s"] = fwd["first_call_s"]
    if chunk is not None and n > chunk:
        plain = C.time_repeats(functools.partial(progs["plain_forward"], params, x), repeats)
        row["plain_forward_s"] = plain["median_s"]
    else:
        row["plain_forward_s"] = row["forward_s"]
    reference = min(row["forward_s"], row["plain_forward_s"])
    print(
        f"N={n} chunk={chunk}: forward {row['forward_s']:.3f} s (plain dense {row['plain_forward_s']:.3f} s)"
    )

    for name, shape in (("jv", (n, d)), ("jtu", (d,))):
        times = {}
        for count in (0, m_half, m):
            vecs = jax.random.normal(jax.random.fold_in(key, count), (count, *shape), jnp.float32)
            res = C.time_repeats(functools.partial(progs[name], params, x, vecs), repeats)
            times[count] = res["median_s"]
            row[f"{name}_T{count}_s"] = res["median_s"]
            row[f"{name}_T{count}_first_call_s"] = res["first_call_s"]
            print(f"  {name} m={count}: {res['median_s']:.3f} s (first call {res['first_call_s']:.1f} s)")
        per = (times[m] - times[0]) / m
        slope = (times[m] - times[m_half]) / (m - m_half)
        row[f"{name}_per_product_s"] = per
        row[f"{name}_slope_s"] = slope
        row[f"{name}_ratio_to_forward"] = per / reference
        row[f"{name}_slope_ratio_to_forward"] = slope / reference
    row["linearize_s"] = row["jv_T0_s"]
    row["target_met"] = bool(
        row["jv_ratio_to_forward"] <= TARGET_RATIO and row["jtu_ratio_to_forward"] <= TARGET_RATIO
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--naive", action="store_true", help="also time attention_chunk=None at N > 256")
    args = parser.parse_args()

    model = C.load_model()
    if args.quick:
        plan = [(32, 256, (1, 2))]
        repeats = 1
    else:
        sizes = args.sizes or [256, 1024]
        plan = [(n, 256, (4, 8)) for n in sizes]
        if args.naive:
            plan += [(n, None, (4, 8)) for n in sizes if n > 256]
        repeats = args.repeats
    rows = [run_size(model, n, chunk, ms, repeats) for n, chunk, ms in plan]
    columns = [
        "N", "attention_chunk", "forward_s", "plain_forward_s", "linearize_s",
        "jv_per_product_s", "jv_ratio_to_forward", "jtu_per_product_s", "jtu_ratio_to_forward",
        "jv_slope_ratio_to_forward", "jtu_slope_ratio_to_forward", "target_met",
    ]  # fmt: skip
    print(C.table(rows, columns))
    C.save("operator_cost" + ("_quick" if args.quick else ""), {"target_ratio": TARGET_RATIO, "rows": rows})


if __name__ == "__main__":
    main()
