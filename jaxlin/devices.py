"""Many devices: the batches of vectors pushed through the operator are the parallel axis.

Every exact analysis in jaxlin is a batch of independent products through one
linearization — the d basis vectors behind J's rows, the N per-token tangents, the k
Ritz vectors of the residual bounds. Under a mesh with a "batch" axis, each such batch is
split across that axis's devices, while the parameters, the input and the linearization
are replicated (the products are the work; the model fits on one device):

    with jax.set_mesh(jaxlin.devices.batch_mesh()):
        rows = per_token_top_k(params, X, jnp.eye(d), config, k=4)

Without a mesh (or with one lacking a "batch" axis) nothing changes. The sequential
Lanczos iteration of the whole-J `top_k` has no batch to split and runs replicated.
Placement is left to XLA's partitioner through sharding constraints, so the code is the
same for any backend. Batched LAPACK calls (the per-token eigendecompositions) go through
`map_matrices`: jaxlib 0.10's CPU kernels split a batch over the intra-op thread pool and
block until it is done, which deadlocks once every pool thread runs such a call — as it
does when each of several host devices decomposes its share at the same time. Tested on
1 device in-process and on 2 and 4 forced host CPU devices in a subprocess
(tests/test_devices.py); not yet on several GPUs or TPUs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"


def batch_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named "batch" over `devices` (default: all), with automatic axis type
    so that jaxlin's sharding constraints are hints to the partitioner."""
    devices = list(devices) if devices is not None else jax.devices()
    return jax.make_mesh((len(devices),), (BATCH_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def _batch_axis_size() -> int | None:
    """Devices along the ambient mesh's "batch" axis, or None when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or BATCH_AXIS not in mesh.axis_names:
        return None
    if mesh.axis_types[mesh.axis_names.index(BATCH_AXIS)] != AxisType.Auto:
        raise ValueError(f"jaxlin shards along a mesh axis {BATCH_AXIS!r} of type Auto (see batch_mesh())")
    return mesh.shape[BATCH_AXIS]


def replicated(tree: Any) -> Any:
    """`tree` (e.g. parameters loaded onto one device) copied to every device of the
    ambient mesh: a jitted program under a mesh refuses arguments committed elsewhere."""
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


def map_matrices(fn: Callable[[jax.Array], Any], matrices: jax.Array) -> Any:
    """`jax.vmap(fn)(matrices)` for a LAPACK-backed `fn` (eigh, svd, qr) over a batch of
    matrices; under a "batch" mesh the batch is split across its devices.

    On CPU each device decomposes its matrices one at a time: a batch of one runs inline,
    whereas a larger batch is fanned out over the intra-op thread pool that the devices'
    own executions occupy (jaxlib 0.10), and with as many devices as pool threads every
    thread then waits for work none is free to run."""
    devices = _batch_axis_size()
    if devices is None or devices == 1:
        return jax.vmap(fn)(matrices)
    local = (lambda block: jax.lax.map(fn, block)) if jax.default_backend() == "cpu" else jax.vmap(fn)
    total = matrices.shape[0]
    split = jax.shard_map(
        local, in_specs=PartitionSpec(BATCH_AXIS), out_specs=PartitionSpec(BATCH_AXIS), check_vma=False
    )
    out = split(_padded(matrices, -(-total // devices) * devices))
    return jax.tree_util.tree_map(lambda leaf: leaf[:total], out)


def map_in_batches(fn: Callable[[Any], Any], xs: Any, batch_size: int | None) -> Any:
    """`jax.lax.map(fn, xs, batch_size=batch_size)`, with each batch split across the
    ambient mesh's "batch" axis (batches are rounded up to a multiple of its size)."""
    devices = _batch_axis_size()
    if devices is None:
        return jax.lax.map(fn, xs, batch_size=batch_size)
    total = jax.tree_util.tree_leaves(xs)[0].shape[0]
    size = min(total, batch_size or total)
    size = -(-size // devices) * devices
    padded = -(-total // size) * size

    def one_batch(batch: Any) -> Any:
        batch = jax.tree_util.tree_map(
            lambda leaf: jax.lax.with_sharding_constraint(leaf, PartitionSpec(BATCH_AXIS)), batch
        )
        return jax.vmap(fn)(batch)

    def split(leaf: jax.Array) -> jax.Array:
        return _padded(leaf, padded).reshape(padded // size, size, *leaf.shape[1:])

    out = jax.lax.map(one_batch, jax.tree_util.tree_map(split, xs))
    return jax.tree_util.tree_map(lambda leaf: leaf.reshape(padded, *leaf.shape[2:])[:total], out)
