"""Many processes (one per host, or several on one host): `jax.distributed`.

A run over several processes is one SPMD program: every process loads the same model,
runs the same code on the same input and takes part in every computation, which spans
the devices of all processes (`jax.devices()` is global once `jax.distributed` is
initialized, and the run's mesh is built from it). Three rules make that work:

- `initialize(section)` starts `jax.distributed` when the run config's `distributed:`
  section asks for it, or when the environment does (JAX's own `JAX_COORDINATOR_ADDRESS`),
  once and before any device is touched.
- `to_host(value)` is the one way a result leaves the devices: an array split over the
  devices of several processes cannot be read by one of them, so its shards are gathered
  first (a collective: every process calls it at the same point, which it does because
  every process runs the same code).
- `is_writer()`: only process 0 claims the output, writes files and prints progress;
  the others compute and write nothing (`jaxlin.outputs`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlin.errors import JaxlinError

if TYPE_CHECKING:
    from jaxlin.run_config import DistributedSection

# JAX's own variable (read by `jax.distributed.initialize`): a launcher that sets it asks
# for a distributed run.
COORDINATOR_VARIABLE = "JAX_COORDINATOR_ADDRESS"


class DistributedError(JaxlinError):
    pass


def requested(section: DistributedSection | None) -> bool:
    """Whether this run is distributed: the config's section, or the environment."""
    return section is not None or bool(os.environ.get(COORDINATOR_VARIABLE))


def initialize(section: DistributedSection | None) -> None:
    """Start `jax.distributed` when requested (a no-op otherwise, and when it already
    runs). Values the section leaves out are JAX's to find: `JAX_COORDINATOR_ADDRESS`, and
    with `auto: true` (or without a section) its cluster detection (Slurm, Open MPI, Cloud
    TPU, Kubernetes)."""
    if not requested(section) or jax.distributed.is_initialized():
        return
    # A cross-process program on CPU needs a collectives implementation; gloo (TCP) needs
    # nothing installed and is what makes a localhost run of several processes work. Set
    # here rather than relying on JAX's default, which has changed between releases.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    detect = section is None or section.auto
    try:
        jax.distributed.initialize(
            coordinator_address=section.coordinator if section is not None else None,
            num_processes=section.processes if section is not None else None,
            process_id=section.process_id if section is not None else None,
            cluster_detection_method=None if detect else "deactivate",
            initialization_timeout=section.timeout if section is not None else 300,
        )
    except (RuntimeError, ValueError, TypeError) as error:
        # JAX's own message names what is missing or wrong (e.g. the number of processes).
        asked = "distributed" if section is not None else f"{COORDINATOR_VARIABLE} (set in the environment)"
        raise DistributedError(f"{asked}: jax.distributed.initialize failed: {error}") from None


def is_writer() -> bool:
    """Whether this process writes the run's files and prints its progress: process 0 of a
    distributed run, or the only process. Does not start JAX's backends (it may be asked
    before `initialize`)."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def several_processes() -> bool:
    """Whether this run spans more than one process."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def agree(flag: bool) -> bool:
    """Process 0's `flag`, in every process (each passes its own; a collective in a run of
    several processes, the flag itself otherwise): how the writer tells the others whether
    a step that only it performs (claiming the output) succeeded."""
    if not several_processes():
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def from_every_process(values: Sequence[int]) -> np.ndarray:
    """Each process's `values` (the same count of int32 numbers in each), one row per
    process in process order, in every process: how the processes learn each other's
    verdict on a step each decides alone (whether its memory suffices). A collective in a
    run of several processes, so every process calls it at the same point; one row
    otherwise."""
    row = np.asarray(values, np.int32)
    if not several_processes():
        return row[None]
    return np.asarray(multihost_utils.process_allgather(row)).reshape(jax.process_count(), row.size)


def _leaf_to_host(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and not leaf.is_fully_replicated:
        # Split over other processes' devices too: gather the shards (into every process).
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)


def to_host(value: Any, dtype: Any = None) -> Any:
    """`np.asarray(value, dtype)` for an array or a pytree of arrays, also when an array is
    split over several processes' devices. In a distributed run every process must call
    it at the same point (the gather is a collective)."""
    host = jax.tree_util.tree_map(_leaf_to_host, value)
    if dtype is None:
        return host
    return jax.tree_util.tree_map(lambda leaf: leaf.astype(dtype, copy=False), host)
