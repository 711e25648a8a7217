"""Next-token sampling as small pytrees: ``Greedy()`` or ``TopP(temperature, top_p)`` (HF's warpers' order).

A sampler is an argument of the jitted decode loop: its class is part of the program (greedy and sampling
compile separately), its numbers are traced (a new temperature does not recompile).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from vlmprune import checks


@flax.struct.dataclass
class Greedy:
    """The most likely token."""

    def __call__(self, logits: jax.Array, key) -> jax.Array:
        """logits float32 (B, V) -> int32 (B,)."""
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class TopP:
    """Temperature then nucleus (top-p) sampling, as HF's ``TemperatureLogitsWarper`` + ``TopPLogitsWarper``."""

    temperature: jax.Array
    top_p: jax.Array

    @classmethod
    def create(cls, temperature: float = 1.0, top_p: float = 1.0) -> TopP:
        checks.check_float("temperature", temperature, lo=0.0, lo_open=True)
        checks.check_float("top_p", top_p, lo=0.0, hi=1.0, lo_open=True)
        return cls(jnp.float32(temperature), jnp.float32(top_p))

    def __call__(self, logits: jax.Array, key) -> jax.Array:
        """logits float32 (B, V), a PRNG key -> int32 (B,)."""
        logits = logits / self.temperature
        sorted_logits = jnp.sort(logits, axis=-1)  # ascending, as HF's TopPLogitsWarper
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = cum <= (1 - self.top_p)
        remove_sorted = remove_sorted.at[:, -1].set(False)  # keep at least the most likely token
        threshold = jnp.max(jnp.where(remove_sorted, sorted_logits, -jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits <= threshold, -jnp.inf, logits)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sampler(do_sample: bool, temperature: float = 1.0, top_p: float = 1.0):
    """``Greedy()`` or ``TopP.create(temperature, top_p)``."""
    return TopP.create(temperature, top_p) if do_sample else Greedy()


def sample_token(logits, key, *, do_sample: bool, temperature, top_p):
    """logits float32 (B, V) -> int32 (B,). Greedy, or temperature + nucleus (top-p) sampling as HF does."""
    if not do_sample:
        return Greedy()(logits, key)
    return TopP(jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32))(logits, key)
