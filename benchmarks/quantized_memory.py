"""Memory of Gemma 3 270M (the embedded Q4_K_M GGUF) kept quantized against dequantized
to float32 at load: the params, the detached Jacobian J, and the peak resident memory of
a linearization plus a short Lanczos run.

Each (mode, N) runs in a fresh child process: load the model (`keep_quantized` or not),
record the params' bytes and the resident set after loading, release the freed heap,
reset the kernel's peak counter (`/proc/self/clear_refs`), then linearize at N real
tokens and run `spectral.lanczos_top_k(k=4, depth=8)` on J; peak = VmHWM. J's bytes are
split into residuals that are the params themselves (held by reference: the quantized
blocks, or the float weights) and fresh ones (N-dependent). The compiled linearization's
own memory analysis (arguments, outputs, temporaries: the planner's view) is read from
the same program lowered on abstract params, float or quantized.

    taskset -c 1 python benchmarks/quantized_memory.py [--quick] [--sizes 256 1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import _common as C

HERE = Path(__file__).resolve()
MB = 1e6


def compiled_linearization(model: Any, n: int) -> dict[str, float]:
    """The linearizing program's memory analysis, lowered on abstract params and inputs."""
    import jax

    from jaxlin.jacobian import DEFAULT_ATTENTION_CHUNK, _linearize

    abstract = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), model.params)
    inputs = jax.ShapeDtypeStruct((n, model.config.hidden_size), model.dtype)
    stats = (
        _linearize.lower(abstract, inputs, model.config, _detached(), DEFAULT_ATTENTION_CHUNK, None)
        .compile()
        .memory_analysis()
    )
    return {
        "compiled_arguments_mb": stats.argument_size_in_bytes / MB,
        "compiled_outputs_mb": stats.output_size_in_bytes / MB,
        "compiled_temporaries_mb": stats.temp_size_in_bytes / MB,
    }


def _detached() -> Any:
    from jaxlin._policy import FreezePolicy

    return FreezePolicy.DETACHED


def child(quantized: bool, n: int) -> None:
    import jax
    import jax.numpy as jnp

    from converters.gguf_model import load_gguf_model
    from jaxlin import spectral
    from jaxlin.jacobian import linearize
    from jaxlin.loading import embedded_gguf_path
    from jaxlin.quantized import params_nbytes

    model = load_gguf_model(embedded_gguf_path(), jnp.float32, keep_quantized=quantized)
    x = jax.block_until_ready(C.embeddings(model, n))
    record: dict[str, Any] = {"mode": "quantized" if quantized else "float32", "n": n}
    record["params_mb"] = params_nbytes(model.params) / MB
    record["load_peak_mb"] = C.peak_rss_bytes() / MB
    C.release_free_heap()
    record["rss_after_load_mb"] = C.current_rss_bytes() / MB
    baseline = C.current_rss_bytes()
    record["peak_reset"] = C.reset_peak()
    jacobian = jax.block_until_ready(linearize(model.params, x, model.config))
    own = {leaf.unsafe_buffer_pointer() for leaf in jax.tree_util.tree_leaves(model.params)}
    leaves = jax.tree_util.tree_leaves(jacobian.linear)
    record["j_referred_params_mb"] = (
        sum(leaf.nbytes for leaf in leaves if leaf.unsafe_buffer_pointer() in own) / MB
    )
    record["j_fresh_mb"] = sum(leaf.nbytes for leaf in leaves if leaf.unsafe_buffer_pointer() not in own) / MB
    record["rss_with_j_mb"] = C.current_rss_bytes() / MB
    triplets = spectral.lanczos_top_k(jacobian, jax.random.key(0), 4, depth=8, chunk=4)
    jax.block_until_ready(triplets)
    record["run_peak_mb"] = C.peak_rss_bytes() / MB
    record["run_peak_above_baseline_mb"] = (C.peak_rss_bytes() - baseline) / MB
    record.update(compiled_linearization(model, n))
    print("RESULT " + json.dumps(record), flush=True)


def run_child(quantized: bool, n: int) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE), "--child", "quantized" if quantized else "float32", str(n)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"child {cmd[2:]} failed:\n{out.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 64 only")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0] == "quantized", int(args.child[1]))
        return
    sizes = [64] if args.quick else args.sizes
    rows = [run_child(quantized, n) for n in sizes for quantized in (False, True)]
    C.report("quantized_memory", rows, args.quick)


if __name__ == "__main__":
    main()
