"""The default run's work: products through the operator and wall time of the analysis
of `configs/default.yaml` (certificate, ordinary comparison, whole-J top-8, every
token's top-4 exact, focus block) on the 9-token default text and on a long text.

Run it against two checkouts to compare code versions: the same script, one process
each. Products come from the run's own `summary.json["products"]` where the code counts
them; for code that does not (before the DetachedJacobian), they are derived from its
code path and the run's Lanczos depth (see `derived_products`).

    taskset -c 1 python benchmarks/default_run.py --tokens 9 800
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import _common as C

DEFAULT_TEXT = "The bridge out of Marin is the Golden"


def long_text(tokenizer: Any, n: int) -> str:
    """C.TEXT repeated, cut to the longest whole-word prefix of at most n − 1 tokens
    (the BOS makes n)."""
    words = (C.TEXT * (n // 50 + 2)).split(" ")
    low, high = 1, len(words)
    while low < high:  # the most words whose tokens fit
        mid = (low + high + 1) // 2
        if len(tokenizer.encode(" ".join(words[:mid]), add_special_tokens=False)) <= n - 1:
            low = mid
        else:
            high = mid - 1
    return " ".join(words[:low])


def derived_products(summary: dict[str, Any], d: int, k: int) -> dict[str, int]:
    """The products of the code before the DetachedJacobian (one linearization per
    analysis): contributions N, ordinary N, each Lanczos attempt 2·depth + 2k (depths
    grown ×1.5 from 48 to the reported one), exact per-token d, the focus block d, its
    ordinary twin d."""
    n = summary["n_tokens"]
    depths, depth = [], max(3 * k + 24, 48)
    while True:
        depths.append(min(depth, d))
        if depths[-1] >= summary["spectrum"]["krylov_depth"]:
            break
        depth = depth + max(depth // 2, 1)
    ordinary = summary["ordinary_jacobian_relative_error"] is not None  # N ≤ 512, dense attention
    lanczos = sum(depths) + k * len(depths)
    # Contributions: N forward products when N ≤ d, else d transposed ones.
    by_tokens, by_rows = (n, 0) if n <= d else (0, d)
    return {
        "linearizations": 3 + len(depths) + 2 * ordinary,
        "matvecs": (by_tokens + d) * (1 + ordinary) + lanczos,
        "rmatvecs": by_rows * (1 + ordinary) + lanczos + d,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[9, 800], help="9 = the default text")
    parser.add_argument("--label", default=None, help="name of this code version in the results")
    parser.add_argument("--quick", action="store_true", help="the 9-token text only")
    args = parser.parse_args()
    sizes = [9] if args.quick else args.tokens

    from jaxlin.loading import load_model
    from jaxlin.run_config import AnalysisSection
    from jaxlin.runner import analyse

    loaded = load_model("embedded", None, "float32", progress=False)
    options = AnalysisSection()
    d = loaded.model.config.hidden_size
    rows: list[dict[str, Any]] = []
    for n in sizes:
        text = DEFAULT_TEXT if n == 9 else long_text(loaded.tokenizer, n)
        start = time.perf_counter()
        summary = analyse(loaded, text, options).summary
        seconds = time.perf_counter() - start
        counted = "products" in summary
        products = summary["products"] if counted else derived_products(summary, d, options.top_k)
        rows.append({
            "code": args.label or Path(__file__).resolve().parents[1].name,
            "N": summary["n_tokens"],
            "seconds": seconds,
            "linearizations": products["linearizations"],
            "matvecs": products["matvecs"],
            "rmatvecs": products["rmatvecs"],
            "products": products["matvecs"] + products["rmatvecs"],
            "counted": "by the run" if counted else "derived from the code path",
            "spectrum": summary["spectrum"]["method"],
            "sigma_1": summary["singular_values"][0],
            "certificate": summary["reconstruction_relative_error"],
            "per_token_sigma_max": max(row[0] for row in summary["per_token"]["singular_values"]),
            "steps": summary["timings_seconds"],
        })  # fmt: skip
        print({key: value for key, value in rows[-1].items() if key != "steps"}, flush=True)
    C.report(f"default_run_{rows[0]['code']}", rows, args.quick)


if __name__ == "__main__":
    main()
