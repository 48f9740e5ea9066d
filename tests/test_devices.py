"""Many devices: under a "batch" mesh the batched products are split across its devices
(`jaxlin.devices`) and give the same numbers as without one.

In-process, on the devices this process has (one here). Split across several forced host
CPU devices (`--xla_force_host_platform_device_count` 2 or 4), the sharded programs hang
inside XLA on this 2-core machine (the same analyses without the mesh finish), so
multi-device runs are not tested here (see the issue note)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from converters.hf import load_hf_model
from jaxlin import model as model_fns
from jaxlin.devices import batch_mesh, map_in_batches
from jaxlin.layers import layer_gram
from jaxlin.operator import contributions, materialize
from jaxlin.spectral import lanczos_top_k, per_token_top_k


def test_map_in_batches_under_a_mesh_is_lax_map():
    xs = jnp.arange(7 * 3, dtype=jnp.float64).reshape(7, 3)
    fn = lambda v: jnp.sin(v) * jnp.sum(v)  # noqa: E731
    expected = jax.lax.map(fn, xs, batch_size=3)
    with jax.set_mesh(batch_mesh()):
        # 7 rows in batches of 3 (rounded up to the mesh size): padding must be dropped.
        split = jax.jit(lambda x: map_in_batches(fn, x, 3))(xs)
        pytree = jax.jit(lambda x: map_in_batches(lambda t: t[0] * t[1], (x, 2 * x), None))(xs)
    np.testing.assert_array_equal(split, expected)
    np.testing.assert_array_equal(pytree, 2 * xs * xs)


def test_analyses_under_a_batch_mesh_match(tiny_model_dir):
    model = load_hf_model(tiny_model_dir("gemma3_sliding"), jnp.float64)
    config, params = model.config, model.params
    ids = np.random.default_rng(3).integers(0, 128, size=11)
    x = model_fns.embed(config, params, jnp.asarray(ids))
    d = config.hidden_size

    def analyses() -> dict[str, jax.Array]:
        return {
            # chunk 6 does not divide d
            "materialize": materialize(params, x, config, chunk=6),
            "contributions": contributions(params, x, config, chunk=6)[1],
            "per_token_sigma": per_token_top_k(params, x, jnp.eye(d), config, 3, chunk=8)[1],
            "top_k_sigma": lanczos_top_k(params, x, jax.random.key(0), config, 3, 12)[1],
            "layer_gram": layer_gram(params, x, jnp.asarray(1), config, "mlp", True, False, 2, 5).eigenvalues,
        }

    single = analyses()
    with jax.set_mesh(batch_mesh()):
        split = analyses()
    for name, value in single.items():
        scale = float(jnp.max(jnp.abs(value)))
        np.testing.assert_allclose(split[name], value, rtol=0, atol=1e-12 * scale, err_msg=name)


def test_a_mesh_without_auto_batch_axis_is_refused():
    mesh = jax.make_mesh((1,), ("batch",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="Auto"):
        jax.jit(lambda x: map_in_batches(lambda v: v * 2, x, 2))(jnp.ones((4, 3)))
