"""Every GPU measurement in one run (< 8 minutes on one H100/H200), from a copy of the
working tree: `PYTHONPATH=. python benchmarks/gpu.py --out DIR`.

No checkpoint travels (the Gemma 3 270M GGUF is 253 MB): the models are the real
architectures with random weights, which is what timing and memory depend on, and the
HF reference is built from the same weights.

1. parity — Gemma 3 270M's config, random weights: transformers' PyTorch forward (CPU,
   float32) against jaxlin on the GPU (final hidden state, next-token logits, top-5),
   and the detached Jacobian's certificate at N = 427.
2. operator — one J·v and one Jᵀ·u against one forward (`operator_cost.py`), N = 427, 2048.
3. whole-J top-8 at N = 427 against the published algorithm (`whole_j_topk.py`).
4. all-token top-1 at N = 427 against the published per-token algorithm, run on a few
   tokens and extrapolated (`all_token_topk.py`).
5. memory and time vs N for a Gemma 3 4B-shaped model (random float32 weights): each N in
   a fresh process, the planner's per-device peak beside the device's measured peak, up to
   the longest N the planner allows on this device and the time budget.

Each step's results are written to DIR/gpu.json as soon as the step ends, so a run cut
short keeps what it finished. `--quick` runs tiny shapes on any backend (the CPU smoke
test). Packages: jax (+ CUDA plugin), flax, matfree, numpy, transformers, torch,
safetensors — nothing else from jaxlin's dependencies is imported (the run prints the
top-level packages it used).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C
import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve()

GEMMA3_270M = dict(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
    num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
    rope_theta=1e6, rope_local_base_freq=10000.0, query_pre_attn_scalar=256,
    max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
)  # fmt: skip
GEMMA3_4B = dict(
    vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024,
    rope_theta=1e6, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
    query_pre_attn_scalar=256, max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=True,
)  # fmt: skip
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=1, head_dim=16, sliding_window=128, rope_theta=1e6, rope_local_base_freq=10000.0,
    query_pre_attn_scalar=16, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
)  # fmt: skip
LENGTHS_4B = (512, 1024, 2048, 4096, 8192, 16384, 32768)
K, DEPTH, CHUNK = 8, 16, 16


def hf_config(fields: dict[str, Any]) -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**fields)


def model_config(fields: dict[str, Any]) -> Any:
    from jaxlin.families import family_for_hf_config

    config = hf_config(fields)
    return family_for_hf_config(config).config_from_hf(config)


def random_ids(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=n).astype(np.int32)


def use_random_tokens(vocab: int) -> None:
    """The benchmark modules embed `C.token_ids(n)` (a real tokenized text): random ids
    instead, since the tokenizer does not travel."""
    C.token_ids = lambda n: random_ids(n, vocab)


class Steps:
    """Results by step, rewritten to `path` after each step; a failing step is recorded."""

    def __init__(self, path: Path, budget_s: float) -> None:
        self.path, self.deadline, self.results = path, time.perf_counter() + budget_s, {}
        self.results["machine"] = C.machine_info()
        self.results["devices"] = [str(d) for d in jax.devices()]

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def run(self, name: str, fn: Any, *args: Any) -> Any:
        print(f"== {name} ({self.left():.0f} s of budget left)", flush=True)
        start = time.perf_counter()
        try:
            value = fn(*args)
            self.results[name] = {"seconds": time.perf_counter() - start, "result": value}
        except Exception as error:  # noqa: BLE001 — a later step may still work; say what failed
            value = None
            self.results[name] = {"seconds": time.perf_counter() - start, "error": repr(error)[:2000]}
            print(f"   {name} FAILED: {error!r}"[:2000], flush=True)
        self.path.write_text(json.dumps(self.results, indent=2, default=C._jsonable))
        return value


def parity(fields: dict[str, Any], n: int) -> dict[str, Any]:
    """HF PyTorch (CPU, float32) against jaxlin on the default device, same random weights;
    then the certificate. Returns the figures and leaves the model in `parity.model`."""
    import torch
    from transformers import Gemma3ForCausalLM

    from converters.hf import load_hf_model
    from jaxlin import model as model_fns
    from jaxlin.jacobian import linearize
    from jaxlin.operator import certify, contributions

    torch.manual_seed(0)
    reference = Gemma3ForCausalLM(hf_config(fields)).float().eval()
    ids = random_ids(n, fields["vocab_size"])
    with torch.no_grad():
        hidden = reference.model(torch.as_tensor(ids)[None]).last_hidden_state[0].double().numpy()
        logits = reference.lm_head(torch.as_tensor(hidden[-1:], dtype=torch.float32))[0].double().numpy()
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory, safe_serialization=True)
        del reference
        model = load_hf_model(Path(directory), jnp.float32)
    parity.model = model
    config, params = model.config, model.params
    x = model_fns.embed(config, params, jnp.asarray(ids))
    ours = np.asarray(model_fns.final_hidden(config, params, x), np.float64)
    our_logits = np.asarray(model_fns.logits(config, params, jnp.asarray(ours[-1], jnp.float32)), np.float64)
    start = time.perf_counter()
    jacobian = linearize(params, x, config)
    c = contributions(jacobian, 64)
    certificate = certify(jacobian.output, c, lambda h: model_fns.logits(config, params, h), jacobian.bias)
    seconds = time.perf_counter() - start
    top5 = lambda v: np.argsort(v)[::-1][:5].tolist()  # noqa: E731
    out = {
        "N": n,
        "hidden_max_rel_error": float(np.max(np.abs(ours - hidden)) / np.max(np.abs(hidden))),
        "last_hidden_rel_error": float(np.linalg.norm(ours[-1] - hidden[-1]) / np.linalg.norm(hidden[-1])),
        "logits_rel_error": float(np.linalg.norm(our_logits - logits) / np.linalg.norm(logits)),
        "top5_equal": top5(our_logits) == top5(logits),
        "certificate_relative_error": certificate.relative_error,
        "certificate_argmax_matches": certificate.argmax_matches,
        "linearize_and_contributions_s": seconds,
    }
    print("  ", out, flush=True)
    return out


def operator_cost(model: Any, sizes: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    import operator_cost as O

    return [O.run_size(model, n, 256, (4, 8), repeats) for n in sizes]


def whole_j(model: Any, n: int, repeats: int, candidates: tuple[int, ...]) -> dict[str, Any]:
    import whole_j_topk as W

    return W.run_size(model, n, K, repeats, 1e-6, candidates)


def all_tokens(model: Any, n: int, repeats: int, candidates: tuple[int, ...]) -> dict[str, Any]:
    import all_token_topk as A

    return A.compare(model, n, 1, 4, repeats, 1e-6, candidates, ranks=(64,))


def child(fields_name: str, n: int) -> None:
    """One N in a fresh process: random weights on the device, plan, linearize + Lanczos,
    the device's peak memory and the times."""
    from jaxlin import spectral
    from jaxlin._modules import Transformer
    from jaxlin._policy import FreezePolicy
    from jaxlin.jacobian import linearize
    from jaxlin.plan import Workload, plan

    config = model_config({"4b": GEMMA3_4B, "tiny": TINY}[fields_name])
    start = time.perf_counter()
    planned = plan(config, n, jnp.float32, Workload(top_k=K, depth=DEPTH, chunk=CHUNK, contributions=False))
    plan_s = time.perf_counter() - start
    module = Transformer(config, FreezePolicy.DETACHED, jnp.float32)
    ids = jnp.asarray(random_ids(n, config.vocab_size))
    init = jax.jit(lambda key: module.init(key, ids[:1], method=Transformer.embed_and_decode)["params"])
    params = jax.block_until_ready(init(jax.random.key(0)))
    x = module.apply({"params": params}, ids, method=Transformer.embed)
    device = jax.devices()[0]
    stats = lambda: device.memory_stats() or {}  # noqa: E731 — None on CPU
    before = stats().get("bytes_in_use")
    start = time.perf_counter()
    jacobian = jax.block_until_ready(linearize(params, x, config))
    key = jax.random.key(0)
    compiled = spectral.lanczos_top_k.lower(jacobian, key, k=K, depth=DEPTH, chunk=CHUNK).compile()
    linearize_and_compile_s = time.perf_counter() - start
    start = time.perf_counter()
    _, s, _, bounds, _ = jax.block_until_ready(compiled(jacobian, key))
    run_s = time.perf_counter() - start
    record = {
        "N": n,
        "planned_peak_bytes": planned.peak,
        "planned_above_weights_bytes": planned.above_weights,
        "plan_s": plan_s,
        "weights_bytes": planned.weights,
        "device_bytes_in_use_after_load": before,
        "device_peak_bytes": stats().get("peak_bytes_in_use"),
        "device_bytes_limit": stats().get("bytes_limit"),
        "linearize_and_compile_s": linearize_and_compile_s,
        "lanczos_run_s": run_s,
        "sigma": np.asarray(s).tolist(),
        "max_rel_bound": float(np.max(np.asarray(bounds) / np.asarray(s))),
    }
    print("RESULT " + json.dumps(record), flush=True)


def memory_vs_length(fields_name: str, lengths: tuple[int, ...], steps: Steps) -> list[dict[str, Any]]:
    from jaxlin.memory import total_bytes
    from jaxlin.plan import Workload, plan

    config = model_config({"4b": GEMMA3_4B, "tiny": TINY}[fields_name])
    limit = total_bytes()
    work = Workload(top_k=K, depth=DEPTH, chunk=CHUNK, contributions=False)
    rows: list[dict[str, Any]] = []
    last_wall = 0.0
    for n in lengths:
        # The planner decides which N can run at all; the budget, which N there is time for.
        planned = plan(config, n, jnp.float32, work)
        if limit is not None and planned.peak > 0.9 * limit:
            too_big = f"planned peak {planned.peak / 2**30:.1f} GiB > 90% of one device"
            rows.append({"N": n, "skipped": too_big})
            break
        if last_wall and 2.5 * last_wall > steps.left():
            rows.append({"N": n, "skipped": "time budget"})
            break
        start = time.perf_counter()
        cmd = [sys.executable, str(HERE), "--child", fields_name, str(n)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30.0, steps.left()))
        last_wall = time.perf_counter() - start
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        row = json.loads(found[0][len("RESULT ") :]) if found else {"N": n, "failed": proc.stderr[-1500:]}
        row["wall_s"] = last_wall
        rows.append(row)
        print("  ", {k: v for k, v in row.items() if k != "sigma"}, flush=True)
        if not found:
            break
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on any backend (smoke test)")
    parser.add_argument("--out", type=Path, default=C.RESULTS, help="folder for gpu.json and caches")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new work after this")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    C.RESULTS = args.out  # reference caches belong to these random weights, not the real model's
    name = "gpu_quick.json" if args.quick else "gpu.json"
    steps = Steps(args.out / name, args.budget_s)
    if args.quick:
        fields, n, sizes, repeats, candidates, big, lengths = TINY, 24, (24,), 1, (16, 32), "tiny", (32, 64)
    else:
        fields, n, sizes, repeats = GEMMA3_270M, 427, (427, 2048), 3
        candidates, big, lengths = (16, 24, 32, 48, 64, 96, 128), "4b", LENGTHS_4B
    use_random_tokens(fields["vocab_size"])
    steps.run("parity", parity, fields, n)
    model = getattr(parity, "model", None)
    if model is not None:
        steps.run("operator_cost", operator_cost, model, sizes, repeats)
        steps.run("whole_j_top8", whole_j, model, n, repeats, candidates)
        steps.run("all_token_top1", all_tokens, model, n, repeats, candidates)
    steps.run("memory_vs_length", memory_vs_length, big, lengths, steps)
    top = {name.split(".")[0] for name in sys.modules if not name.startswith("_")}
    used = sorted(top - set(sys.stdlib_module_names))
    steps.results["packages_imported"] = used
    steps.path.write_text(json.dumps(steps.results, indent=2, default=C._jsonable))
    print(f"saved {steps.path}; packages imported: {' '.join(used)}")


if __name__ == "__main__":
    main()
