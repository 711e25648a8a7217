"""The user-facing LLaVA model: load, call, prune, generate, save.

``LlavaModel`` holds a frozen config, a param pytree and (optionally) the HF processor. Its compute is the public
pipeline (``vlmprune.pipeline``) jitted once per instance, with the pruner as a static argument:

  plan_inputs (host) -> encode -> prune -> visual_tokens -> assemble -> prefill -> decode

Host-side work (validation, layout, placeholder bookkeeping, a pruner's declared preparation) runs in NumPy
before anything is traced. Nothing here depends on which method runs.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlmprune import checks, inputs, preprocess
from vlmprune.io.checkpoint import save_model
from vlmprune.models.llava import Llava, load_llava, shard_params
from vlmprune.models.llava_config import LlavaConfig
from vlmprune.models.vision.clip import load_clip
from vlmprune.pipeline.forward import encode, forward, prefill
from vlmprune.pipeline.generate import decode
from vlmprune.pipeline.plan import Plan, check_pixels, image_texts, next_layout, plan_inputs, shard_inputs
from vlmprune.pipeline.sampling import Greedy, sample_token, sampler  # noqa: F401  (sample_token: re-export)
from vlmprune.pipeline.sequence import SequencePlan
from vlmprune.prune.base import check_pruner
from vlmprune.sharding import batch_sharding
from vlmprune.types import NO_TAPS, ModelInputs, ModelOutput, TapRequest, VisionTaps

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FORMAT_FILE = "vlmprune.json"


def _dtype(dtype) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def _encode_taps(module, params, pixel_values, *, request: TapRequest, output_hidden_states: bool):
    return encode(module, params, pixel_values, request, output_hidden_states=output_hidden_states)


class LlavaModel:
    """A loaded LLaVA model. Create it with ``vlmprune.load(path)``.

    Attributes:
      config: frozen ``LlavaConfig``.
      params: param pytree (nested dicts of jax arrays).
      processor: the checkpoint's HF processor (``AutoProcessor``) when it ships one, else None.
    """

    def __init__(self, config: LlavaConfig, params, *, dtype="float32", processor=None, hf_config=None, mesh=None):
        self.config = config
        self.mesh = mesh
        if mesh is not None:
            params = shard_params(params, mesh, config)
        self.params = params
        self.dtype = _dtype(dtype)
        self.processor = processor
        self.hf_config = hf_config
        self._aux = {}  # auxiliary models pruners declare (HostNeeds.clip_path), keyed by path
        self.module = Llava(config, dtype=self.dtype)
        m = self.module
        self._forward_jit = jax.jit(functools.partial(forward, m), static_argnames=("pruner", "stride"))
        self._prefill_jit = jax.jit(functools.partial(prefill, m), static_argnames=("pruner", "stride", "max_len"))
        self._decode_jit = jax.jit(
            functools.partial(decode, m), static_argnames=("start_slot", "max_new_tokens", "eos_ids", "pad_id")
        )
        self._vision_jit = jax.jit(
            functools.partial(_encode_taps, m), static_argnames=("request", "output_hidden_states")
        )

    # ---- validation and planning (host side, before any compile)

    def _check_pixels(self, pixel_values):
        return check_pixels(self.config, pixel_values)

    def _next_layout(self, pixel_values, image_sizes, pruner=None):
        """Host-side anyres layout of a NeXT batch (see ``vlmprune.pipeline.plan.next_layout``)."""
        return next_layout(self.config, pixel_values, image_sizes, pruner)

    def _image_texts(self, ids, mask, plan: SequencePlan, text) -> list[str]:
        tok = None if self.processor is None else self.processor.tokenizer
        return image_texts(self.config, ids, mask, plan, text, tok)

    def plan(
        self,
        input_ids,
        pixel_values=None,
        *,
        attention_mask=None,
        image_sizes=None,
        pruner=None,
        text=None,
        pixel_values_videos=None,
    ) -> Plan:
        """Validate a batch and plan it on the host (``vlmprune.pipeline.plan_inputs``); ValueError names any
        problem, before anything compiles."""
        tok = None if self.processor is None else self.processor.tokenizer
        inputs = ModelInputs.from_arrays(input_ids, pixel_values, attention_mask, image_sizes, pixel_values_videos)
        return plan_inputs(
            self.config, inputs, check_pruner(pruner), text=text, tokenizer=tok, clip_loader=self.auxiliary_clip
        )

    def device_inputs(self, input_ids, plan: Plan):
        """The jitted stages' ``DeviceInputs`` of a plan (split over the batch on a mesh)."""
        inputs = plan.device_inputs(input_ids, self.dtype)
        if self.mesh is None:
            return inputs
        return shard_inputs(inputs, self.mesh, batch_sharding)

    def auxiliary_clip(self, path: str):
        """A full CLIP model a pruner declares (``HostNeeds.clip_path``), loaded once per model instance."""
        if path not in self._aux:
            self._aux[path] = load_clip(
                path, dtype={jnp.float32: "float32", jnp.bfloat16: "bfloat16", jnp.float16: "float16"}[self.dtype]
            )
        return self._aux[path]

    # ---- public API

    def __call__(
        self,
        input_ids,
        pixel_values=None,
        *,
        attention_mask=None,
        image_sizes=None,
        pruner=None,
        text=None,
        pixel_values_videos=None,
    ) -> ModelOutput:
        """Logits over the assembled (optionally pruned) sequence.

        Args:
          input_ids: int (B, L), HF processor convention (image placeholder expanded per visual token).
          pixel_values: float (NI, C, S, S), one image per placeholder run, in order.
          attention_mask: (B, L) 1 for real tokens (left padding), default all ones.
          image_sizes: LLaVA-NeXT only: (NI, 2) original (height, width) of each image, as the HF processor
            returns it; pixel_values is then (NI, tiles, C, S, S).
          pruner: a pruner (``vlmprune.prune.get(name, ...)``) or None.
          text: instruction per batch row for text-guided pruners (``HostNeeds.text``); default: decoded from the
            prompt.
          pixel_values_videos: LLaVA-OneVision only: float (NV, F, C, S, S), one video per ``<video>`` placeholder
            run (``model.processor(videos=..., text=...)``), every video with the same frame count F;
            ``pixel_values`` may be None when the batch holds videos only.

        Returns:
          ModelOutput(logits float32 (B, L', V), mask bool (B, L')), L' = L when not pruning.
        """
        plan = self.plan(
            input_ids,
            pixel_values,
            attention_mask=attention_mask,
            image_sizes=image_sizes,
            pruner=pruner,
            text=text,
            pixel_values_videos=pixel_values_videos,
        )
        return self._forward_jit(self.params, self.device_inputs(input_ids, plan), pruner=pruner, stride=plan.stride)

    def taps(self, pixel_values, request: TapRequest = NO_TAPS, *, output_hidden_states=False) -> VisionTaps:
        """The vision tower's ``VisionTaps`` for ``request`` (e.g. ``pruner.request(model.config)``); NeXT tiles
        (NI, T, C, S, S) are encoded as NI·T images."""
        pixel_values = self._check_pixels(pixel_values)
        if self.config.anyres:  # (NI, T, C, S, S) -> tiles (NI·T, C, S, S)
            pixel_values = np.asarray(pixel_values).reshape((-1,) + tuple(pixel_values.shape[2:]))
        return self._vision_jit(
            self.params,
            jnp.asarray(pixel_values, self.dtype),
            request=request,
            output_hidden_states=output_hidden_states,
        )

    def vision(
        self,
        pixel_values,
        *,
        cls_attention_layers=(),
        key_layers=(),
        hidden_state_layers=(),
        output_hidden_states=False,
        post_layernorm=False,
    ) -> dict:
        """``taps`` as a dict (features, cls_attn, keys, cls_query, hidden_states, feature_hidden)."""
        request = TapRequest(
            cls_attention_layers=tuple(cls_attention_layers),
            key_layers=tuple(key_layers),
            hidden_state_layers=tuple(hidden_state_layers),
            post_layernorm=post_layernorm,
        )
        return self.taps(pixel_values, request, output_hidden_states=output_hidden_states).as_dict()

    def prefill(
        self,
        input_ids,
        pixel_values=None,
        *,
        attention_mask=None,
        image_sizes=None,
        pruner=None,
        max_new_tokens=32,
        text=None,
        pixel_values_videos=None,
    ):
        """Prefill step of generation: (last logits (B, V), cache, next positions (B,), sequence plan)."""
        check_pruner(pruner)
        checks.check_int("max_new_tokens", max_new_tokens, lo=1)
        plan = self.plan(
            input_ids,
            pixel_values,
            attention_mask=attention_mask,
            image_sizes=image_sizes,
            pruner=pruner,
            text=text,
            pixel_values_videos=pixel_values_videos,
        )
        max_len = plan.sequence.length + max_new_tokens
        inputs.check_generation_memory(
            self.config.text,
            batch=plan.sequence.text_src.shape[0],
            prompt_len=plan.sequence.length,
            max_new_tokens=max_new_tokens,
            dtype=self.dtype,
            devices=None if self.mesh is None else self.mesh.devices.flat,
        )
        rope_type = dict(self.config.text.rope_scaling).get("rope_type", "default")
        if rope_type == "dynamic" and max_len > self.config.text.max_position_embeddings:
            raise ValueError(
                f"sequence of {max_len} tokens exceeds max_position_embeddings "
                f"({self.config.text.max_position_embeddings}) of a dynamic-RoPE model"
            )
        out = self._prefill_jit(
            self.params, self.device_inputs(input_ids, plan), pruner=pruner, stride=plan.stride, max_len=max_len
        )
        return (*out, plan.sequence)

    def generate(
        self,
        input_ids,
        pixel_values=None,
        *,
        attention_mask=None,
        image_sizes=None,
        pruner=None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        text=None,
        pixel_values_videos=None,
    ) -> np.ndarray:
        """New token ids int32 (B, max_new_tokens), padded with the pad id after EOS.

        Batches use left padding (``attention_mask``). Greedy by default; ``do_sample`` enables temperature and
        nucleus sampling with a ``jax.random`` key from ``seed``. ``pixel_values_videos``: as in ``__call__``.
        """
        pick = sampler(bool(do_sample), temperature, top_p)
        if not do_sample:  # the settings are still checked, as before
            sampler(True, temperature, top_p)
        logits, cache, next_pos, seq = self.prefill(
            input_ids,
            pixel_values,
            attention_mask=attention_mask,
            image_sizes=image_sizes,
            pruner=pruner,
            max_new_tokens=max_new_tokens,
            text=text,
            pixel_values_videos=pixel_values_videos,
        )
        inputs.check_logits_finite(logits)
        return np.asarray(
            self.decode(logits, cache, next_pos, seq, max_new_tokens=max_new_tokens, sampler=pick, seed=seed)
        )

    def decode(
        self,
        logits,
        cache,
        next_pos,
        plan: SequencePlan,
        *,
        max_new_tokens: int,
        sampler=None,
        seed: int = 0,
        stop_at_eos: bool = True,
    ):
        """The decode loop after ``prefill`` (its outputs as they come): new token ids int32 (B, max_new_tokens)
        as a device array. ``sampler``: ``vlmprune.pipeline.Greedy()`` (default) or ``TopP.create(...)``;
        ``stop_at_eos=False`` runs every step (for timing)."""
        checks.check_int("max_new_tokens", max_new_tokens, lo=1)
        pick = Greedy() if sampler is None else sampler
        eos = self.config.eos_token_ids if stop_at_eos else (-1,)
        return self._decode_jit(
            self.params,
            logits,
            cache,
            next_pos,
            jax.random.PRNGKey(seed),
            pick,
            start_slot=plan.length + 1,
            max_new_tokens=int(max_new_tokens),
            eos_ids=eos,
            pad_id=self.config.pad_token_id,
        )

    def compile_counts(self) -> dict[str, int]:
        """How many programs each jitted entry point has compiled (for tests and diagnostics)."""
        return {
            "forward": self._forward_jit._cache_size(),
            "prefill": self._prefill_jit._cache_size(),
            "decode": self._decode_jit._cache_size(),
            "vision": self._vision_jit._cache_size(),
        }

    def save(self, directory: str, *, overwrite: bool = False) -> None:
        """Write params with orbax plus the HF config (and processor) so ``vlmprune.load`` restores it; an
        existing directory that is not a vlmprune checkpoint needs ``overwrite=True`` (see ``save_model``)."""
        save_model(self, directory, overwrite=overwrite)


def load(
    path: str, *, dtype="float32", mesh=None, check_finite: bool = True, image_aspect: str | None = None
) -> LlavaModel:
    """Load a HF LLaVA directory (safetensors) or a directory written by ``LlavaModel.save``.

    Args:
      path: directory with ``config.json`` and ``*.safetensors`` (llava-hf layout, old or new key prefixes),
        or a vlmprune (orbax) checkpoint directory.
      dtype: "float32", "bfloat16" or "float16" for params and activations.
      mesh: optional ``jax.sharding.Mesh`` with axes "data" and/or "model": params are placed with
        the families' sharding rules (tensor parallel over heads and MLP) straight from the files, inputs
        split over the batch. Default ``jax.make_mesh`` meshes (explicit axis types) are converted to auto ones.
      check_finite: scan every weight for NaN/inf (and float16 overflow); False skips it for a faster load.
      image_aspect: None keeps the checkpoint's processor; "pad" / "crop" picks the pipeline (``vlmprune.preprocess``).

    Raises:
      FileNotFoundError / ValueError / CheckpointError naming every problem with the files.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected a HF LLaVA checkpoint or a vlmprune checkpoint)")
    if image_aspect is not None:
        preprocess.check_aspect(image_aspect)
    got = load_llava(path, dtype=_dtype(dtype), mesh=mesh, check_finite=check_finite)
    model = LlavaModel(got.config, got.params, dtype=dtype, processor=got.processor, hf_config=got.hf_config, mesh=mesh)
    if image_aspect is not None:
        preprocess.set_image_aspect(model.processor, image_aspect, is_next=model.config.model_type == "llava_next")
    return model


def hf_config_dict(model: LlavaModel) -> dict:
    return json.loads(model.hf_config.to_json_string()) if model.hf_config is not None else {}


__all__ = ["LlavaModel", "ModelOutput", "load"]
