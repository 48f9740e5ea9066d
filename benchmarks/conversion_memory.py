"""Peak host memory while converting a safetensors checkpoint onto a mesh of 8 host CPU
devices (tensor 4 × fsdp 2): straight into shards (`load_hf_model(..., mesh=mesh)`, each
device reading only its slices) against whole-then-device_put (the model converted onto
one device, then `jaxlin.mesh.place_params`: the path conversion took before shards).

The model: a random float32 Llama (d = 1024, 8 heads, MLP 4096, 4 layers, vocabulary
16384, untied), ~403 MB, written as model.safetensors in a temporary directory.

Each path runs in a fresh process, after a warm-up conversion of a tiny model of the same
shape family (imports, tracing). The parent polls the child's /proc/PID/status every
millisecond and reports the growth of RssAnon over the conversion: anonymous memory, where
numpy buffers and the host devices' arrays live. The checkpoint's memory-mapped pages
(RssFile) are reported but not counted: they are page cache, which the kernel drops under
pressure, and would be the same for both paths.

Allocators: glibc keeps freed blocks below its (self-raising, up to 32 MiB) mmap
threshold for reuse instead of returning them, so after a conversion into shards RssAnon
stays ~100 MB above what the process holds (`malloc_trim` gives it back). Each path is
measured with glibc's default and with `MALLOC_MMAP_THRESHOLD_=1048576` (buffers of 1 MiB
and more are mapped and returned on free): the latter measures what the converter holds.

Bound asserted by tests/test_shards.py for the shards path, returning allocator: model
size + the largest param + 64 MiB. On host devices the converted shards themselves are
host memory (the model's size). While one param is built, its shards' host buffers exist
before they are handed to the devices (at most that param's size:
`jax.make_array_from_callback` reads every shard, then transfers). 64 MiB covers the
smaller blocks glibc still keeps and XLA's runtime. Whole-then-device_put holds the model
twice (once on device 0, once in shards).

    python benchmarks/conversion_memory.py                 # both paths, JSON in benchmarks/results/
    python benchmarks/conversion_memory.py --paths shards --json /tmp/m.json
    python benchmarks/conversion_memory.py --old-code /work/main   # also the converter of another checkout
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# glibc's default, and large buffers returned to the system when freed.
ALLOCATORS = {"default": {}, "returning": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}
MESH = {"tensor": 4, "fsdp": 2}
BIG = {"hidden": 1024, "heads": 8, "mlp": 4096, "layers": 4, "vocab": 16384}
WARM_UP = {"hidden": 64, "heads": 8, "mlp": 128, "layers": 4, "vocab": 256}
SLACK_BYTES = 64 << 20


def write_llama(directory: Path, hidden: int, heads: int, mlp: int, layers: int, vocab: int) -> dict:
    """A random float32 Llama checkpoint; returns its size and its largest param's."""
    import numpy as np
    from safetensors.numpy import save_file

    directory.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    rng = np.random.default_rng(0)

    def random(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    tensors = {
        "model.embed_tokens.weight": random(vocab, hidden),
        "lm_head.weight": random(vocab, hidden),
        "model.norm.weight": random(hidden),
    }
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        tensors |= {
            prefix + "input_layernorm.weight": random(hidden),
            prefix + "post_attention_layernorm.weight": random(hidden),
            **{prefix + f"self_attn.{p}_proj.weight": random(hidden, hidden) for p in "qkvo"},
            prefix + "mlp.gate_proj.weight": random(mlp, hidden),
            prefix + "mlp.up_proj.weight": random(mlp, hidden),
            prefix + "mlp.down_proj.weight": random(hidden, mlp),
        }
    save_file(tensors, directory / "model.safetensors")
    return {
        "model_bytes": sum(t.nbytes for t in tensors.values()),
        "largest_param_bytes": max(vocab * hidden, layers * mlp * hidden) * 4,
    }


def _status(pid: int) -> dict[str, int]:
    """RssAnon and RssFile of a process, in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def measure(path: str, model_dir: Path, warm_up_dir: Path, code: Path | None, allocator: str) -> dict:
    """Run one conversion path in a fresh process; its memory growth over the conversion."""
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        PYTHONPATH=str(code or ROOT),
        **ALLOCATORS[allocator],
    )
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", path, str(model_dir), str(warm_up_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=code or ROOT,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.strip()) for line in child.stdout], daemon=True).start()

    def wait_for(word: str) -> None:
        while True:
            try:
                if lines.get(timeout=600) == word:
                    return
            except queue.Empty:
                child.kill()
                raise RuntimeError(f"the {path} child never said {word!r}") from None

    wait_for("ready")
    base = _status(child.pid)
    peak = dict(base)
    child.stdin.write("go\n")
    child.stdin.flush()
    started = time.perf_counter()
    while True:
        for key, value in _status(child.pid).items():
            peak[key] = max(peak[key], value)
        try:
            if lines.get_nowait() == "done":
                break
        except queue.Empty:
            time.sleep(0.001)
        if child.poll() is not None:
            raise RuntimeError(f"the {path} child exited with {child.returncode}")
    seconds = time.perf_counter() - started
    end = _status(child.pid)
    child.stdin.write("exit\n")
    child.stdin.flush()
    child.wait(timeout=120)
    return {
        "peak_growth_bytes": peak["RssAnon"] - base["RssAnon"],
        "end_growth_bytes": end["RssAnon"] - base["RssAnon"],
        "peak_file_backed_growth_bytes": peak["RssFile"] - base["RssFile"],
        "seconds": round(seconds, 2),
        "code": str(code or ROOT),
        "allocator": allocator,
    }


def child(path: str, model_dir: Path, warm_up_dir: Path) -> None:
    """Convert (warm-up, then the model) by `path`, in step with the parent's polling."""
    import gc

    import jax
    import jax.numpy as jnp

    from converters.hf import load_hf_model
    from jaxlin.mesh import make_mesh, place_params

    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh(MESH)

    def convert(directory: Path) -> object:
        if path == "shards":
            return load_hf_model(directory, jnp.float32, mesh=mesh).params
        model = load_hf_model(directory, jnp.float32)  # whole, on one device
        return place_params(model.params, model.config, mesh)

    jax.block_until_ready(convert(warm_up_dir))
    gc.collect()
    print("ready", flush=True)
    sys.stdin.readline()
    params = jax.block_until_ready(convert(model_dir))
    gc.collect()
    print("done", flush=True)
    sys.stdin.readline()
    del params


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--paths", nargs="+", choices=("shards", "whole"), default=["shards", "whole"])
    parser.add_argument("--allocators", nargs="+", choices=tuple(ALLOCATORS), default=list(ALLOCATORS))
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "conversion_memory.json"
    )
    parser.add_argument(
        "--old-code", type=Path, help="also run whole-then-device_put with this checkout's code"
    )
    parser.add_argument(
        "--child", nargs=3, metavar=("PATH", "MODEL_DIR", "WARM_UP_DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        path, model_dir, warm_up_dir = args.child
        return child(path, Path(model_dir), Path(warm_up_dir))

    with tempfile.TemporaryDirectory(prefix="jaxlin-conversion-memory-") as tmp:
        sizes = write_llama(Path(tmp) / "model", **BIG)
        write_llama(Path(tmp) / "warm-up", **WARM_UP)
        bound = sizes["model_bytes"] + sizes["largest_param_bytes"] + SLACK_BYTES
        runs = [(path, path, None) for path in args.paths]
        if args.old_code:
            runs.append(("whole, old code", "whole", args.old_code.resolve()))
        results = {
            f"{name}, {allocator} allocator": measure(
                path, Path(tmp) / "model", Path(tmp) / "warm-up", code, allocator
            )
            for name, path, code in runs
            for allocator in args.allocators
        }
    result = {
        "model": f"random float32 llama {BIG}",
        "mesh": MESH,
        "devices": "8 forced host CPU devices",
        **sizes,
        "bound_bytes": bound,
        "bound": "model_bytes + largest_param_bytes + 64 MiB",
        "measured": "growth of the converting process's RssAnon, polled every 1 ms by its parent",
        "paths": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    mb = 1e6
    print(f"model {sizes['model_bytes'] / mb:.0f} MB, bound {bound / mb:.0f} MB (+ largest param + 64 MiB)")
    for name, run in results.items():
        verdict = "within" if run["peak_growth_bytes"] < bound else "OVER"
        print(
            f"{name:>37}: peak +{run['peak_growth_bytes'] / mb:.0f} MB ({verdict} the bound), "
            f"after +{run['end_growth_bytes'] / mb:.0f} MB, mapped file pages "
            f"+{run['peak_file_backed_growth_bytes'] / mb:.0f} MB, {run['seconds']} s"
        )
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
