"""`jaxlin run CONFIG [--text TEXT] [--out DIR] [--overwrite] [--quiet]`,
`jaxlin bench CONFIG --lengths N …`, `jaxlin plan CONFIG --tokens N …`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import NoReturn

from jaxlin.errors import JaxlinError
from jaxlin.record import ManyPromptRecord, Record, RunRecord, Steering, parse_record
from jaxlin.report import convergence_verdict


def _print_many(record: ManyPromptRecord) -> None:
    print(f"model      {record.model} ({record.family}, {record.dtype})")
    print(f"prompts    {record.n_prompts} ({record.prompts_reused} reused from an earlier run)")
    for row in record.prompts:
        print(
            f"  [{row.index}] {row.n_tokens:>4} tokens → {row.predicted_token!r}  certificate "
            f"{row.reconstruction_relative_error:.2e}  stable rank {row.stable_rank:.2f}"
        )
    print(f"worst certificate {record.max_reconstruction_relative_error:.3e}")


def _print_single(record: RunRecord) -> None:
    print(f"model      {record.model} ({record.family}, {record.dtype})")
    print(f"tokens     {record.n_tokens}")
    print(f"predicted  {record.predicted_token!r} (id {record.predicted_token_id})")
    ok = "ok" if record.reconstruction_argmax_matches else "MISMATCH"
    print(
        f"certificate  ‖Σ_t J_t·x_t − y‖/‖y‖ = {record.reconstruction_relative_error:.3e}; "
        f"next-token argmax from Σc: {ok}"
    )
    if record.ordinary_jacobian_relative_error is not None:
        print(f"ordinary Jacobian reconstruction error: {record.ordinary_jacobian_relative_error:.3e}")
    spectrum, norms = record.spectrum, record.norms
    print(f"‖J‖_F      {norms.frobenius:.4f} ({norms.frobenius_method}); stable rank {norms.stable_rank:.3f}")
    print(convergence_verdict(spectrum))
    depth = f", Krylov depth {spectrum.krylov_depth}" if spectrum.krylov_depth else ""
    print(f"top-{len(record.singular_values)} singular values of J ({spectrum.method}{depth}):")
    for entry, bound in zip(spectrum.left_vectors_top_tokens, spectrum.residual_bounds, strict=True):
        tokens = ", ".join(repr(t) for t in entry.tokens)
        print(f"  σ{entry.index:<2} = {entry.sigma:10.4f} ± {bound:.1e}   u → {tokens}")
    per_token = record.per_token
    if per_token.top_left_vector and per_token.singular_values:
        loudest = max(per_token.top_left_vector, key=lambda e: e.sigma)
        print(
            f"per-token  top-{len(per_token.singular_values[0])} of every J_t ({per_token.method}); "
            f"largest σ₁(J_t) = {loudest.sigma:.3f} at token {loudest.token!r}"
        )


def _print_steering(steering: Steering) -> None:
    print(
        f"steering   concept {steering.concept!r} at layer {steering.layer} ({steering.mode}), "
        f"prompt {steering.prompt!r}"
    )
    for run in steering.runs:
        print(f"  λ = {run.strength:<5g} → {run.text!r}")


def print_summary(record: Record) -> None:
    """The terminal summary: a renderer of the run record."""
    if isinstance(record, ManyPromptRecord):
        _print_many(record)
    else:
        _print_single(record)
    if record.steering is not None:
        _print_steering(record.steering)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"jaxlin: error: {message} (see {self.prog} --help)\n")


# Exit statuses on a signal: the shell's convention, 128 + the signal's number.
SIGNAL_LINES = {signal.SIGINT: "jaxlin: interrupted", signal.SIGTERM: "jaxlin: terminated"}


def _exit_on_signal(wakeup: int) -> None:
    """The watcher thread: wait for SIGINT/SIGTERM, remove this run's staging and lock,
    print one line and exit at once, whatever the main thread is doing."""
    while True:
        number = os.read(wakeup, 1)[0]
        if number in SIGNAL_LINES:
            break
    # Anything the main thread prints while its staging disappears goes nowhere.
    stderr = os.dup(2)
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    from jaxlin import outputs

    outputs.abandon()
    os.write(stderr, f"{SIGNAL_LINES[signal.Signals(number)]}\n".encode())
    os._exit(128 + number)


def handle_signals() -> None:
    """Ctrl-C (and SIGTERM) end the program within moments, with one line, exit status
    130 (143) and no staging left — also while XLA compiles or runs, when the main thread
    does not return to Python for a long time.

    Python's C-level handler runs in whichever thread the kernel picks (numpy and XLA
    start threads of their own, so blocking the signal in the main thread is not enough)
    and writes the signal's number to the wakeup fd; a watcher thread reads it and acts.
    The Python-level handler does nothing, so no KeyboardInterrupt unwinds the main
    thread halfway. For the program only: it replaces the process's signal handling."""
    wakeup, wakeup_write = os.pipe()
    os.set_blocking(wakeup_write, False)
    for number in SIGNAL_LINES:
        signal.signal(number, lambda *_: None)
    signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
    threading.Thread(target=_exit_on_signal, args=(wakeup,), name="jaxlin-signals", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """The CLI. Called without `argv` it is the program (the console script, `python -m
    jaxlin.cli`) and takes over Ctrl-C; called with `argv` (tests, other code) it leaves
    the process's signal handling alone."""
    if argv is None:
        handle_signals()
    parser = _OneLineParser(prog="jaxlin", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run the analysis described by a YAML config")
    run_parser.add_argument("config", help="path to a run config (see configs/)")
    run_parser.add_argument("--text", help="input text (overrides the config's text)")
    run_parser.add_argument("--out", help="output directory (overrides the config's output_dir)")
    run_parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier jaxlin run in the output directory (never anything else)",
    )
    run_parser.add_argument("--quiet", action="store_true", help="no progress messages")
    bench_parser = commands.add_parser(
        "bench", help="time and peak memory of the config's analysis at each prefix length"
    )
    bench_parser.add_argument("config", help="path to a run config (see configs/)")
    bench_parser.add_argument("--lengths", type=int, nargs="+", required=True, help="prefix lengths (tokens)")
    bench_parser.add_argument("--out", help="output directory (default: the config's output_dir + '-bench')")
    bench_parser.add_argument("--overwrite", action="store_true", help="replace an earlier jaxlin run there")
    bench_parser.add_argument("--quiet", action="store_true", help="no progress messages")
    plan_parser = commands.add_parser(
        "plan", help="per-device memory of the config's programs, compiled from the model's config alone"
    )
    plan_parser.add_argument("config", help="path to a run config (see configs/)")
    plan_parser.add_argument("--tokens", type=int, nargs="+", required=True, help="input lengths (tokens)")
    plan_parser.add_argument(
        "--devices", type=int, help="search meshes of up to this many devices (default: those present)"
    )
    plan_parser.add_argument(
        "--device-memory", help="memory of each device, e.g. 80GB (default: the present device's)"
    )
    plan_parser.add_argument(
        "--quantized", help="plan the matrices in a GGUF block layout kept quantized (Q4_K, Q4_0, Q4_1, Q8_0)"
    )
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _study(args, "bench")
    if args.command == "plan":
        return _plan(args)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        from jaxlin.command import run
        from jaxlin.run_config import load_run_config

        overrides: dict[str, object] = (
            {"text": args.text, "texts": None, "texts_file": None} if args.text is not None else {}
        )
        if args.overwrite:
            overrides["overwrite"] = True
        config = load_run_config(args.config, output_dir=args.out, **overrides)
        if config.length_study is not None:
            return _study(args, "study", config)
        if config.comparison is not None:
            return _compare(args, config)
        result, out_dir = run(config, verbose=not args.quiet)
    except JaxlinError as error:
        # One line whatever the message holds (a quoted file name or library text may span lines).
        print(f"jaxlin: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    if not _prints_results():
        return 0
    print_summary(parse_record(result.summary))
    print(f"wrote      {out_dir}/ (summary.json, arrays.npz, PNG figures)")
    print(f"report     {out_dir / 'report.html'}")
    return 0


def _prints_results() -> bool:
    """Process 0 of a distributed run (or the only process) prints what it wrote."""
    from jaxlin.distributed import is_writer

    return is_writer()


def _plan(args: argparse.Namespace) -> int:
    """`jaxlin plan CONFIG --tokens N …` (see jaxlin.plan): nothing is loaded or written."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        from jaxlin.plan import parse_bytes, plan_run, request_host_devices
        from jaxlin.run_config import load_run_config

        config = load_run_config(args.config)
        configured = config.mesh.data * config.mesh.fsdp * config.mesh.tensor if config.mesh else 1
        # Before jax starts: host devices to compile for, when there are fewer devices.
        request_host_devices(max(args.devices or 1, configured))
        memory = parse_bytes(args.device_memory) if args.device_memory is not None else None
        report = plan_run(config, args.tokens, args.devices, memory, args.quantized)
    except JaxlinError as error:
        print(f"jaxlin: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(report.text())
    return 0


def _study(args: argparse.Namespace, kind: str, config: object | None = None) -> int:
    """`jaxlin run` of a config with a length_study section, or `jaxlin bench` (see jaxlin.length_study)."""
    try:
        from jaxlin.length_study import print_summary, run_study
        from jaxlin.run_config import load_run_config

        if kind == "bench" and any(length < 2 for length in args.lengths):
            raise JaxlinError(f"--lengths: every length must be at least 2 (got {args.lengths})")
        if config is None:
            config = load_run_config(args.config, **({"overwrite": True} if args.overwrite else {}))
        lengths = args.lengths if kind == "bench" else None
        summary, out_dir = run_study(config, kind, lengths, args.out, verbose=not args.quiet)
    except JaxlinError as error:
        print(f"jaxlin: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    if _prints_results():
        print_summary(summary, out_dir)
    return 0


def _compare(args: argparse.Namespace, config: object) -> int:
    """`jaxlin run` of a config with a comparison section (see jaxlin.comparison)."""
    try:
        from jaxlin.comparison import print_summary, run_comparison

        record, out_dir = run_comparison(config, verbose=not args.quiet)  # type: ignore[arg-type]
    except JaxlinError as error:
        print(f"jaxlin: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    if _prints_results():
        print_summary(record, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
