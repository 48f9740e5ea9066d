"""Top-8 singular triplets of the whole detached Jacobian J (d × N·d), equal accuracy:
jaxlin `spectral.top_k` (linearize once; Lanczos on J·Jᵀ grown until the residual
bounds meet the default float32 tolerance 1e-4) against the published JAX algorithm
(`_baseline.whole_j`: every J·Jᵀ product recomputes the forward with fresh
`jax.vjp` + `jax.jvp`, dense attention; also timed at the chosen K with XLA allowed to
hoist that forward out of the loop, a stronger baseline than the published one).

Reference: the dense J (`operator.rows`), its singular values from the eigen-
decomposition of J·Jᵀ in float64. Equal accuracy: the baseline gets the smallest K in
16, 24, 32, 48, 64, 96, 128 whose top-8 σ have a max relative error ≤ jaxlin's (if
jaxlin's error is below `--floor`, the floor is the target instead: both are then at
float32 rounding level).

    taskset -c 1 python benchmarks/whole_j_topk.py [--quick] [--sizes 256 64]
"""

from __future__ import annotations

import argparse
import functools
import json
from typing import Any

import _baseline
import _common as C
import jax
import numpy as np

from jaxlin import spectral
from jaxlin.jacobian import linearize
from jaxlin.operator import rows

K_CANDIDATES = (16, 24, 32, 48, 64, 96, 128)
TARGET_SPEEDUP = 4.0


def reference(model: Any, x: jax.Array, n: int, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(σ (k,), U (d, k)) of the dense J in float64, cached per N; and the time it took."""
    path = C.RESULTS / f".whole_j_reference_N{n}.npz"
    if path.exists():
        data = np.load(path)
        return data["s"][:k], data["u"][:, :k], float(data["seconds"])
    seconds, jac = C.timed_call(lambda: rows(linearize(model.params, x, model.config)))
    jac = np.asarray(jac, dtype=np.float64)
    flat = jac.reshape(jac.shape[0], -1)
    del jac
    lam, vecs = np.linalg.eigh(flat @ flat.T)
    del flat
    order = np.argsort(lam)[::-1]
    s = np.sqrt(np.maximum(lam[order], 0.0))
    u = vecs[:, order]
    np.savez(path, s=s, u=u, seconds=seconds)
    return s[:k], u[:, :k], seconds


def errors(s: np.ndarray, u: np.ndarray, s_ref: np.ndarray, u_ref: np.ndarray) -> dict[str, float]:
    """Max relative σ error over the k triplets, and max 1 − |cos| of the left vectors."""
    s = np.asarray(s, np.float64)
    rel = np.abs(s - s_ref) / s_ref
    cos = np.abs(np.sum(np.asarray(u, np.float64) * u_ref, axis=0))
    return {"max_rel_sigma_error": float(rel.max()), "max_left_vector_error": float(np.max(1.0 - cos))}


def run_size(model: Any, n: int, k: int, repeats: int, floor: float, candidates: tuple[int, ...]) -> dict:
    config, params = model.config, model.params
    x = C.embeddings(model, n)
    s_ref, u_ref, ref_seconds = reference(model, x, n, k)
    print(f"N={n}: reference σ (dense J, {ref_seconds:.1f} s): {np.array2string(s_ref, precision=5)}")
    out: dict[str, Any] = {"N": n, "k": k, "reference_sigma": s_ref, "reference_seconds": ref_seconds}

    run_jaxlin = lambda: spectral.top_k(linearize(params, x, config), k)  # noqa: E731
    timing = C.time_repeats(run_jaxlin, repeats)
    result = run_jaxlin()
    jl = {
        "median_s": timing["median_s"],
        "first_call_s": timing["first_call_s"],
        "compile_s": timing["first_call_s"] - timing["median_s"],
        "depth": result.depth,
        "converged": result.converged,
        "max_rel_bound": float(np.max(result.bounds / result.S)),
        **errors(result.S, result.U, s_ref, u_ref),
    }
    out["jaxlin"] = jl
    print(
        f"  jaxlin top_k: {jl['median_s']:.2f} s (compile {jl['compile_s']:.1f} s), depth {jl['depth']}, "
        f"max rel σ error {jl['max_rel_sigma_error']:.2e}"
    )

    target = max(jl["max_rel_sigma_error"], floor)
    out["target_error"] = target
    key = jax.random.key(0)  # the same start vector as jaxlin's seed 0
    tried = []
    chosen = None
    for num in candidates:
        fn = functools.partial(_baseline.whole_j, params, x, key, config, num, k)
        first = C.timed(fn)
        u, s, _ = fn()
        err = errors(np.asarray(s), np.asarray(u).T, s_ref, u_ref)
        row = {"K": num, "first_call_s": first, **err}
        tried.append(row)
        print(
            f"  baseline K={num}: first call {first:.2f} s, max rel σ error {err['max_rel_sigma_error']:.2e}"
        )
        if err["max_rel_sigma_error"] <= target:
            runs = [C.timed(fn) for _ in range(max(1, repeats - 1))]
            row["runs_s"] = runs
            row["median_s"] = float(np.median(runs))
            row["compile_s"] = first - row["median_s"]
            chosen = row
            break
    out["baseline_tried"] = tried
    out["baseline"] = chosen
    if chosen is not None:
        # The same K with XLA free to hoist the baseline's forward out of the loop (a
        # stronger baseline than the published algorithm; see _baseline's docstring).
        hoisted = functools.partial(_baseline.whole_j, params, x, key, config, chosen["K"], k, False)
        first = C.timed(hoisted)
        runs = [C.timed(hoisted) for _ in range(max(1, repeats - 1))]
        median = float(np.median(runs))
        out["baseline_xla_hoisted"] = {"K": chosen["K"], "first_call_s": first, "median_s": median}
        out["speedup_vs_xla_hoisted"] = out["baseline_xla_hoisted"]["median_s"] / jl["median_s"]
        print(
            f"  baseline K={chosen['K']} with XLA hoisting: {out['baseline_xla_hoisted']['median_s']:.2f} s "
            f"({out['speedup_vs_xla_hoisted']:.2f}x)"
        )
        out["speedup"] = chosen["median_s"] / jl["median_s"]
        out["speedup_incl_compile"] = chosen["first_call_s"] / jl["first_call_s"]
        out["target_met"] = out["speedup"] >= TARGET_SPEEDUP
        print(f"  speed-up {out['speedup']:.2f}x (with compile {out['speedup_incl_compile']:.2f}x)")
    else:
        out["target_met"] = None
        print("  baseline never reached jaxlin's accuracy within the K candidates")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, smoke run")
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--floor", type=float, default=1e-6, help="lowest error target (see docstring)")
    args = parser.parse_args()

    model = C.load_model()
    k = 8
    if args.quick:
        sizes, repeats, candidates = [16], 2, (16, 32)
    else:
        sizes, repeats, candidates = args.sizes, args.repeats, K_CANDIDATES
    results = [run_size(model, n, k, repeats, args.floor, candidates) for n in sizes]
    rows = []
    for r in results:
        base = r["baseline"] or {}
        rows.append({
            "N": r["N"],
            "jaxlin_s": r["jaxlin"]["median_s"],
            "jaxlin_compile_s": r["jaxlin"]["compile_s"],
            "jaxlin_depth": r["jaxlin"]["depth"],
            "jaxlin_err": r["jaxlin"]["max_rel_sigma_error"],
            "baseline_K": base.get("K"),
            "baseline_s": base.get("median_s"),
            "baseline_compile_s": base.get("compile_s"),
            "baseline_err": base.get("max_rel_sigma_error"),
            "speedup": r.get("speedup"),
            "baseline_xla_hoisted_s": (r.get("baseline_xla_hoisted") or {}).get("median_s"),
            "speedup_vs_xla_hoisted": r.get("speedup_vs_xla_hoisted"),
            "target_met": r.get("target_met"),
        })  # fmt: skip
    print(C.table(rows, list(rows[0])))
    name = "whole_j_topk" + ("_quick" if args.quick else "")
    previous = C.RESULTS / f"{name}.json"
    if previous.exists():  # merge with sizes measured by an earlier invocation
        old = json.loads(previous.read_text())
        rows = [r for r in old["rows"] if r["N"] not in sizes] + rows
        results = [r for r in old["details"] if r["N"] not in sizes] + results
    C.save(
        name,
        {"target_speedup": TARGET_SPEEDUP, "k": k, "floor": args.floor, "rows": rows, "details": results},
    )


if __name__ == "__main__":
    main()
