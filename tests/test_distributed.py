"""Several processes (`jaxlin.distributed`): `jaxlin run` as 2 processes on this machine
(a localhost coordinator, gloo collectives on CPU, 2 forced host devices each, the
parameters sharded over all 4) writes what one process writes, from process 0 only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
from test_cli import tiny_run_config, write_config

from jaxlin import outputs
from jaxlin.cli import main
from jaxlin.distributed import agree, is_writer, to_host
from jaxlin.run_config import ConfigError, parse_run_config

# Keys of summary.json that describe how the run was made, not what it found.
HOW_IT_RAN = {"config", "timings_seconds", "devices"}
# Values computed in float32 by design (`jaxlin.decoding` ranks tokens in float32): a sum
# split over other devices may round differently in its last float32 bit.
FLOAT32_KEYS = {"scores", "cosines"}
FLOAT32_TOLERANCE = 4 * float(np.finfo(np.float32).eps)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def launch(config: Path, devices: int) -> subprocess.Popen[str]:
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    command = [sys.executable, "-m", "jaxlin.cli", "run", str(config)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def run_processes(
    configs: list[Path], devices: int, meanwhile: Callable[[], None] = lambda: None
) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process, `meanwhile` run here while they
    start; a hang fails the test, not the suite."""
    processes = [launch(config, devices) for config in configs]
    done = []
    try:
        meanwhile()
        for process in processes:
            stdout, stderr = process.communicate(timeout=240)
            done.append((process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return done


def process_configs(tmp_path: Path, data: dict, processes: int) -> list[Path]:
    """The same config for each process but its process_id."""
    coordinator = f"localhost:{free_port()}"
    return [
        write_config(
            tmp_path / f"process{index}.yaml",
            **data,
            distributed={"coordinator": coordinator, "processes": processes, "process_id": index},
        )
        for index in range(processes)
    ]


def assert_same_numbers(
    got: object, expected: object, where: str = "summary", tolerance: float = 1e-12
) -> None:
    """Every number of `expected` in `got` to float64 rounding (1e-12 relative to the
    larger magnitude, or absolute below 1; float32 rounding under FLOAT32_KEYS), every
    other value equal."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key, value in expected.items():
            within = FLOAT32_TOLERANCE if key in FLOAT32_KEYS else tolerance
            assert_same_numbers(got[key], value, f"{where}.{key}", within)
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for index, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same_numbers(a, b, f"{where}[{index}]", tolerance)
    elif isinstance(expected, float) and not isinstance(got, bool):
        assert isinstance(got, int | float), where
        assert abs(got - expected) <= tolerance * max(1.0, abs(got), abs(expected)), (where, got, expected)
    else:
        assert got == expected, (where, got, expected)


def test_two_processes_write_what_one_writes_from_process_0_only(tmp_path, tiny_model_dir):
    data = tiny_run_config(tmp_path, tiny_model_dir("gemma3_sliding"))
    data["text"] = "Hello, world!"
    data["analysis"]["ordinary_jacobian"] = False
    reference = write_config(tmp_path / "one.yaml", **data)

    def one_process() -> None:
        assert main(["run", str(reference), "--quiet", "--out", str(tmp_path / "one")]) == 0

    # Both processes are given the same output_dir; fsdp spans the two processes.
    out = tmp_path / "shared" / "run"
    data.update(output_dir=str(out), mesh={"fsdp": 2, "tensor": 2})
    (zero, one) = run_processes(process_configs(tmp_path, data, 2), devices=2, meanwhile=one_process)
    assert zero[0] == 0, zero[1][-3000:] + zero[2][-3000:]
    assert one[0] == 0, one[1][-3000:] + one[2][-3000:]

    # Progress and the printed summary from process 0 only.
    assert "[jaxlin] loading model" in zero[2] and "wrote" in zero[1]
    assert "[jaxlin]" not in one[2] and "wrote" not in one[1] and "jaxlin:" not in one[2], one
    # One run directory and nothing else (no staging, no lock, nothing from process 1).
    assert [p.name for p in out.parent.iterdir()] == ["run"]
    expected_files = {p.name for p in (tmp_path / "one").iterdir()}
    assert {p.name for p in out.iterdir()} == expected_files

    single = json.loads((tmp_path / "one" / "summary.json").read_text())
    split = json.loads((out / "summary.json").read_text())
    assert split["config"]["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert split["config"]["distributed"]["processes"] == 2
    assert_same_numbers(
        {k: v for k, v in split.items() if k not in HOW_IT_RAN},
        {k: v for k, v in single.items() if k not in HOW_IT_RAN},
    )
    arrays_one, arrays_two = np.load(tmp_path / "one" / "arrays.npz"), np.load(out / "arrays.npz")
    assert sorted(arrays_two.files) == sorted(arrays_one.files)
    for name in arrays_one.files:
        expected = arrays_one[name]
        # Arrays stored in float32 (inputs, the focus block) are float64 results rounded
        # once: a last-bit difference in float64 may move the float32 rounding by one bit.
        tolerance = FLOAT32_TOLERANCE if expected.dtype == np.float32 else 1e-12
        atol = tolerance * max(1.0, float(np.max(np.abs(expected)))) if expected.size else 0.0
        np.testing.assert_allclose(arrays_two[name], expected, rtol=0, atol=atol, err_msg=name)


def test_an_output_process_0_refuses_stops_every_process(tmp_path, tiny_model_dir):
    """Process 0 alone looks at the output; when it refuses it, it tells the others, and
    both stop with one line and exit status 2 (no process waits for the other)."""
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not a jaxlin run")
    data = tiny_run_config(tmp_path, tiny_model_dir("gemma3_sliding"), output_dir=str(foreign))
    (zero, one) = run_processes(process_configs(tmp_path, data, 2), devices=1)
    assert zero[0] == 2 and one[0] == 2, (zero, one)
    assert zero[2].strip().splitlines()[-1].startswith("jaxlin: error: output_dir:"), zero[2]
    assert one[2].strip().splitlines()[-1] == (
        f"jaxlin: error: output_dir: process 0 could not claim {foreign} (see its message)"
    )
    assert [p.name for p in foreign.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"processes": 2, "process_id": 0}, "distributed: coordinator required"),
        ({"coordinator": "localhost:1234"}, "distributed: processes, process_id required"),
        ({"coordinator": "h:1", "processes": 2, "process_id": 2}, "process_id 2 is not below processes 2"),
        ({"coordinator": "localhost", "processes": 2, "process_id": 0}, "is not host:port"),
        ({"coordinator": "h:70000", "processes": 2, "process_id": 0}, "is not host:port"),
        ({"auto": True, "processes": 0}, "distributed.processes: Input should be greater than or equal to 1"),
        ({"auto": "yes"}, "distributed.auto: Input should be a valid boolean"),
        ({"auto": True, "hosts": 2}, "distributed.hosts: unknown key"),
    ],
)
def test_a_bad_distributed_section_is_refused_by_name(section, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_run_config({"text": "hi", "distributed": section})


def test_a_distributed_section_is_optional_and_auto_needs_nothing_else():
    assert parse_run_config({"text": "hi"}).distributed is None
    auto = parse_run_config({"text": "hi", "distributed": {"auto": True}}).distributed
    assert auto is not None and auto.coordinator is None and auto.processes is None


def test_one_process_writes_and_reads_its_arrays_as_they_are():
    assert is_writer() and agree(True) and not agree(False)
    tree = {"a": jax.numpy.arange(3.0), "b": (np.ones(2, np.float32),)}
    host = to_host(tree, np.float64)
    assert isinstance(host["a"], np.ndarray) and host["b"][0].dtype == np.float64
    np.testing.assert_array_equal(host["a"], [0.0, 1.0, 2.0])


def test_a_coordinator_in_the_environment_without_a_process_count_is_one_line(tmp_path, tiny_model_dir):
    """JAX_COORDINATOR_ADDRESS asks for a distributed run; outside a cluster JAX cannot
    tell how many processes take part, which is a bad request: one line, nothing written."""
    data = tiny_run_config(tmp_path, tiny_model_dir("gemma3_sliding"))
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SLURM_", "OMPI_", "KUBERNETES_"))
    }
    env["JAX_COORDINATOR_ADDRESS"] = f"localhost:{free_port()}"
    command = [sys.executable, "-m", "jaxlin.cli", "run", str(write_config(tmp_path / "run.yaml", **data))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        "jaxlin: error: JAX_COORDINATOR_ADDRESS (set in the environment): "
        "jax.distributed.initialize failed: Number of processes must be defined."
    ]
    assert not (tmp_path / "run").exists()


def test_a_process_other_than_the_writer_touches_no_file(tmp_path, monkeypatch):
    """The writer rule in `jaxlin.outputs`, in-process: a claim that checks, creates and
    locks nothing, writes whose content is not even rendered, no directory made."""
    monkeypatch.setattr(outputs, "is_writer", lambda: False)
    monkeypatch.setattr(outputs, "agree", lambda flag: flag)  # process 0 claimed it
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not a jaxlin run")
    rendered = []
    with outputs.claim_output(foreign, "many", overwrite=False) as claim:
        assert claim.target == foreign and not claim.resume
        outputs.make_directory(foreign / "prompts")
        outputs.write_file_atomic(foreign / "figure.png", rendered.append)
        with outputs.staged_directory(tmp_path / "run", "single") as staging:
            outputs.write_json_atomic(staging / "summary.json", {"a": 1})
    assert rendered == []
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mine.txt", "notes"]


def test_the_writer_tells_the_others_when_it_refuses_the_output(tmp_path, monkeypatch):
    told = []
    monkeypatch.setattr(outputs, "agree", lambda flag: told.append(flag) or flag)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("not a jaxlin run")
    with (
        pytest.raises(outputs.OutputError, match="is a directory that is not a jaxlin run"),
        outputs.claim_output(tmp_path / "notes", "single", overwrite=False),
    ):
        pass
    with outputs.claim_output(tmp_path / "run", "single", overwrite=False):
        pass
    assert told == [False, True]
    # A process other than the writer, told that process 0 refused: one line naming it.
    monkeypatch.setattr(outputs, "is_writer", lambda: False)
    monkeypatch.setattr(outputs, "agree", lambda flag: False)
    with (
        pytest.raises(outputs.OutputError, match="process 0 could not claim"),
        outputs.claim_output(tmp_path / "run", "single", overwrite=False),
    ):
        pass


def test_several_processes_do_not_resume_an_unfinished_output(tmp_path, monkeypatch):
    """Only process 0 could see which prompts an earlier run completed, so a run of
    several processes refuses to resume rather than let the processes diverge."""
    with outputs.claim_output(tmp_path / "many", "many", overwrite=False):
        outputs.make_directory(tmp_path / "many" / "prompts")
    with outputs.claim_output(tmp_path / "many", "many", overwrite=False) as claim:
        assert claim.resume  # one process resumes it
    monkeypatch.setattr(outputs, "several_processes", lambda: True)
    with (
        pytest.raises(outputs.OutputError, match="a run of several processes cannot resume"),
        outputs.claim_output(tmp_path / "many", "many", overwrite=False),
    ):
        pass
    assert outputs.run_kind(tmp_path / "many") == "many"  # left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many"]


# Process `argv[2]` of the run sees a device with no free memory, the others as it is.
SHORT_OF_MEMORY = """
import sys
from jaxlin import memory
from jaxlin.cli import main
config, short = sys.argv[1], sys.argv[2] == "1"
if short:
    memory.available_bytes = lambda: 2**20
sys.exit(main(["run", config, "--quiet"]))
"""


def test_a_process_short_of_memory_stops_every_process(tmp_path, tiny_model_dir):
    """Each process checks its own device's memory before the analysis; when only process
    1's check fails, both exit with one line and status 2 — process 0 naming process 1 —
    instead of process 0 waiting for it in the first collective."""
    import time

    data = tiny_run_config(tmp_path, tiny_model_dir("gemma3_sliding"))
    data["analysis"]["ordinary_jacobian"] = False
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    configs = process_configs(tmp_path, data, 2)
    start = time.monotonic()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", SHORT_OF_MEMORY, str(config), str(index)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for index, config in enumerate(configs)
    ]
    try:
        (zero, one) = [(p.communicate(timeout=180)[1], p.returncode)[::-1] for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert zero[0] == 2 and one[0] == 2, (zero, one)
    assert one[1].strip().splitlines()[-1].startswith("jaxlin: error: the analysis of "), one[1]
    assert "(compiled programs' plan)" in one[1]
    assert zero[1].strip().splitlines()[-1].startswith("jaxlin: error: process 1 of 2: the analysis of"), zero
    assert time.monotonic() - start < 120
    assert not (tmp_path / "run").exists()
