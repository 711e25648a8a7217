"""The benchmark's only door into the model's internals.

The benchmark times the pipeline's stages one at a time (vision tower, selection, the LLM prefill on an assembled
sequence, decode), so it needs pieces the public ``LlavaModel`` does not expose yet: the host planning, the
assembly of the LLM input, the jitted programs. Every such use is here and nowhere else in ``vlmprune.bench``:
when the model gains a public pipeline API (plan / encode / prune / assemble / prefill / decode), repoint the
functions below at it and the rest of the package stays as it is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vlmprune import checkpoint as _checkpoint
from vlmprune import model as _model
from vlmprune.config import LlavaConfig
from vlmprune.model import DTYPES, LlavaModel, sample_token
from vlmprune.models.llama import KVCache
from vlmprune.models.llava import Llava

__all__ = ["DTYPES", "LlavaConfig", "LlavaModel", "Llava", "JaxPieces", "abstract_params", "decode",
           "first_token", "plan_inputs", "prefill_program", "vision_call"]


def abstract_params(module: Llava, cfg: LlavaConfig):
    """The param tree of ``module`` as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    return _checkpoint._abstract(module, cfg)  # noqa: SLF001


def plan_inputs(model: LlavaModel, x: dict, pruner):
    """The model's own host planning of processor outputs ``x``: (plan, jit args, static kwargs, layout or None).

    The timed pieces see exactly the arrays ``LlavaModel.prefill`` builds.
    """
    ids, am, pix = x["input_ids"], x["attention_mask"], x["pixel_values"]
    plan, pix2, layout, stride = model._plan(ids, am, pix, pruner, x.get("image_sizes"))  # noqa: SLF001
    return plan, model._args(ids, pix2, plan, layout), {"pruner": pruner, "stride": stride}, layout  # noqa: SLF001


def vision_call(model: LlavaModel, pix, **taps):
    """The jitted vision tower on device pixels ``pix`` (tiles flattened), asked for ``taps``; no host checks."""
    return model._vision_jit({"params": model.params}, pix, **taps)  # noqa: SLF001


def prefill_program(model: LlavaModel, args, static, max_len: int):
    """The lowered whole-prefill program (assembly included) of planned ``args`` (for its FLOP count)."""
    return model._prefill_jit.lower(model.params, *args, **static, max_len=max_len)  # noqa: SLF001


def decode(model: LlavaModel, state: dict, max_new_tokens: int):
    """A closure decoding ``max_new_tokens`` greedy tokens from a prefill ``state`` (logits, cache, pos, plan),
    with an EOS that never fires so every call decodes exactly that many."""
    return lambda: model._decode_jit(  # noqa: SLF001
        model.params, state["logits"], state["cache"], state["pos"], jax.random.PRNGKey(0), jnp.float32(1.0),
        jnp.float32(1.0), start_slot=state["plan"].length + 1, max_new_tokens=max_new_tokens, do_sample=False,
        eos_ids=(-1,), pad_id=model.config.pad_token_id)


def first_token(logits):
    """The greedy first token of prefill logits (B, V)."""
    return sample_token(logits, None, do_sample=False, temperature=1.0, top_p=1.0)


class JaxPieces:
    """Jitted stages of the pipeline for one model, reused across methods."""

    def __init__(self, model: LlavaModel):
        self.model = model
        m = model.module

        def llm_prefill(params, embeds, positions, mask, extra, *, max_len):
            """``Llava.prefill`` on assembled embeddings into a fresh cache; last-token logits.

            ``extra``: what the assembly returns after (embeds, mask, positions) (FastV's config), passed on.
            """
            b = embeds.shape[0]
            cache = KVCache.zeros(m.config.text, b, max_len, embeds.dtype)
            logits, out_mask, cache = m.apply({"params": params}, embeds, positions, mask, cache, *extra,
                                              method=Llava.prefill)
            last = out_mask.shape[1] - 1 - jnp.argmax(out_mask[:, ::-1], axis=1)
            return logits[jnp.arange(b), last], cache

        self.llm_prefill = jax.jit(llm_prefill, static_argnames=("max_len",))
        self.assemble = jax.jit(functools.partial(_model._assemble, m),  # noqa: SLF001
                                static_argnames=("pruner", "stride"))
        self.project = jax.jit(lambda params, f: m.apply({"params": params}, f, method=Llava.project))

    def llm_prefill_program(self, args, static, max_len: int):
        """The assembled sequence of planned ``args``/``static`` and the compiled LLM prefill on it:
        (compiled, its call arguments, the lowered program for its FLOP count)."""
        params = self.model.params
        embeds, mask, positions, *extra = self.assemble(params, *args, **static)
        call = (params, embeds, positions, mask, tuple(extra))
        lowered = self.llm_prefill.lower(*call, max_len=max_len)
        return lowered.compile(), call, lowered

    def vision_fn(self, pruner, pix):
        """A closure running the tower with ``pruner``'s taps on the model's pixels (NeXT: (NI, T, C, S, S))."""
        req = pruner.vision_request(self.model.config) if pruner is not None else {}
        kw = dict(cls_attention_layers=tuple(req.get("cls_attention_layers", ())),
                  key_layers=tuple(req.get("key_layers", ())),
                  post_layernorm=bool(req.get("post_layernorm", False)))
        if req.get("hidden_state_layers"):
            kw["hidden_state_layers"] = tuple(req["hidden_state_layers"])
        px = pix.reshape((-1,) + tuple(pix.shape[-3:])) if pix.ndim == 5 else pix
        return lambda: vision_call(self.model, px, **kw)

    def apply_fn(self, pruner):
        """LLaVA-1.5: jitted (params, enc) -> (tokens, valid), the pruner's select+project."""
        m = self.model.module
        return jax.jit(lambda prm, e: pruner.apply(e, lambda f: m.apply({"params": prm}, f, method=Llava.project)))

    def next_select_project(self, pruner, stride):
        """LLaVA-NeXT: jitted (params, enc, layout) -> (tokens, valid) with the official packing."""
        m = self.model.module

        def go(params, enc, layout):
            project = lambda f: m.apply({"params": params}, f, method=Llava.project)  # noqa: E731
            return _model._next_visual_tokens(m, params, enc, project, pruner, layout, stride)  # noqa: SLF001

        return jax.jit(go)
