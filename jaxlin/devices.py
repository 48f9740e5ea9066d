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
same for any backend. Status: the numbers under a one-device mesh equal those without
(tests/test_devices.py); with several forced host CPU devices
(`--xla_force_host_platform_device_count`) the sharded programs hang inside XLA on the
2-core development machine, so multi-device execution is not yet verified anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, PartitionSpec

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
        # Padding rows repeat row 0 (always a valid input) and are dropped below.
        filler = jnp.broadcast_to(leaf[:1], (padded - total, *leaf.shape[1:]))
        return jnp.concatenate([leaf, filler]).reshape(padded // size, size, *leaf.shape[1:])

    out = jax.lax.map(one_batch, jax.tree_util.tree_map(split, xs))
    return jax.tree_util.tree_map(lambda leaf: leaf.reshape(padded, *leaf.shape[2:])[:total], out)
