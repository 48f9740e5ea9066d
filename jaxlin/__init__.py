"""jaxlin: exact equivalent linear maps (detached Jacobians) of decoder LLMs, in JAX.

The public API; everything else is internal.
"""

from jaxlin._config import ModelConfig, RopeConfig
from jaxlin._policy import FreezePolicy
from jaxlin.errors import JaxlinError
from jaxlin.jacobian import DetachedJacobian, Products, linearize
from jaxlin.loading import LoadedModel, load_model
from jaxlin.model import Model, Tap, embed, final_hidden, logits, tap_input, tap_values
from jaxlin.operator import Certificate, certify, contributions, rows, token_block
from jaxlin.spectral import (
    Triplets,
    frobenius_estimate,
    krylov_basis,
    per_token_from_rows,
    per_token_top_k,
    rows_top_k,
    top_k,
)

__all__ = [
    "Certificate",
    "FreezePolicy",
    "JaxlinError",
    "DetachedJacobian",
    "LoadedModel",
    "Model",
    "ModelConfig",
    "Products",
    "RopeConfig",
    "Tap",
    "Triplets",
    "certify",
    "contributions",
    "embed",
    "final_hidden",
    "frobenius_estimate",
    "krylov_basis",
    "linearize",
    "load_model",
    "logits",
    "rows",
    "rows_top_k",
    "per_token_from_rows",
    "per_token_top_k",
    "tap_input",
    "tap_values",
    "token_block",
    "top_k",
]
