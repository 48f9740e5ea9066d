"""Output directories: nothing jaxlin did not write is replaced, an earlier run only with
--overwrite, one run per output at a time, no staging left behind, and Ctrl-C ends a run
at once with one line (exit status 130)."""

from __future__ import annotations

import fcntl
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxlin import outputs
from jaxlin.cli import main
from jaxlin.record import ManyPromptRecord

REPO = Path(__file__).resolve().parents[1]
FAST_ANALYSIS = {
    "top_k": 2,
    "per_token": {"method": "off"},
    "ordinary_jacobian": False,
    "frobenius_samples": 2,
    "decode_top_tokens": 2,
}


def write_config(path: Path, model_dir: Path, out: Path, **extra) -> Path:
    data = {
        "model": {"source": "hf", "path": str(model_dir), "dtype": "float32", "cache": False},
        "text": "The bridge out of Marin.",
        "analysis": FAST_ANALYSIS,
        "output_dir": str(out),
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def snapshot(root: Path) -> dict[str, tuple[bytes | None, int, int]]:
    """Every path under `root` (and root itself): contents, mode and mtime."""
    paths = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
    return {
        str(p.relative_to(root)): (
            p.read_bytes() if p.is_file() else None,
            p.stat().st_mode,
            p.stat().st_mtime_ns,
        )
        for p in paths
    }


@pytest.fixture
def model_not_loaded(monkeypatch):
    """Fails the test if a run gets as far as loading the model."""
    import jaxlin.command

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(jaxlin.command, "load_model", refuse)


def expect_output_refusal(capsys, argv: list[str], *fragments: str) -> str:
    capsys.readouterr()
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxlin: error: output_dir: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def leftovers(directory: Path, name: str = "run") -> list[str]:
    """Staging or lock files of output `name` in `directory`."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{name}."))


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("what", ["directory", "file"])
def test_an_output_that_is_not_a_run_is_refused_untouched(
    tmp_path, tiny_model_dir, capsys, model_not_loaded, what
):
    out = tmp_path / "mine"
    if what == "directory":
        (out / "notes").mkdir(parents=True)
        (out / "thesis.tex").write_text("my own work\n")
        (out / "notes" / "data.bin").write_bytes(bytes(range(256)))
    else:
        out.write_bytes(b"a user's file\n")
    before = snapshot(out)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir("llama_gqa_untied"), tmp_path / "elsewhere")
    for extra in ([], ["--overwrite"]):  # --overwrite replaces only jaxlin runs
        expect_output_refusal(
            capsys, ["run", str(config), "--out", str(out), *extra], str(out), "not a jaxlin run"
        )
        assert snapshot(out) == before
        assert leftovers(tmp_path, "mine") == []
    assert not (tmp_path / "elsewhere").exists()


def test_an_earlier_run_is_replaced_only_with_overwrite(tmp_path, tiny_model_dir, capsys, monkeypatch):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_model_dir("llama_gqa_untied"), out)
    assert main(["run", str(config), "--quiet", "--text", "first"]) == 0
    assert outputs.run_kind(out) == "single"
    before = snapshot(out)

    import jaxlin.command

    real_load = jaxlin.command.load_model
    monkeypatch.setattr(jaxlin.command, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    expect_output_refusal(capsys, ["run", str(config), "--text", "second"], str(out), "--overwrite")
    assert snapshot(out) == before and leftovers(tmp_path) == []
    monkeypatch.setattr(jaxlin.command, "load_model", real_load)

    assert main(["run", str(config), "--quiet", "--text", "second", "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["text"] == "second"
    by_config = write_config(
        tmp_path / "overwrite.yaml", tiny_model_dir("llama_gqa_untied"), out, overwrite=True
    )
    assert main(["run", str(by_config), "--quiet", "--text", "third"]) == 0
    assert json.loads((out / "summary.json").read_text())["text"] == "third"
    assert outputs.run_kind(out) == "single" and leftovers(tmp_path) == []


def test_an_empty_directory_may_be_used(tmp_path, tiny_model_dir):
    out = tmp_path / "empty"
    out.mkdir()
    config = write_config(tmp_path / "run.yaml", tiny_model_dir("llama_gqa_untied"), out)
    assert main(["run", str(config), "--quiet"]) == 0
    assert (out / "summary.json").is_file() and outputs.run_kind(out) == "single"


def test_output_under_a_file_is_refused_before_loading(tmp_path, tiny_model_dir, capsys, model_not_loaded):
    blocker = tmp_path / "results"
    blocker.write_text("not a directory\n")
    before = snapshot(blocker)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir("llama_gqa_untied"), blocker / "sub" / "run")
    expect_output_refusal(capsys, ["run", str(config)], str(blocker))
    assert snapshot(blocker) == before


@pytest.fixture
def read_only_directory(tmp_path):
    """A directory nobody may write in. Root ignores permission bits, so as root the
    directory is made immutable (chattr +i), which stops root too."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    (directory / "existing.txt").write_text("kept\n")
    if os.geteuid() != 0:
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: no way to make a directory read-only")
    made = subprocess.run(["chattr", "+i", str(directory)], capture_output=True)
    try:
        probe = directory / "probe"
        try:
            probe.write_text("")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("chattr +i does not stop root on this filesystem")
        if made.returncode != 0:
            pytest.skip(f"chattr +i failed: {made.stderr.decode().strip()}")
        yield directory
    finally:
        subprocess.run(["chattr", "-i", str(directory)], capture_output=True)


@pytest.mark.parametrize("depth", ["in", "below"])
def test_read_only_location_is_refused_before_loading(
    read_only_directory, tiny_model_dir, tmp_path, capsys, model_not_loaded, depth
):
    before = snapshot(read_only_directory)
    out = read_only_directory / "run" if depth == "in" else read_only_directory / "a" / "run"
    config = write_config(tmp_path / "run.yaml", tiny_model_dir("llama_gqa_untied"), out)
    expect_output_refusal(capsys, ["run", str(config)], str(read_only_directory))
    assert snapshot(read_only_directory) == before


# ----------------------------------------------------------------------------- lock


def test_a_locked_output_is_refused_and_the_run_there_kept(
    tmp_path, tiny_model_dir, capsys, model_not_loaded
):
    out = tmp_path / "run"
    out.mkdir()
    (out / outputs.MARKER_NAME).write_text(json.dumps({"jaxlin_run": 1, "kind": "single"}))
    (out / "summary.json").write_text('{"text": "the first run"}\n')
    before = snapshot(out)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir("llama_gqa_untied"), out)
    with open(tmp_path / ".run.lock", "w") as held:  # as a run in progress holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        expect_output_refusal(capsys, ["run", str(config), "--overwrite"], "in use by another jaxlin run")
    assert snapshot(out) == before


WRAPPER = """
import os, sys, time
import jaxlin.runner as runner
from jaxlin.cli import main

real_render = runner.render_report


def paused(*args, **kwargs):
    # Stops while the run directory is staged, until the test says go.
    print("[test] writing the run directory", file=sys.stderr, flush=True)
    while not os.path.exists(os.environ["JAXLIN_TEST_GO"]):
        time.sleep(0.05)
    return real_render(*args, **kwargs)


runner.render_report = paused
sys.argv = ["jaxlin", *sys.argv[1:]]
sys.exit(main())
"""


class Program:
    """`jaxlin run` in a subprocess, its stderr read line by line as it comes."""

    def __init__(self, args: list[str], tmp_path: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "JAXLIN_TEST_GO": str(tmp_path / "go")}
        self.process = subprocess.Popen(
            [sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, fragment: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if fragment in line:
                return
        self.process.kill()
        pytest.fail(f"no line with {fragment!r}; stderr so far: {self.lines}")

    def finish(self, timeout: float) -> tuple[int, float, list[str]]:
        """Exit status, seconds taken, and the stderr lines not yet read."""
        start = time.monotonic()
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"still running {timeout} s later; stderr: {self.lines}")
        seconds = time.monotonic() - start
        rest = []
        while (line := self._queue.get(timeout=10)) is not None:
            rest.append(line)
        return code, seconds, rest


def test_two_concurrent_runs_on_one_output(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_model_dir("llama_gqa_untied"), out)
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    first = Program([str(tmp_path / "wrapper.py"), "run", str(config), "--text", "first"], tmp_path)
    first.wait_for("[test] writing the run directory")
    second = write_config(tmp_path / "second.yaml", tiny_model_dir("llama_gqa_untied"), out, text="second")
    expect_output_refusal(
        capsys, ["run", str(second), "--overwrite"], str(out), "in use by another jaxlin run"
    )
    (tmp_path / "go").touch()
    code, _, rest = first.finish(timeout=120)
    assert code == 0, rest
    assert json.loads((out / "summary.json").read_text())["text"] == "first"
    assert (out / "report.html").is_file() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- staging


def test_stale_staging_is_removed_and_nothing_else(tmp_path, tiny_model_dir):
    stale = [tmp_path / ".run.partial-k3j2", tmp_path / ".run.old-x81a"]
    for directory in stale:
        (directory / "run").mkdir(parents=True)
        (directory / "run" / "summary.json").write_text("{}")
    (tmp_path / ".run.partial-q9.png").write_bytes(b"half a figure")
    kept = {
        ".foo": b"a user's hidden file\n",
        ".running": b"not staging\n",
        ".runs.partial-1": b"another output's name\n",
        "run.partial-1": b"not hidden\n",
    }
    for name, content in kept.items():
        (tmp_path / name).write_bytes(content)
    before = {name: snapshot(tmp_path / name) for name in kept}
    config = write_config(tmp_path / "run.yaml", tiny_model_dir("llama_gqa_untied"), tmp_path / "run")
    assert main(["run", str(config), "--quiet"]) == 0
    assert leftovers(tmp_path) == []
    assert {name: snapshot(tmp_path / name) for name in kept} == before


def test_claims_of_many_prompt_outputs(tmp_path):
    """A many-prompt output resumes its own earlier output, but replaces another kind of
    run only with overwrite; a failed claim leaves nothing it created."""
    many = tmp_path / "a" / "b" / "many"
    with outputs.claim_output(many, "many", overwrite=False) as claim:
        assert not claim.resume and outputs.run_kind(many) == "many"
        assert (many.parent / ".many.lock").exists()
    assert outputs.run_kind(many) == "many" and not (many.parent / ".many.lock").exists()
    with outputs.claim_output(many, "many", overwrite=False) as claim:
        assert claim.resume

    single = tmp_path / "single"
    with outputs.claim_output(single, "single", overwrite=False):
        pass
    assert not single.exists()  # a single run appears only when published
    with outputs.staged_directory(single, "single") as staging:
        (staging / "summary.json").write_text("{}")
    with pytest.raises(outputs.OutputError, match="--overwrite"), outputs.claim_output(single, "many", False):
        pass
    with outputs.claim_output(single, "many", overwrite=True) as claim:
        assert not claim.resume and not (single / "summary.json").exists()

    fresh = tmp_path / "x" / "y" / "fresh"
    with pytest.raises(RuntimeError), outputs.claim_output(fresh, "many", overwrite=False):
        raise RuntimeError("the run failed before its first prompt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "single"]


def test_a_staged_directory_never_replaces_what_jaxlin_did_not_write(tmp_path):
    target = tmp_path / "run"
    with outputs.staged_directory(target, "single") as staging:
        (staging / "summary.json").write_text("{}")
    assert outputs.run_kind(target) == "single"
    (target / outputs.MARKER_NAME).unlink()  # no longer recognisably a jaxlin run
    with (
        pytest.raises(outputs.OutputError, match="not a jaxlin run"),
        outputs.staged_directory(target, "single") as staging,
    ):
        (staging / "summary.json").write_text('{"new": 1}')
    assert (target / "summary.json").read_text() == "{}"
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- the one writer


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("summary.json", lambda path: outputs.write_json_atomic(path, {"a": [1, 2]})),
        ("arrays.npz", lambda path: outputs.write_npz_atomic(path, {"x": np.arange(3)})),
        ("report.html", lambda path: outputs.write_text_atomic(path, "<p>new</p>")),
    ],
)
def test_every_kind_of_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch, name, write):
    path = tmp_path / name
    path.write_bytes(b"the previous file")

    def broken_replace(*args) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", broken_replace)
        with pytest.raises(OSError, match="disk full"):
            write(path)
    assert path.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no staging left
    assert write(path) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    if name == "arrays.npz":
        assert np.load(path)["x"].tolist() == [0, 1, 2]  # the name as given, no second .npz
    else:
        assert path.read_bytes() != b"the previous file"


# The ways a file can be written or moved into place. Only jaxlin.outputs uses them, and
# plots.py hands matplotlib the staging path it is given; the params cache (loading.py)
# publishes a directory that orbax and the tokenizer write into, once, by rename.
WRITES = re.compile(
    r"os\.replace|os\.rename|\.rename\(|tempfile|write_text\(|write_bytes\(|savez|savefig|"
    r"\.dump\(|open\([^)]*[\"'][wa]b?[\"']"
)
ALLOWED = {
    "outputs.py": None,
    "plots.py": {"savefig"},
    "comparison_plots.py": {"savefig"},  # drawn into write_file_atomic's staging path
    "length_plots.py": {"savefig"},  # likewise
    # Resets the kernel's peak-RSS counter (a /proc control, not a file jaxlin writes).
    "length_study.py": {'open("/proc/self/clear_refs", "w"'},
    "loading.py": None,
}


def test_jaxlin_writes_files_one_way():
    found = {}
    for source in sorted((REPO / "jaxlin").rglob("*.py")):
        kinds = {match.group(0) for match in WRITES.finditer(source.read_text(encoding="utf-8"))}
        allowed = ALLOWED.get(source.name, set())
        if allowed is None:
            continue
        if kinds - allowed:
            found[str(source.relative_to(REPO))] = sorted(kinds - allowed)
    assert found == {}


def test_figures_are_written_through_the_one_writer(tmp_path, monkeypatch):
    from jaxlin import plots

    seen = []
    real = plots.write_file_atomic
    monkeypatch.setattr(
        plots, "write_file_atomic", lambda path, write: seen.append(path) or real(path, write)
    )
    record = ManyPromptRecord.model_validate(
        {
            "model": "m",
            "family": "gemma3",
            "dtype": "float32",
            "text": "1 prompts",
            "n_prompts": 1,
            "prompts": [
                {
                    "index": 0,
                    "text": "a",
                    "n_tokens": 2,
                    "predicted_token": "b",
                    "reconstruction_relative_error": 1e-7,
                    "sigma_1": 1.0,
                    "stable_rank": 1.0,
                    "directory": "prompts/0000",
                }
            ],
            "max_reconstruction_relative_error": 1e-7,
            "mean_stable_rank": 1.0,
            "config": {"texts": ["a"]},
            "params_from_cache": False,
            "checkpoint_sha256": {},
            "timings_seconds": {},
            "prompts_reused": 0,
            "devices": 1,
        }
    )
    assert plots.write_figures(tmp_path, record, {}) == ["prompts.png"]
    assert seen == [tmp_path / "prompts.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["prompts.png"]
    assert (tmp_path / "prompts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- Ctrl-C


def interrupt(program: Program, tmp_path: Path, number: int = signal.SIGINT) -> None:
    program.process.send_signal(number)
    code, seconds, rest = program.finish(timeout=30)
    assert code == 128 + number, (code, program.lines, rest)
    assert seconds < 10, seconds
    # Progress lines printed just before the signal landed may follow; nothing else does.
    line = "jaxlin: interrupted" if number == signal.SIGINT else "jaxlin: terminated"
    assert [text for text in rest if not text.startswith("[jaxlin]")] == [line], rest
    assert leftovers(tmp_path) == [] and not (tmp_path / "run").exists()


def test_ctrl_c_while_compiling(tmp_path, tiny_model_dir):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir("gemma3_sliding"), tmp_path / "run")
    program = Program(["-m", "jaxlin.cli", "run", str(config)], tmp_path)
    program.wait_for("[jaxlin] detached Jacobian (")
    time.sleep(0.2)  # inside XLA's compilation of the linearization
    interrupt(program, tmp_path)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_while_the_run_directory_is_staged(tmp_path, tiny_model_dir, number):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir("llama_gqa_untied"), tmp_path / "run")
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    program = Program([str(tmp_path / "wrapper.py"), "run", str(config)], tmp_path)
    program.wait_for("[test] writing the run directory")
    assert [name for name in leftovers(tmp_path) if ".partial-" in name]  # the staging exists
    interrupt(program, tmp_path, number)
