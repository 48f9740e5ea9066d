"""Many devices: the batches of vectors pushed through the operator are split along the
mesh's `data` axis.

Every exact analysis in jaxlin is a batch of independent products through one
linearization — the d basis vectors behind J's rows, the N per-token tangents, the k
Ritz vectors of the residual bounds. Under a `jaxlin.mesh` mesh (data × fsdp × tensor),
each such batch is split across the `data` axis's devices; the parameters are placed by
`jaxlin.mesh.place_params` (split along fsdp and tensor, replicated along data):

    with jax.set_mesh(jaxlin.devices.batch_mesh()):   # every device on `data`
        sigma = per_token_top_k(linearize(params, X, config), jnp.eye(d), 4)[1]

Without a mesh (or with one lacking a `data` axis) nothing is split. The sequential
Lanczos iteration of the whole-J `top_k` has no batch to split and runs on the whole
mesh as the partitioner places it. Placement is left to XLA's partitioner through
sharding constraints, so the code is the same for any backend; a mesh with an axis that
is not of type Auto is refused. Batched LAPACK calls (the per-token eigendecompositions)
go through `map_matrices`: jaxlib 0.10's CPU kernels split a batch over the intra-op
thread pool and block until it is done, which deadlocks once every pool thread runs such
a call — as it does when each of several host devices decomposes its share at the same
time. Tested on
1 device in-process and on 2 and 4 forced host CPU devices in a subprocess
(tests/test_devices.py), and on 8 with sharded parameters (tests/test_mesh.py); not yet
on several GPUs or TPUs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlin.mesh import DATA_AXIS, SEQUENCE_AXIS, VECTORS_SPEC, make_mesh


def batch_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The jaxlin mesh with every one of `devices` (default: all) on the `data` axis:
    parameters replicated, batches split."""
    devices = list(devices) if devices is not None else jax.devices()
    return make_mesh({DATA_AXIS: len(devices)}, devices)


def _batch_axis_size() -> int | None:
    """Devices along the ambient mesh's `data` axis, or None when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    if any(kind != AxisType.Auto for kind in mesh.axis_types):
        # The parameters' shardings and jaxlin's constraints are hints to the partitioner.
        raise ValueError("jaxlin shards along mesh axes of type Auto (see jaxlin.mesh.make_mesh())")
    return mesh.shape[DATA_AXIS] if DATA_AXIS in mesh.axis_names else None


def replicated(tree: Any) -> Any:
    """`tree` (e.g. an input loaded onto one device) copied to every device of the
    ambient mesh: a jitted program under a mesh refuses arguments committed elsewhere.
    Parameters are placed by `jaxlin.mesh.place_params` instead (split by the rules)."""
    mesh = jax.sharding.get_mesh()
    if mesh.empty:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def batch_devices() -> int:
    """How many devices the ambient mesh splits batches across (1 without a mesh)."""
    return _batch_axis_size() or 1


def _padded(leaf: jax.Array, rows: int) -> jax.Array:
    """`leaf` grown to `rows` rows by repeating row 0 (always a valid input; callers drop
    the padding from the results)."""
    filler = jnp.broadcast_to(leaf[:1], (rows - leaf.shape[0], *leaf.shape[1:]))
    return jnp.concatenate([leaf, filler])


def _matrix_axes() -> tuple[str, ...]:
    """The ambient mesh's axes a batch of matrices is split along: `data`, and `sequence`
    where there is one (a per-token batch comes split by token)."""
    _batch_axis_size()  # refuses a mesh whose axes are not Auto
    mesh = jax.sharding.get_abstract_mesh()
    present = dict(mesh.shape) if not mesh.empty else {}
    return tuple(axis for axis in (DATA_AXIS, SEQUENCE_AXIS) if present.get(axis, 1) > 1)


def map_matrices(fn: Callable[[jax.Array], Any], matrices: jax.Array) -> Any:
    """`jax.vmap(fn)(matrices)` for a LAPACK-backed `fn` (eigh, svd, qr) over a batch of
    matrices; under a mesh with a `data` or `sequence` axis the batch is split across
    their devices.

    On CPU each device decomposes its matrices one at a time: a batch of one runs inline,
    whereas a larger batch is fanned out over the intra-op thread pool that the devices'
    own executions occupy (jaxlib 0.10), and with as many devices as pool threads every
    thread then waits for work none is free to run. A batch the partitioner splits along
    the sequence axis on its own (the per-token matrices) would do just that, hence the
    sequence axis here too."""
    axes = _matrix_axes()
    if not axes:
        return jax.vmap(fn)(matrices)
    mesh = jax.sharding.get_abstract_mesh()
    devices = math.prod(mesh.shape[axis] for axis in axes)
    local = (lambda block: jax.lax.map(fn, block)) if jax.default_backend() == "cpu" else jax.vmap(fn)
    total = matrices.shape[0]
    spec = PartitionSpec(axes)
    split = jax.shard_map(local, in_specs=spec, out_specs=spec, check_vma=False)
    out = split(_padded(matrices, -(-total // devices) * devices))
    return jax.tree_util.tree_map(lambda leaf: leaf[:total], out)


def map_in_batches(fn: Callable[[Any], Any], xs: Any, chunk: int | None) -> Any:
    """`jax.lax.map(fn, xs, batch_size=chunk)`: `chunk` vectors through `fn` at a time
    (a run's `analysis.chunk`; None: all at once), each chunk split across the ambient mesh's `data` axis
    (rounded up to a multiple of its size)."""
    devices = _batch_axis_size()
    if devices is None:
        # `lax.map` without a batch size runs one vector at a time: all at once is a vmap.
        return jax.vmap(fn)(xs) if chunk is None else jax.lax.map(fn, xs, batch_size=chunk)
    total = jax.tree_util.tree_leaves(xs)[0].shape[0]
    size = min(total, chunk or total)
    size = -(-size // devices) * devices
    padded = -(-total // size) * size

    def one_batch(batch: Any) -> Any:
        batch = jax.tree_util.tree_map(
            lambda leaf: jax.lax.with_sharding_constraint(leaf, VECTORS_SPEC), batch
        )
        return jax.vmap(fn)(batch)

    def split(leaf: jax.Array) -> jax.Array:
        return _padded(leaf, padded).reshape(padded // size, size, *leaf.shape[1:])

    out = jax.lax.map(one_batch, jax.tree_util.tree_map(split, xs))
    return jax.tree_util.tree_map(lambda leaf: leaf.reshape(padded, *leaf.shape[2:])[:total], out)
