"""Whole-J top-8 on a long input, end to end, where a dense reference is out of reach
(materializing J at N = 4096 would take ~1 h here): jaxlin `spectral.top_k` (defaults)
against the published algorithm (`_baseline.whole_j`, forward recomputed per product) at
K = 48, the depth that gave equal accuracy at N = 64 and 256 (`whole_j_topk.py`).

Accuracy without a reference: jaxlin's triplets carry rigorous residual bounds b_i
(some singular value lies within b_i of σ_i); the baseline's σ are compared with
jaxlin's, so |σ_base − σ_true| ≤ |σ_base − σ_jaxlin| + b_i. One call each, compile
included (compile is 2–5 s at every N measured).

    taskset -c 1 python benchmarks/whole_j_long.py [--n 4096] [--quick]
"""

from __future__ import annotations

import argparse

import _baseline
import _common as C
import jax
import numpy as np

from jaxlin import spectral
from jaxlin.jacobian import linearize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 32, K = 16: smoke run")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k-baseline", type=int, default=48)
    args = parser.parse_args()
    n, depth = (32, 16) if args.quick else (args.n, args.k_baseline)
    k = 8
    model = C.load_model()
    config, params = model.config, model.params
    x = C.embeddings(model, n)

    seconds, result = C.timed_call(lambda: spectral.top_k(linearize(params, x, config), k))
    jaxlin_bound = result.bounds / result.S
    worst = jaxlin_bound.max()
    print(f"N={n}: jaxlin top_k {seconds:.1f} s, depth {result.depth}, max rel bound {worst:.2e}")
    print(f"  σ = {np.array2string(result.S, precision=5)}", flush=True)

    key = jax.random.key(0)  # jaxlin's seed-0 start vector
    base_seconds, (_, s_base, _) = C.timed_call(lambda: _baseline.whole_j(params, x, key, config, depth, k))
    s_base = np.asarray(s_base, np.float64)
    difference = np.abs(s_base - result.S) / result.S
    row = {
        "N": n,
        "jaxlin_s": seconds,
        "jaxlin_depth": result.depth,
        "jaxlin_max_rel_bound": float(jaxlin_bound.max()),
        "baseline_K": depth,
        "baseline_s": base_seconds,
        "max_rel_sigma_difference": float(difference.max()),
        "baseline_max_rel_error_bound": float((difference + jaxlin_bound).max()),
        "speedup": base_seconds / seconds,
    }
    print(C.table([row], list(row)))
    name = "whole_j_long" + ("_quick" if args.quick else f"_N{n}")
    C.save(name, {"k": k, "rows": [row], "sigma": result.S})


if __name__ == "__main__":
    main()
