"""jaxlin: exact equivalent linear maps (detached Jacobians) of decoder LLMs, in JAX.

The public API; everything else is internal. Names are imported on first use (PEP 562),
so that `import jaxlin.cli` does not import JAX: the program takes over Ctrl-C before the
seconds that importing JAX costs.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name → the module that defines it
_PUBLIC: dict[str, str] = {
    "ModelConfig": "jaxlin._config",
    "RopeConfig": "jaxlin._config",
    "FreezePolicy": "jaxlin._policy",
    "JaxlinError": "jaxlin.errors",
    "DetachedJacobian": "jaxlin.jacobian",
    "Products": "jaxlin.jacobian",
    "linearize": "jaxlin.jacobian",
    "LoadedModel": "jaxlin.loading",
    "load_model": "jaxlin.loading",
    "Model": "jaxlin.model",
    "Tap": "jaxlin.model",
    "embed": "jaxlin.model",
    "final_hidden": "jaxlin.model",
    "logits": "jaxlin.model",
    "tap_input": "jaxlin.model",
    "tap_values": "jaxlin.model",
    "Certificate": "jaxlin.operator",
    "certify": "jaxlin.operator",
    "contributions": "jaxlin.operator",
    "rows": "jaxlin.operator",
    "token_jacobian": "jaxlin.operator",
    "Triplets": "jaxlin.spectral",
    "frobenius_estimate": "jaxlin.spectral",
    "krylov_basis": "jaxlin.spectral",
    "per_token_from_rows": "jaxlin.spectral",
    "per_token_top_k": "jaxlin.spectral",
    "rows_top_k": "jaxlin.spectral",
    "top_k": "jaxlin.spectral",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'jaxlin' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
