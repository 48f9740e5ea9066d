"""The freezing policy: the single place where the detached Jacobian is defined.

Every block that owns an input-dependent coefficient (a norm's inverse RMS, an
activation gate, attention probabilities, a softcap's tanh ratio) passes that
coefficient through `policy.freeze`. Under `DETACHED` it becomes a constant for
differentiation (its value is unchanged), so the network is, for the one input it
was evaluated at, a linear map of its input embeddings. Under `ORDINARY` nothing is
frozen and derivatives are the usual ones.
"""

from __future__ import annotations

import enum

import jax
from jax.ad_checkpoint import checkpoint_name

# The name every frozen coefficient carries: what a detached linearization must keep,
# and all it keeps besides the weights (`jax.checkpoint_policies.save_only_these_names`).
FROZEN = "frozen"


class FreezePolicy(enum.Enum):
    DETACHED = "detached"
    ORDINARY = "ordinary"

    def freeze(self, coefficient: jax.Array) -> jax.Array:
        """`coefficient` as a constant of differentiation under DETACHED, as-is otherwise."""
        if self is FreezePolicy.DETACHED:
            return checkpoint_name(jax.lax.stop_gradient(coefficient), FROZEN)
        return coefficient
