"""The benchmark's stages of the model, built on the public pipeline (``vlmprune.pipeline``).

The benchmark times the pipeline one stage at a time (vision tower, selection, the LLM prefill on an assembled
sequence, decode), so it jits the pipeline's pure functions itself instead of going through ``LlavaModel``'s
end-to-end calls: the host planning (``LlavaModel.plan`` / ``device_inputs``), ``encode``, ``prune``,
``tokens_from_taps``, ``assemble`` and ``prefill``. Every use of the model below the ``LlavaModel`` calls is in
this module.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from vlmprune import pipeline
from vlmprune.model import DTYPES, LlavaModel
from vlmprune.models.llava import Llava, param_shapes
from vlmprune.models.llava_config import LlavaConfig
from vlmprune.models.text.llama import KVCache
from vlmprune.pipeline import DeviceInputs, Greedy, SequencePlan
from vlmprune.prune.base import LLMPruner, PruneContext, image_keep_mask, tokens_for_llm
from vlmprune.types import PruneResult, VisionTaps

__all__ = [
    "DTYPES",
    "LlavaConfig",
    "LlavaModel",
    "Llava",
    "JaxPieces",
    "Planned",
    "abstract_params",
    "decode",
    "first_token",
    "inside_llm",
    "kept_indices",
    "plan_inputs",
    "project_first",
]


def abstract_params(module: Llava):
    """The param tree of ``module`` as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    return param_shapes(module)


def inside_llm(pruner) -> bool:
    """True for a pruner acting inside the decoder (FastV): it leaves the vision tokens alone."""
    return isinstance(pruner, LLMPruner)


def project_first(pruner, config, num_tokens: int) -> bool:
    """True when ``pruner`` reads the projected embeddings of every token before it selects (DivPrune) and keeps
    fewer than the ``num_tokens`` tokens of an image."""
    if pruner is None or inside_llm(pruner):
        return False
    budget = pruner.budget(config, None)
    return pipeline.tap_request(config, pruner).projected and budget.kept + budget.appended < num_tokens


@dataclasses.dataclass(frozen=True)
class Planned:
    """A batch planned by the model itself: the sequence plan, the jitted stages' ``DeviceInputs`` and the
    static arguments of ``assemble`` / ``prefill`` (pruner, stride)."""

    sequence: SequencePlan
    inputs: DeviceInputs
    pruner: Any
    stride: int | None

    @property
    def static(self) -> dict:
        return {"pruner": self.pruner, "stride": self.stride}

    def context(self, config) -> PruneContext:
        """What ``prune`` sees besides the taps (the NeXT layout and the pruner's prepared arrays)."""
        return PruneContext(layout=self.inputs.layout, aux=dict(self.inputs.aux), config=config)


def plan_inputs(model: LlavaModel, x: dict, pruner) -> Planned:
    """The model's own host planning of processor outputs ``x`` (``LlavaModel.plan`` / ``device_inputs``), so that
    the timed pieces see exactly the arrays ``LlavaModel.prefill`` builds."""
    ids, am, pix = x["input_ids"], x["attention_mask"], x["pixel_values"]
    plan = model.plan(ids, pix, attention_mask=am, image_sizes=x.get("image_sizes"), pruner=pruner)
    return Planned(sequence=plan.sequence, inputs=model.device_inputs(ids, plan), pruner=pruner, stride=plan.stride)


def first_token(logits):
    """The greedy first token of prefill logits (B, V)."""
    return Greedy()(logits, None)


def decode(model: LlavaModel, state: dict, max_new_tokens: int):
    """A closure decoding ``max_new_tokens`` greedy tokens from a prefill ``state`` (logits, cache, pos, plan: what
    ``LlavaModel.prefill`` returns), with EOS off so that every call decodes exactly that many."""
    return lambda: model.decode(
        state["logits"],
        state["cache"],
        state["pos"],
        state["plan"],
        max_new_tokens=max_new_tokens,
        sampler=Greedy(),
        seed=0,
        stop_at_eos=False,
    )


class JaxPieces:
    """Jitted stages of the pipeline for one model, reused across methods."""

    def __init__(self, model: LlavaModel):
        self.model = model
        m = model.module

        def llm_prefill(params, seq: pipeline.Assembled, *, max_len):
            """``Llava.prefill`` on an assembled sequence into a fresh cache, the LM head over every slot (as the
            PyTorch side's full prefill); (logits at each row's last real slot (B, V), cache)."""
            b = seq.embeds.shape[0]
            cache = KVCache.zeros(m.config.text, b, max_len, seq.embeds.dtype)
            logits, out_mask, cache = m.apply(
                {"params": params}, seq.embeds, seq.positions, seq.mask, cache, seq.hook, method=Llava.prefill
            )
            last = out_mask.shape[1] - 1 - jnp.argmax(out_mask[:, ::-1], axis=1)
            return logits[jnp.arange(b), last], cache

        self.llm_prefill = jax.jit(llm_prefill, static_argnames=("max_len",))
        self.assemble = jax.jit(functools.partial(pipeline.assemble, m), static_argnames=("pruner", "stride"))
        self.prefill = jax.jit(functools.partial(pipeline.prefill, m), static_argnames=("pruner", "stride", "max_len"))
        self.project = jax.jit(functools.partial(pipeline.project, m))
        self.encode = jax.jit(functools.partial(pipeline.encode, m), static_argnames=("request",))
        self.tokens = jax.jit(functools.partial(pipeline.tokens_from_taps, m), static_argnames=("pruner", "stride"))

    def prefill_program(self, planned: Planned, max_len: int):
        """The lowered whole prefill (assembly included) of ``planned``, as ``LlavaModel.prefill`` runs it."""
        return self.prefill.lower(self.model.params, planned.inputs, **planned.static, max_len=max_len)

    def llm_prefill_program(self, planned: Planned, max_len: int):
        """The assembled sequence of ``planned`` and the compiled LLM prefill on it: (compiled, its call arguments,
        the lowered program for its FLOP count)."""
        params = self.model.params
        call = (params, self.assemble(params, planned.inputs, **planned.static))
        lowered = self.llm_prefill.lower(*call, max_len=max_len)
        return lowered.compile(), call, lowered

    def vision_fn(self, pruner, pix):
        """A closure running the tower with ``pruner``'s taps on the model's pixels (NeXT: (NI, T, C, S, S),
        encoded as NI·T tiles) -> VisionTaps (unprojected: the projection is timed with the selection)."""
        request = pipeline.tap_request(self.model.config, pruner).replace(projected=False)
        px = pix.reshape((-1,) + tuple(pix.shape[-3:])) if pix.ndim == 5 else pix
        return lambda: self.encode(self.model.params, px, request)

    def select_fn(self, pruner, ctx: PruneContext):
        """The selection alone, jitted: taps -> (PruneResult, what the method hands on). LLaVA-1.5: its tokens
        (NI, K, ·) and valid before projection; LLaVA-NeXT: the keep mask bool (NI, T·N) over the tile tokens."""
        if ctx.layout is None:

            def go(taps: VisionTaps, ctx: PruneContext):
                res = pipeline.prune(pruner, taps, ctx)
                return res, tokens_for_llm(res, taps, lambda f: f)
        else:

            def go(taps: VisionTaps, ctx: PruneContext):
                res = pipeline.prune(pruner, taps, ctx)
                return res, image_keep_mask(res, ctx.layout.tile_valid.shape[1] * taps.num_tokens)

        jitted = jax.jit(go)
        return lambda taps: jitted(taps, ctx)

    def onevision_select_fn(self, pruner, planned: Planned):
        """LLaVA-OneVision: (``prepare``: taps -> what the selection reads, ``select``: that input -> (PruneResult,
        (kept indices int32 (NI, K), valid bool (NI, K)) in the order the LLM receives them), ``select`` jitted;
        ``where``: "tiles" or "packed", what the indices point into).

        A pruner that selects per tile (``selects_per_tile``) reads the NI·T tiles' taps; in the spatial-compat
        layout its indices are tile tokens (``tile · N + patch``, sorted into that layout), in the official layout
        (mode B) slots of the packed block. One that selects on the packed block (DivPrune) reads the projected
        packed block (precomputed by ``prepare``) and its indices are its slots."""
        cfg, m, params = self.model.config, self.model.module, self.model.params
        ctx = planned.context(cfg)
        tile_tokens = pruner.selects_per_tile(cfg) and pruner.spatial_compat(cfg)

        def go(taps: VisionTaps, ctx: PruneContext):
            res = pipeline.prune(pruner, taps, ctx)
            if tile_tokens:
                return res, pipeline.spatial_order(res, ctx.layout, ctx, taps.num_tokens)
            return res, (res.selection.indices, res.selection.valid)

        if pruner.selects_per_tile(cfg):  # both layouts read the tiles' own taps

            def prepare(taps: VisionTaps) -> VisionTaps:
                return taps
        else:
            block = jax.jit(lambda p, f, tables: pipeline.packed_block(m, p, pipeline.project(m, p, f), tables))

            def prepare(taps: VisionTaps) -> VisionTaps:
                packed = block(params, taps.features, ctx.layout)
                return VisionTaps(features=packed, embeddings=packed)

        jitted = jax.jit(go)
        return prepare, lambda x: jitted(x, ctx), "tiles" if tile_tokens else "packed"

    def select_project_fn(self, pruner, planned: Planned):
        """A closure: taps -> (tokens (NI, K, D_llm), valid (NI, K)) the LLM receives (``tokens_from_taps``: the
        pruner's selection and the projection, NeXT packing included)."""
        inputs = planned.inputs
        return lambda taps: self.tokens(
            self.model.params, taps, pruner, inputs.layout, dict(inputs.aux), planned.stride
        )


def kept_indices(result: PruneResult):
    """The kept token indices (NI, K) of a LLaVA-1.5 result (0 at invalid slots), or None when the method hands the
    LLM merged or appended tokens that are not rows of the image's own."""
    if result.tokens is not None or result.appended is not None:
        return None
    sel = result.selection
    return jnp.where(sel.valid, sel.indices, 0)
