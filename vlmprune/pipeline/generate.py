"""Autoregressive decoding after the prefill: a ``lax.while_loop`` over single-token decoder steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlmprune.models.llava import Llava
from vlmprune.models.text.llama import KVCache


def decode(
    module: Llava,
    params,
    first_logits,
    cache: KVCache,
    next_pos,
    key,
    sampler,
    *,
    start_slot: int,
    max_new_tokens: int,
    eos_ids: tuple,
    pad_id: int,
):
    """Generate ``max_new_tokens`` tokens int32 (B, max_new_tokens); rows are padded with ``pad_id`` after EOS.

    first_logits float32 (B, V) from the prefill; cache with the prompt in slots [0, start_slot - 1); next_pos
    int32 (B,) the next RoPE position per row; sampler: ``vlmprune.pipeline.sampling.Greedy`` / ``TopP``.
    """
    b = first_logits.shape[0]
    eos = jnp.asarray(eos_ids, jnp.int32)
    key, sub = jax.random.split(key)
    tok = sampler(first_logits, sub)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos)

    def cond(state):
        t, _, _, done, _, _, _ = state
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
        t, tok, out, done, cache, pos, key = state
        logits, cache = module.apply(
            {"params": params}, tok[:, None], pos[:, None], cache, start_slot + t - 1, method=Llava.decode_step
        )
        key, sub = jax.random.split(key)
        nxt = jnp.where(done, pad_id, sampler(logits[:, 0], sub))
        out = out.at[:, t].set(nxt)
        done = done | jnp.isin(nxt, eos)
        return t + 1, nxt, out, done, cache, pos + 1, key

    state = (jnp.int32(1), tok, out, done, cache, next_pos, key)
    _, _, out, _, _, _, _ = jax.lax.while_loop(cond, body, state)
    return out
