"""The decoder as a Flax module: embed → scanned blocks → final norm → unembed."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlin._config import ModelConfig, Positions
from jaxlin._layers import PRECISION, DecoderBlock, Dense, Embed, make_norm, rope_tables, softcap
from jaxlin._policy import FreezePolicy
from jaxlin.mesh import split_tokens


class Transformer(nn.Module):
    """The map analysed is `__call__`: input embeddings X (N, d), the rows looked up by
    `embed` *before* any embedding scale, → final-normed hidden states (N, d). Gemma's
    sqrt(d) scale is applied inside, so J is taken w.r.t. the raw embedding rows (the
    per-token contribution J_t·x_t is the same either way)."""

    config: ModelConfig
    policy: FreezePolicy = FreezePolicy.DETACHED
    dtype: jnp.dtype = jnp.float32
    # Query chunk size of the O(N)-memory attention (detached policy); None: dense.
    attention_chunk: int | None = None

    def setup(self) -> None:
        cfg = self.config
        self.embedder = Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        if cfg.positions is Positions.LEARNED:
            self.position_embedder = Embed(
                cfg.max_positions, cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype
            )
        # Stacked layer params and one scanned block: compile time and memory stay flat
        # in depth, and per-layer differences (sliding or not) ride along as data.
        scanned = nn.scan(
            DecoderBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, 0),
            length=cfg.num_layers,
        )
        self.layers = scanned(cfg, self.policy, self.dtype, self.attention_chunk)
        self.final_norm = make_norm(cfg, self.policy, self.dtype, "final_norm")
        if not cfg.tie_word_embeddings:
            self.lm_head = Dense(
                cfg.vocab_size,
                use_bias=False,
                precision=PRECISION,
                dtype=self.dtype,
                param_dtype=self.dtype,
            )

    def embed(self, token_ids: jax.Array) -> jax.Array:
        """The input X of the analysed map. With learned absolute positions (GPT-2) it is
        token + position embedding, the sum the first block sees: J is taken w.r.t. that
        sum, so Σ_t J_t·x_t (+ bias term) reconstructs y exactly."""
        rows = self.embedder(token_ids)
        if self.config.positions is Positions.LEARNED:
            rows = rows + self.position_embedder(jnp.arange(token_ids.shape[0]))
        return rows

    def __call__(self, embeddings: jax.Array) -> jax.Array:
        h, _ = self.blocks(self.scale_embeddings(embeddings))
        return self.final_norm(h)

    def scale_embeddings(self, embeddings: jax.Array) -> jax.Array:
        """X → the first block's input (Gemma's √d scale; a no-op elsewhere)."""
        h = split_tokens(embeddings.astype(self.dtype))
        if self.config.embedding_scale is not None:
            # Cast the scale to the param dtype first, as the reference does.
            h = h * jnp.asarray(self.config.embedding_scale, dtype=self.dtype)
        return h

    def normalize(self, h: jax.Array) -> jax.Array:
        """The final norm alone (for logit-lens taps)."""
        return self.final_norm(h)

    def blocks(
        self, h: jax.Array, is_sliding: jax.Array | None = None, through: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Residual stream in → out through every layer of this (possibly truncated)
        model, with each layer's residual, attention and MLP outputs stacked as taps.
        `is_sliding` overrides the config's per-layer flags (a layer picked at run time).
        With `through` (a layer index, data) only layers 0 … through run: the taps up to
        it are exact, the later layers pass the stream through and tap zeros."""
        cfg = self.config
        n = h.shape[0]
        rope = {}
        if cfg.positions is Positions.ROPE:
            rope["global"] = rope_tables(cfg.rope, cfg.rotary_dim, n, self.dtype)
            if cfg.rope_sliding is not None:
                rope["sliding"] = rope_tables(cfg.rope_sliding, cfg.rotary_dim, n, self.dtype)
        if is_sliding is None:
            is_sliding = jnp.asarray(cfg.layer_is_sliding)
        active = None if through is None else jnp.arange(cfg.num_layers) <= through
        return self.layers(h, is_sliding, rope, active)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Unembedding (outside the analysed map) with the final softcap if configured."""
        if self.config.tie_word_embeddings:
            z = self.embedder.attend(hidden)
        else:
            z = self.lm_head(hidden)
        return softcap(z, self.config.final_logit_softcap, self.policy)

    def embed_and_decode(self, token_ids: jax.Array) -> jax.Array:
        """Token ids → logits; touches every parameter (used to derive param shapes)."""
        return self.logits(self(self.embed(token_ids)))
