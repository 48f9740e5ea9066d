"""Which Krylov method for the whole-J top-k — measured, not argued: at equal numbers
of products (J·v + Jᵀ·u) on the same linearization,

- **tridiag**: symmetric Lanczos on the d-sized side J·Jᵀ (`spectral.lanczos_top_k`,
  what jaxlin uses), Krylov basis depth × d;
- **bidiag**: Golub–Kahan bidiagonalization of J itself (matfree `decomp.bidiag`, full
  reorthogonalization, `eig`-free SVD of the small bidiagonal), Krylov bases depth × d
  *and* depth × N·d;
- **block**: block Lanczos on J·Jᵀ with b vectors per step (batched products, full
  reorthogonalization, Rayleigh–Ritz on the whole block Krylov space), q = depth / b.

Reported: time (one core, median), max relative error of the top-k σ against the dense
reference of `whole_j_topk.py` (`results/.whole_j_reference_N*.npz`, computed there if
missing), and the Krylov basis size in bytes (float32).

    taskset -c 1 python benchmarks/krylov_choice.py [--quick] [--n 256] [--depth 48]
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
from matfree import decomp
from whole_j_topk import reference

from jaxlin import spectral
from jaxlin.jacobian import linearize


def bidiag_top_k(config: Any, params: Any, x: jax.Array, key: jax.Array, k: int, depth: int) -> jax.Array:
    op = linearize(params, x, config)
    start = jax.random.normal(key, x.shape, x.dtype)
    _, small, _, _ = decomp.bidiag(depth, reortho="full")(op.matvec, start)
    return jnp.linalg.svd(small, compute_uv=False)[:k]


def block_top_k(
    config: Any, params: Any, x: jax.Array, key: jax.Array, k: int, block: int, steps: int
) -> jax.Array:
    op = linearize(params, x, config)
    d = op.output.shape[0]
    gram = jax.vmap(lambda u: op.matvec(op.rmatvec(u)))  # (b, d) → (b, d), one batched pass each way
    first, _ = jnp.linalg.qr(jax.random.normal(key, (d, block), x.dtype))
    bases = jnp.zeros((steps, d, block), x.dtype)
    images = jnp.zeros((steps, d, block), x.dtype)

    def step(j: int, carry: tuple) -> tuple:
        bases, images, current = carry
        image = gram(current.T).T
        bases, images = bases.at[j].set(current), images.at[j].set(image)
        flat = bases.transpose(1, 0, 2).reshape(d, steps * block)
        nxt = image - flat @ (flat.T @ image)
        nxt = nxt - flat @ (flat.T @ nxt)  # twice is enough (Kahan)
        return bases, images, jnp.linalg.qr(nxt)[0]

    bases, images, _ = jax.lax.fori_loop(0, steps, step, (bases, images, first))
    flat = bases.transpose(1, 0, 2).reshape(d, steps * block)
    projected = flat.T @ images.transpose(1, 0, 2).reshape(d, steps * block)
    eigenvalues = jnp.linalg.eigvalsh((projected + projected.T) / 2)[::-1][:k]
    return jnp.sqrt(jnp.maximum(eigenvalues, 0.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 16, depth 16, smoke run")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--depth", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model = C.load_model()
    config, params = model.config, model.params
    n, depth, k = (16, 16, 8) if args.quick else (args.n, args.depth, 8)
    x = C.embeddings(model, n)
    s_ref, _, _ = reference(model, x, n, k)
    key = jax.random.key(0)
    d, item = config.hidden_size, 4
    bidiag = jax.jit(functools.partial(bidiag_top_k, config, k=k, depth=depth))
    methods = {
        "tridiag (jaxlin)": (
            lambda: spectral.lanczos_top_k(linearize(params, x, config), key, k, depth)[1],
            depth * d * item,
        ),
        "bidiag (matfree)": (lambda: bidiag(params, x, key), depth * (d + n * d) * item),
    }
    for block in (8, 16):
        fn = jax.jit(functools.partial(block_top_k, config, k=k, block=block, steps=depth // block))
        methods[f"block b={block}, q={depth // block}"] = (lambda fn=fn: fn(params, x, key), depth * d * item)
    rows = []
    for name, (fn, basis_bytes) in methods.items():
        timing = C.time_repeats(fn, args.repeats)
        sigma = np.asarray(fn(), np.float64)
        row = {
            "method": name,
            "products": 2 * depth,
            "median_s": timing["median_s"],
            "first_call_s": timing["first_call_s"],
            "max_rel_sigma_error": float(np.max(np.abs(sigma - s_ref) / s_ref)),
            "krylov_basis_MB": basis_bytes / 1e6,
        }
        print(row, flush=True)
        rows.append(row)
    C.report("krylov_choice", rows, args.quick, N=n, depth=depth, k=k)


if __name__ == "__main__":
    main()
