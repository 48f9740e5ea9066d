"""Where a jaxlin Lanczos step on J·Jᵀ spends its time: the share of the 3 global
(full-causal) attention layers of Gemma 3 270M, measured by making them sliding
(window 512) and timing the step again (`lanczos_step.steps_jaxlin`, same timing rule).

The two ideas left for long inputs act on attention only — skipping causally masked
key blocks in global layers, storing the banded probabilities of sliding layers instead
of recomputing them per product — so this share bounds what they could gain.

    taskset -c 1 python benchmarks/attention_share.py [--quick] [--sizes 2048 4096]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import _common as C
import jax
import jax.numpy as jnp
from lanczos_step import per_step, steps_jaxlin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 32, smoke run")
    parser.add_argument("--sizes", type=int, nargs="*", default=[2048, 4096])
    args = parser.parse_args()
    model = C.load_model()
    config, params = model.config, model.params
    all_sliding = dataclasses.replace(config, sliding_layers=(True,) * config.num_layers)
    vectors = jax.random.normal(jax.random.key(0), (2, config.hidden_size), jnp.float32)
    rows = []
    for n in [32] if args.quick else args.sizes:
        x = C.embeddings(model, n)
        steps = {}
        for name, cfg in (("real", config), ("all_sliding", all_sliding)):
            fn = jax.jit(functools.partial(steps_jaxlin, cfg), static_argnames="m")
            steps[name] = per_step(lambda m, fn=fn, x=x: fn(params, x, vectors, m=m), 0, 2, 1)["per_step_s"]
        row = {
            "N": n,
            "global_layers": config.num_layers - sum(config.layer_is_sliding),
            "step_s": steps["real"],
            "step_all_sliding_s": steps["all_sliding"],
            "global_attention_share": 1 - steps["all_sliding"] / steps["real"],
        }
        print(row, flush=True)
        rows.append(row)
    C.report("attention_share", rows, args.quick)


if __name__ == "__main__":
    main()
