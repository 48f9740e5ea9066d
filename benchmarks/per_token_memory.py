"""Peak resident memory and time of the exact all-token path (`spectral.per_token_top_k`
with the identity basis: every token Jacobian J_t, top-4 each) against N, one process per N.

Its floor is J itself, d·N·d numbers (the rows of the one batched transposed pass); the
per-token Gram matrices and eigenvectors are formed a group of tokens at a time
(`spectral.TOKEN_GROUP_BYTES`), not for all N tokens at once.

    taskset -c 1 python benchmarks/per_token_memory.py [--quick] [--sizes 1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import _common as C


def measure(n: int) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxlin import spectral
    from jaxlin.jacobian import linearize

    model = C.load_model()
    config, params = model.config, model.params
    x = C.embeddings(model, n)
    d = config.hidden_size
    before = C.current_rss_bytes()
    start = time.perf_counter()
    eye = jnp.eye(d, dtype=jnp.float32)
    sigma = jax.block_until_ready(spectral.per_token_top_k(linearize(params, x, config), eye, 4)[1])
    return {
        "N": n,
        "time_s": time.perf_counter() - start,  # incl. compile
        "peak_gb": C.peak_rss_bytes() / 1e9,
        "before_gb": before / 1e9,
        "over_model_gb": (C.peak_rss_bytes() - before) / 1e9,
        "jacobian_gb": d * n * d * 4 / 1e9,
        "last_token_sigma": sigma[-1].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 32, smoke run")
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child)))
        return
    rows = []
    for n in [32] if args.quick else args.sizes:
        # A fresh process per N: peak RSS is per process.
        child = [sys.executable, __file__, "--child", str(n)]
        out = subprocess.run(child, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(row, flush=True)
        rows.append(row)
    print(C.table(rows, [c for c in rows[0] if c != "last_token_sigma"]))
    C.save("per_token_memory" + ("_quick" if args.quick else ""), {"rows": rows})


if __name__ == "__main__":
    main()
