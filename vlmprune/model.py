"""The user-facing LLaVA model: load, call, prune, generate, save.

``LlavaModel`` holds a frozen config, a param pytree and (optionally) the HF processor. Its compute lives in
pure functions of (params, arrays) with the pruner as a static argument, jitted once per instance:

  vision (+ CLS-attention taps) -> pruner (pure array function) -> projector -> merge -> LLaMA prefill -> decode

Host-side work (validation, placeholder bookkeeping) runs in NumPy before anything is traced.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vlmprune import _checks, preprocess
from vlmprune.config import LlavaConfig
from vlmprune.models.llama import KVCache
from vlmprune.models.llava import Llava
from vlmprune.next_layout import layout_keep
from vlmprune.sequence import SequencePlan, plan_sequence

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FORMAT_FILE = "vlmprune.json"


@flax.struct.dataclass
class ModelOutput:
    """logits float32 (B, L, V) over the assembled sequence; mask bool (B, L) real positions."""

    logits: jax.Array
    mask: jax.Array


def _dtype(dtype) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


# ----------------------------------------------------------------------------------------------- pure core


def _visual_tokens(module: Llava, params, pixel_values, pruner, layout=None, stride=None):
    """Encode images and apply the pruner. Returns (tokens (NI, K, D_llm), valid bool (NI, K)).

    LLaVA-1.5: pixel_values (NI, C, S, S); K = the pruner's slot count (or all tokens).
    LLaVA-NeXT: pixel_values (NI, T_max, C, S, S) with ``layout`` tables (see ``vlmprune.next_layout``); the
    per-tile keep mask is laid out in the official order and compacted into ``stride`` slots.
    """
    if pruner is not None and pruner.inside_llm:
        pruner = None  # FastV acts inside the LLM (see _assemble), not on the encoder outputs
    req = pruner.vision_request(module.config) if pruner is not None else {}
    pix = pixel_values if layout is None else pixel_values.reshape((-1,) + pixel_values.shape[2:])
    enc = module.apply(
        {"params": params}, pix, method=Llava.encode,
        cls_attention_layers=req.get("cls_attention_layers", ()), key_layers=req.get("key_layers", ()),
        hidden_state_layers=req.get("hidden_state_layers", ()), post_layernorm=req.get("post_layernorm", False),
    )
    project = functools.partial(module.apply, {"params": params}, method=Llava.project)
    if layout is not None:
        return _next_visual_tokens(module, params, enc, project, pruner, layout, stride)
    if pruner is None:
        tokens = project(enc["features"])
        return tokens, jnp.ones(tokens.shape[:2], bool)
    return pruner.apply(enc, project)


def _next_visual_tokens(module, params, enc, project, pruner, layout, stride):
    """Official LLaVA-NeXT packing of (possibly pruned) tiles; see ``vlmprune.next_layout``.

    A pruner may append tokens after an image's packed block (``Pruner.next_tokens``: VisionZip's CLS and merged
    tokens); its valid ones follow the last layout entry, in order. Returns (tokens (NI, stride, D), valid)."""
    tile_valid = layout["tile_valid"]  # (NI, T)
    ni, t = tile_valid.shape
    n = enc["features"].shape[1]
    flat_emb = project(enc["features"])  # (NI·T, N, D): what the LLM receives, also DivPrune's input
    extra = None
    if pruner is None:
        keep = jnp.ones((ni, t, n), bool)
    else:
        keep, extra = pruner.next_tokens({**enc, "embeddings": flat_emb}, layout, module.config, project)
    keep = (keep & tile_valid[..., None]).reshape(ni, t * n)
    emb = flat_emb.reshape(ni, t * n, -1)
    newline = module.apply({"params": params}, method=lambda m: m.image_newline).astype(emb.dtype)
    table = jnp.concatenate([emb, jnp.broadcast_to(newline, (ni, 1, emb.shape[-1]))], axis=1)
    token = layout["token"]  # (NI, F)
    entry_keep = layout_keep(keep, token, layout["row"])  # (NI, F), layout order
    entry_row = jnp.where((token == -1) | (token == -3), t * n, jnp.maximum(token, 0))  # row of `table`
    if extra is not None:
        x_tok, x_valid = extra  # (NI, E, D), (NI, E)
        e = x_tok.shape[1]
        table = jnp.concatenate([table, x_tok.astype(table.dtype)], axis=1)
        entry_row = jnp.concatenate([entry_row, jnp.broadcast_to(t * n + 1 + jnp.arange(e, dtype=entry_row.dtype),
                                                                 (ni, e))], axis=1)
        entry_keep = jnp.concatenate([entry_keep, x_valid], axis=1)
    src = jax.vmap(lambda k: jnp.nonzero(k, size=stride, fill_value=0)[0])(entry_keep)  # ascending = packed order
    valid = jnp.arange(stride)[None] < jnp.sum(entry_keep, axis=1, keepdims=True)
    idx = jnp.take_along_axis(entry_row, src, axis=1)
    tokens = jnp.take_along_axis(table, idx[..., None], axis=1)
    return tokens, valid


def _assemble(module: Llava, params, input_ids, pixel_values, text_src, vis_src, text_mask, layout, pruner, stride):
    """Build (embeds (B, L', D), mask (B, L'), positions (B, L'), fastv) from the host plan."""
    tokens, valid = _visual_tokens(module, params, pixel_values, pruner, layout, stride)
    d = tokens.shape[-1]
    flat_tok = tokens.reshape(-1, d)
    flat_valid = valid.reshape(-1)
    text_emb = module.apply({"params": params}, input_ids, method=Llava.embed)
    is_vis = vis_src >= 0
    rows = jnp.arange(input_ids.shape[0])[:, None]
    t_emb = text_emb[rows, jnp.maximum(text_src, 0)]
    v_emb = flat_tok[jnp.maximum(vis_src, 0)].astype(t_emb.dtype)
    embeds = jnp.where(is_vis[..., None], v_emb, t_emb)
    mask = jnp.where(is_vis, flat_valid[jnp.maximum(vis_src, 0)], text_mask)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
    fastv = None
    if pruner is not None and pruner.inside_llm:
        fastv = pruner.llm_config(module.config, is_vis, tokens.shape[0] // input_ids.shape[0])
    return embeds, mask, positions, fastv


def _forward(module, params, input_ids, pixel_values, text_src, vis_src, text_mask, layout, *, pruner, stride):
    embeds, mask, positions, fastv = _assemble(
        module, params, input_ids, pixel_values, text_src, vis_src, text_mask, layout, pruner, stride)
    logits, mask, _ = module.apply({"params": params}, embeds, positions, mask, None, fastv, method=Llava.prefill)
    return ModelOutput(logits=logits, mask=mask)


def _prefill(module, params, input_ids, pixel_values, text_src, vis_src, text_mask, layout, *, pruner, stride,
             max_len):
    """Prefill into a fresh cache of ``max_len`` slots. Returns (last logits (B, V), cache, next positions (B,))."""
    embeds, mask, positions, fastv = _assemble(
        module, params, input_ids, pixel_values, text_src, vis_src, text_mask, layout, pruner, stride)
    b = embeds.shape[0]
    next_pos = jnp.sum(mask, axis=1, dtype=jnp.int32)  # positions continue after the real prompt tokens
    cache = KVCache.zeros(module.config.text, b, max_len, embeds.dtype)
    logits, _, cache = module.apply(
        {"params": params}, embeds, positions, mask, cache, fastv, True, method=Llava.prefill)
    return logits[:, 0], cache, next_pos  # LM head at each row's last real token only


def sample_token(logits, key, *, do_sample: bool, temperature, top_p):
    """logits float32 (B, V) -> int32 (B,). Greedy, or temperature + nucleus (top-p) sampling as HF does."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    sorted_logits = jnp.sort(logits, axis=-1)  # ascending, as HF's TopPLogitsWarper
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted = remove_sorted.at[:, -1].set(False)  # keep at least the most likely token
    threshold = jnp.max(jnp.where(remove_sorted, sorted_logits, -jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits <= threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _decode(module, params, first_logits, cache, next_pos, key, temperature, top_p, *,
            start_slot: int, max_new_tokens: int, do_sample: bool, eos_ids: tuple, pad_id: int):
    """Generate ``max_new_tokens`` tokens with a ``lax.while_loop``; rows are padded with pad_id after EOS."""
    b = first_logits.shape[0]
    eos = jnp.asarray(eos_ids, jnp.int32)
    key, sub = jax.random.split(key)
    tok = sample_token(first_logits, sub, do_sample=do_sample, temperature=temperature, top_p=top_p)
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
        nxt = sample_token(logits[:, 0], sub, do_sample=do_sample, temperature=temperature, top_p=top_p)
        nxt = jnp.where(done, pad_id, nxt)
        out = out.at[:, t].set(nxt)
        done = done | jnp.isin(nxt, eos)
        return t + 1, nxt, out, done, cache, pos + 1, key

    state = (jnp.int32(1), tok, out, done, cache, next_pos, key)
    _, _, out, _, _, _, _ = jax.lax.while_loop(cond, body, state)
    return out


# ----------------------------------------------------------------------------------------------- the model


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
            from vlmprune.sharding import shard_params

            params = shard_params(params, mesh)
        self.params = params
        self.dtype = _dtype(dtype)
        self.processor = processor
        self.hf_config = hf_config
        self._aux = {}  # auxiliary models pruners need (HERO's CLIP), keyed by path
        self.module = Llava(config, dtype=self.dtype)
        m = self.module
        self._forward_jit = jax.jit(functools.partial(_forward, m), static_argnames=("pruner", "stride"))
        self._prefill_jit = jax.jit(functools.partial(_prefill, m), static_argnames=("pruner", "stride", "max_len"))
        self._decode_jit = jax.jit(
            functools.partial(_decode, m),
            static_argnames=("start_slot", "max_new_tokens", "do_sample", "eos_ids", "pad_id"),
        )
        self._vision_jit = jax.jit(
            functools.partial(m.apply, method=Llava.encode),
            static_argnames=("cls_attention_layers", "key_layers", "hidden_state_layers", "output_hidden_states",
                             "post_layernorm"),
        )

    # ---- validation and planning (host side, before any compile)

    def _check_pixels(self, pixel_values):
        v = self.config.vision
        if pixel_values is None:
            raise ValueError("pixel_values is required (one image per <image> placeholder)")
        shape = tuple(getattr(pixel_values, "shape", ()))
        want = (v.num_channels, v.image_size, v.image_size)
        if self.config.model_type == "llava_next":
            if len(shape) != 5 or shape[2:] != want:
                raise ValueError(
                    f"pixel_values must have shape (num_images, num_tiles, {want[0]}, {want[1]}, {want[2]}) for "
                    f"this LLaVA-NeXT model (tile size {v.image_size}), got {shape}; preprocess images with the "
                    "model's processor"
                )
        elif len(shape) != 4 or shape[1:] != want:
            raise ValueError(
                f"pixel_values must have shape (num_images, {want[0]}, {want[1]}, {want[2]}) for this vision "
                f"tower (image_size={v.image_size}), got {shape}; preprocess images with the model's processor"
            )
        _checks.check_finite("pixel_values", pixel_values)
        return pixel_values

    def _next_layout(self, pixel_values, image_sizes, pruner=None):
        """Host-side anyres layout for a NeXT batch; pads tiles to the largest grid.

        Returns (pixels (NI, T_max, C, S, S), layout in the pruner's style, placeholder counts per image)."""
        from vlmprune.next_layout import batch_layout, max_tiles

        c = self.config
        style, pins = "official", c.image_grid_pinpoints
        if pruner is not None and hasattr(pruner, "next_layout_style"):
            style, pins = pruner.next_layout_style(c)
        if image_sizes is None:
            raise ValueError("image_sizes (num_images, 2) as (height, width) is required for LLaVA-NeXT inputs")
        sizes = np.asarray(image_sizes)
        ni = pixel_values.shape[0]
        if sizes.shape != (ni, 2):
            raise ValueError(f"image_sizes must have shape ({ni}, 2) (one (height, width) per image), got {sizes.shape}")
        n_side = c.vision.image_size // c.vision.patch_size
        geo = dict(tile_size=c.vision.image_size, tokens_per_side=n_side)
        lay = batch_layout(sizes, pins, style=style, **geo)
        official = lay if style == "official" else batch_layout(sizes, pins, **geo)
        t_max = max_tiles(c.image_grid_pinpoints, c.vision.image_size)
        for i, li in enumerate(lay.layouts):
            if li.num_tiles > pixel_values.shape[1]:
                raise ValueError(f"image {i} of size {tuple(sizes[i])} needs {li.num_tiles} tiles "
                                 f"({li.grid_rows}x{li.grid_cols} grid + base) but pixel_values holds "
                                 f"{pixel_values.shape[1]}")
        if pixel_values.shape[1] > t_max:
            raise ValueError(f"pixel_values holds {pixel_values.shape[1]} tiles per image; the pinpoints allow at "
                             f"most {t_max}")
        pix = np.zeros((ni, t_max) + tuple(pixel_values.shape[2:]), np.float32)
        pix[:, : pixel_values.shape[1]] = np.asarray(pixel_values, np.float32)
        return pix, lay, [li.length for li in official.layouts]

    def _plan(self, input_ids, attention_mask, pixel_values, pruner, image_sizes=None, text=None):
        """Validate everything on the host. Returns (plan, pixels, layout arrays or None, stride or None)."""
        pixel_values = self._check_pixels(pixel_values)
        c = self.config
        ids = np.asarray(input_ids)
        mask = None if attention_mask is None else np.asarray(attention_mask)
        if c.model_type == "llava":
            tokens = c.tokens_per_image
            slots = tokens if pruner is None else pruner.num_slots(c)
            plan = plan_sequence(ids, mask, image_token_id=c.image_token_id, tokens_per_image=tokens,
                                 num_images=pixel_values.shape[0], slots=slots)
            return plan, pixel_values, None, None
        pix, lay, placeholders = self._next_layout(pixel_values, image_sizes, pruner)
        if pruner is None or pruner.inside_llm:
            slots = [li.length for li in lay.layouts]
        else:
            # layout entries (kept tokens + newlines, at most the full layout) + tokens appended after the block
            slots = [min(li.length, pruner.max_tokens_next(c, li.num_tiles) + int((li.token < 0).sum()))
                     + pruner.extra_tokens_next(c, li.num_tiles) for li in lay.layouts]
        stride = max(slots)
        plan = plan_sequence(ids, mask, image_token_id=c.image_token_id, tokens_per_image=placeholders,
                             num_images=pix.shape[0], slots=slots, slot_stride=stride)
        arrays = {"token": jnp.asarray(lay.token), "row": jnp.asarray(lay.row),
                  "tile_valid": jnp.asarray(lay.tile_valid)}
        if pruner is not None:
            texts = self._image_texts(ids, mask, plan, text)
            extra = pruner.host_inputs(self, pix, lay.layouts, ids, texts)
            arrays.update({k: jnp.asarray(v) for k, v in extra.items()})
        return plan, pix, arrays, stride

    def _image_texts(self, ids, mask, plan: SequencePlan, text) -> list[str]:
        """The instruction text per image, for text-guided pruners (HERO): ``text`` (one string per batch row)
        or, by default, the row's real tokens after its last image placeholder, decoded without special tokens."""
        b = ids.shape[0]
        if text is not None:
            text = [text] if isinstance(text, str) else list(text)
            if len(text) != b:
                raise ValueError(f"text must hold one string per batch row ({b}), got {len(text)}")
        rows = []
        for r in range(b):
            if text is not None:
                rows.append(text[r])
                continue
            if self.processor is None:
                raise ValueError("this checkpoint has no tokenizer: pass text=[...] for text-guided pruning")
            m = np.ones(ids.shape[1], bool) if mask is None else np.asarray(mask[r]).astype(bool)
            img = np.where((ids[r] == self.config.image_token_id) & m)[0]
            after = ids[r, (img[-1] + 1 if img.size else 0):][m[(img[-1] + 1 if img.size else 0):]]
            rows.append(self.processor.tokenizer.decode(after, skip_special_tokens=True).strip())
        out = [""] * plan.num_images
        for r in range(b):
            for v in np.unique(plan.vis_src[r][plan.vis_src[r] >= 0] // plan.slots):
                out[int(v)] = rows[r]
        return out

    def auxiliary_clip(self, path: str):
        """A full CLIP model used by a pruner (HERO), loaded once per model instance."""
        from vlmprune.clip_model import load_clip

        if path not in self._aux:
            self._aux[path] = load_clip(path, dtype={jnp.float32: "float32", jnp.bfloat16: "bfloat16",
                                                      jnp.float16: "float16"}[self.dtype])
        return self._aux[path]

    def _args(self, input_ids, pixel_values, plan: SequencePlan, layout):
        args = (
            jnp.asarray(input_ids, jnp.int32), jnp.asarray(pixel_values, self.dtype),
            jnp.asarray(plan.text_src), jnp.asarray(plan.vis_src), jnp.asarray(plan.text_mask), layout,
        )
        if self.mesh is None:
            return args
        from vlmprune.sharding import batch_sharding

        return jax.tree.map(lambda a: jax.device_put(a, batch_sharding(self.mesh, a.shape)), args)

    def _check_pruner(self, pruner):
        if pruner is None:
            return None
        if not hasattr(pruner, "apply") or not hasattr(pruner, "num_slots"):
            raise TypeError(f"pruner must be a vlmprune pruner (e.g. vlmprune.prune.VisPruner(...)), got {pruner!r}")
        pruner.validate(self.config)
        return pruner

    # ---- public API

    def __call__(self, input_ids, pixel_values, *, attention_mask=None, image_sizes=None, pruner=None,
                 text=None) -> ModelOutput:
        """Logits over the assembled (optionally pruned) sequence.

        Args:
          input_ids: int (B, L), HF processor convention (image placeholder expanded per visual token).
          pixel_values: float (NI, C, S, S), one image per placeholder run, in order.
          attention_mask: (B, L) 1 for real tokens (left padding), default all ones.
          image_sizes: LLaVA-NeXT only: (NI, 2) original (height, width) of each image, as the HF processor
            returns it; pixel_values is then (NI, tiles, C, S, S).
          pruner: a model-facing pruner (``vlmprune.prune.get(name, ...)``) or None.
          text: instruction per batch row for text-guided pruners (HERO); default: decoded from the prompt.

        Returns:
          ModelOutput(logits float32 (B, L', V), mask bool (B, L')), L' = L when not pruning.
        """
        pruner = self._check_pruner(pruner)
        plan, pix, layout, stride = self._plan(input_ids, attention_mask, pixel_values, pruner, image_sizes, text)
        return self._forward_jit(self.params, *self._args(input_ids, pix, plan, layout), pruner=pruner, stride=stride)

    def vision(self, pixel_values, *, cls_attention_layers=(), key_layers=(), hidden_state_layers=(),
               output_hidden_states=False, post_layernorm=False) -> dict:
        """What a pruning method consumes: see ``Llava.encode`` (features, cls_attn, keys, hidden_states)."""
        pixel_values = self._check_pixels(pixel_values)
        if self.config.model_type == "llava_next":  # (NI, T, C, S, S) -> tiles (NI·T, C, S, S)
            pixel_values = np.asarray(pixel_values).reshape((-1,) + tuple(pixel_values.shape[2:]))
        return self._vision_jit(
            {"params": self.params}, jnp.asarray(pixel_values, self.dtype),
            cls_attention_layers=tuple(cls_attention_layers), key_layers=tuple(key_layers),
            hidden_state_layers=tuple(hidden_state_layers), output_hidden_states=output_hidden_states,
            post_layernorm=post_layernorm,
        )

    def prefill(self, input_ids, pixel_values, *, attention_mask=None, image_sizes=None, pruner=None,
                max_new_tokens=32, text=None):
        """Prefill step of generation: (last logits (B, V), cache, next positions (B,), plan)."""
        pruner = self._check_pruner(pruner)
        _checks.check_int("max_new_tokens", max_new_tokens, lo=1)
        plan, pix, layout, stride = self._plan(input_ids, attention_mask, pixel_values, pruner, image_sizes, text)
        max_len = plan.length + max_new_tokens
        rope_type = dict(self.config.text.rope_scaling).get("rope_type", "default")
        if rope_type == "dynamic" and max_len > self.config.text.max_position_embeddings:
            raise ValueError(f"sequence of {max_len} tokens exceeds max_position_embeddings "
                             f"({self.config.text.max_position_embeddings}) of a dynamic-RoPE model")
        out = self._prefill_jit(self.params, *self._args(input_ids, pix, plan, layout), pruner=pruner, stride=stride,
                                max_len=max_len)
        return (*out, plan)

    def generate(self, input_ids, pixel_values, *, attention_mask=None, image_sizes=None, pruner=None,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, text=None) -> np.ndarray:
        """New token ids int32 (B, max_new_tokens), padded with the pad id after EOS.

        Batches use left padding (``attention_mask``). Greedy by default; ``do_sample`` enables temperature and
        nucleus sampling with a ``jax.random`` key from ``seed``.
        """
        _checks.check_float("temperature", temperature, lo=0.0, lo_open=True)
        _checks.check_float("top_p", top_p, lo=0.0, hi=1.0, lo_open=True)
        logits, cache, next_pos, plan = self.prefill(
            input_ids, pixel_values, attention_mask=attention_mask, image_sizes=image_sizes, pruner=pruner,
            max_new_tokens=max_new_tokens, text=text,
        )
        out = self._decode_jit(
            self.params, logits, cache, next_pos, jax.random.PRNGKey(seed), jnp.float32(temperature),
            jnp.float32(top_p), start_slot=plan.length + 1, max_new_tokens=int(max_new_tokens),
            do_sample=bool(do_sample), eos_ids=self.config.eos_token_ids, pad_id=self.config.pad_token_id,
        )
        return np.asarray(out)

    def compile_counts(self) -> dict[str, int]:
        """How many programs each jitted entry point has compiled (for tests and diagnostics)."""
        return {
            "forward": self._forward_jit._cache_size(),
            "prefill": self._prefill_jit._cache_size(),
            "decode": self._decode_jit._cache_size(),
            "vision": self._vision_jit._cache_size(),
        }

    def save(self, directory: str) -> None:
        """Write params with orbax plus the HF config (and processor) so ``vlmprune.load`` restores it."""
        from vlmprune.checkpoint import save_model

        save_model(self, directory)


def load(path: str, *, dtype="float32", mesh=None, image_aspect: str | None = None) -> LlavaModel:
    """Load a HF LLaVA directory (safetensors) or a directory written by ``LlavaModel.save``.

    Args:
      path: directory with ``config.json`` and ``*.safetensors`` (llava-hf layout, old or new key prefixes),
        or a vlmprune (orbax) checkpoint directory.
      dtype: "float32", "bfloat16" or "float16" for params and activations.
      mesh: optional ``jax.sharding.Mesh`` with axes "data" and/or "model": params are placed with
        ``vlmprune.sharding.RULES`` (tensor parallel over heads and MLP), inputs split over the batch.
      image_aspect: None keeps the checkpoint's processor; "pad" / "crop" picks the pipeline (``vlmprune.preprocess``).

    Raises:
      FileNotFoundError / ValueError / CheckpointError naming every problem with the files.
    """
    from vlmprune.checkpoint import load_model

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected a HF LLaVA checkpoint or a vlmprune checkpoint)")
    if image_aspect is not None:
        preprocess.check_aspect(image_aspect)
    model = load_model(path, dtype=_dtype(dtype), mesh=mesh)
    if image_aspect is not None:
        preprocess.set_image_aspect(model.processor, image_aspect, is_next=model.config.model_type == "llava_next")
    return model


def hf_config_dict(model: LlavaModel) -> dict:
    return json.loads(model.hf_config.to_json_string()) if model.hf_config is not None else {}


__all__ = ["LlavaModel", "ModelOutput", "load"]
