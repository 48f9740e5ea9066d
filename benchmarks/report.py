"""Print the markdown tables of benchmarks/README.md from benchmarks/results/*.json.

python benchmarks/report.py
"""

from __future__ import annotations

import json
from typing import Any

import _common as C


def load(name: str) -> dict[str, Any] | None:
    path = C.RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def operator_cost() -> None:
    data = load("operator_cost")
    if not data:
        return
    rows = []
    for r in data["rows"]:
        rows.append({
            "N": r["N"],
            "attention": "chunked 256" if r["attention_chunk"] and r["N"] > 256 else "dense",
            "forward (s)": r["forward_s"],
            "plain dense forward (s)": r["plain_forward_s"],
            "linearize T(0) (s)": r["linearize_s"],
            "J·v (s)": r["jv_per_product_s"],
            "J·v / fwd": r["jv_ratio_to_forward"],
            "Jᵀ·u (s)": r["jtu_per_product_s"],
            "Jᵀ·u / fwd": r["jtu_ratio_to_forward"],
            "slope J·v / fwd": r["jv_slope_ratio_to_forward"],
            "slope Jᵀ·u / fwd": r["jtu_slope_ratio_to_forward"],
            "≤ 1.5×": r["target_met"],
        })  # fmt: skip
    print("### operator_cost\n")
    print(C.table(rows, list(rows[0])))


def whole_j() -> None:
    data = load("whole_j_topk")
    if not data:
        return
    print("\n### whole_j_topk\n")
    print(C.table(data["rows"], list(data["rows"][0])))
    for d in data["details"]:
        tried = ", ".join(f"K={t['K']}: {t['max_rel_sigma_error']:.2e}" for t in d["baseline_tried"])
        print(f"\nN={d['N']}: target error {d['target_error']:.2e}; baseline errors {tried}")


def all_token() -> None:
    data = load("all_token_topk")
    if not data:
        return
    print("\n### all_token_topk\n")
    cols = ["method", "tokens_timed", "median_s", "compile_s", "max_rel_sigma_error"]
    cols.append("speedup_vs_jaxlin_exact")
    print(C.table(data["rows"], cols))
    print(f"\nbaseline prefix errors (tokens {data['baseline_tokens']}): {data['baseline_prefix_errors']}")
    print(f"target error {data['target_error']:.2e}, equal-accuracy K = {data['baseline_k_equal_accuracy']}")


def memory() -> None:
    data = load("memory_scaling")
    if not data:
        return
    print("\n### memory_scaling\n")
    rows = sorted(data["rows"], key=lambda r: (r["impl"], r["N"]))
    for r in rows:
        if "peak_bytes" in r:
            r["baseline_gb"] = r["baseline_bytes"] / 1e9
            r["estimate_gb"] = r["estimate_bytes"] / 1e9
    cols = ["impl", "N", "peak_gb", "baseline_gb", "over_baseline_gb", "bytes_per_token", "estimate_gb"]
    cols += ["compile_s", "run_s", "skipped"]
    print(C.table(rows, cols))
    print("\n```json\n" + json.dumps(data["summary"], indent=2) + "\n```")


if __name__ == "__main__":
    operator_cost()
    whole_j()
    all_token()
    memory()
