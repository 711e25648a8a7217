"""Efficiency benchmark: ``vlmprune bench`` (and ``experiments/efficiency.py`` for the full tables).

For a model preset, a dtype and a list of pruning methods/budgets it measures, per run (median and spread over
``repeats`` timed runs after ``warmup`` untimed ones, every figure behind ``jax.block_until_ready``):

* analytic LLM-prefill FLOPs (``algorithms.md`` §6: ``F = L·(4nd² + 2n²d + k·ndm)`` MACs, ×2 for FLOPs, with
  ``n = n_text + kept visual tokens``; k = 2 is the papers' convention, k = 3 counts SwiGLU's three matrices) and
  XLA's own count (``compiled.cost_analysis()["flops"]``) of the LLM prefill program and of the whole prefill;
* vision encoder time (``Llava.encode`` with the method's taps: CLS-attention rows / keys of the scoring layer);
* selection time (the method's pure selection on precomputed encoder outputs, jitted, without the projector —
  DivPrune selects on post-projector embeddings, so those are precomputed for it) and select+project time
  (what the pipeline runs between encoder and LLM);
* LLM prefill time (``Llava.prefill`` on the assembled embeddings into a fresh KV cache, last-token logits);
* time to first token (``LlavaModel.prefill`` end to end, host planning included, + greedy first token);
* decode tokens/s at batch 1 and at a larger batch (``_decode_jit`` with an EOS that never fires, so every run
  decodes exactly ``max_new_tokens`` tokens; batch throughput counts the tokens of every row);
* KV-cache bytes and peak device memory where the backend reports it (``memory_stats``; n/a on CPU).

``compare_torch`` loads the same checkpoint directory with ``transformers.LlavaForConditionalGeneration``
(SDPA attention), feeds it the tokens JAX kept (HF's own projected features at the kept indices; methods that
merge tokens get JAX's merged tokens) and times the same figures under ``torch.inference_mode()``; JAX and
PyTorch repeats are interleaved so that background load hits both alike. Ratios are JAX/PyTorch.

Presets: ``tiny`` and ``cpu-small`` are random HF-format checkpoints written once under
``checkpoints/bench-<preset>/``; the real shapes (``llava-1.5-7b``, ``llava-1.5-13b``, ``llava-next-7b``) are
initialised directly on the device in the requested dtype (never written to disk) and refused on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from typing import Any, Callable

import numpy as np

# ----------------------------------------------------------------------------------------------- presets

_CLIP_L336 = dict(vision_hidden_size=1024, vision_intermediate_size=4096, vision_num_hidden_layers=24,
                  vision_num_attention_heads=16, vision_image_size=336, vision_patch_size=14,
                  vision_projection_dim=768)
_VICUNA_7B = dict(text_hidden_size=4096, text_intermediate_size=11008, text_num_hidden_layers=32,
                  text_num_attention_heads=32, text_num_key_value_heads=32, text_vocab_size=32064,
                  text_max_position_embeddings=4096)
_VICUNA_13B = dict(_VICUNA_7B, text_hidden_size=5120, text_intermediate_size=13824, text_num_hidden_layers=40,
                   text_num_attention_heads=40, text_num_key_value_heads=40)


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    overrides: dict
    real: bool  # params built on the device in memory (never written to disk)
    description: str
    next_model: bool = False
    gpu_only: bool = False  # refused on the CPU backend (real shapes)


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", dict(vision_image_size=56, vision_num_hidden_layers=3, text_num_hidden_layers=2,
                                text_hidden_size=64, text_intermediate_size=128), False,
                   "16 visual tokens, 2-layer LLM: smoke tests only"),
    "cpu-small": Preset(
        "cpu-small",
        dict(vision_image_size=336, vision_patch_size=14, vision_hidden_size=768, vision_intermediate_size=3072,
             vision_num_hidden_layers=8, vision_num_attention_heads=12, vision_projection_dim=512,
             text_hidden_size=1024, text_intermediate_size=2816, text_num_hidden_layers=6,
             text_num_attention_heads=16, text_num_key_value_heads=16, text_vocab_size=32064,
             text_max_position_embeddings=2048),
        False, "CLIP-B-like 8-layer tower at 336 px (576 visual tokens) + 6-layer d1024 LLaMA, 32k vocab"),
    "tiny-next": Preset("tiny-next", dict(vision_image_size=56, vision_num_hidden_layers=3, text_num_hidden_layers=2,
                                          text_hidden_size=64, text_intermediate_size=128), True,
                        "tiny LLaVA-NeXT (anyres tiles of 16 tokens), params in memory: smoke tests only",
                        next_model=True),
    "llava-1.5-7b": Preset("llava-1.5-7b", dict(_CLIP_L336, **_VICUNA_7B), True,
                           "CLIP-L/14-336 + Vicuna-7B shapes (random weights)", gpu_only=True),
    "llava-1.5-13b": Preset("llava-1.5-13b", dict(_CLIP_L336, **_VICUNA_13B), True,
                            "CLIP-L/14-336 + Vicuna-13B shapes (random weights)", gpu_only=True),
    "llava-next-7b": Preset("llava-next-7b", dict(_CLIP_L336, **_VICUNA_7B), True,
                            "LLaVA-NeXT-7B shapes (anyres, up to 5 tiles of 576 tokens; random weights)",
                            next_model=True, gpu_only=True),
}

DEFAULT_METHODS = ("none", "vispruner:64,128,192", "fastervlm:64", "hired:0.2", "divprune:64")
PROMPT = "What is in the image? Describe the picture in detail."
GiB = 1024**3


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked (unknown preset, not enough device memory, ...)."""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- methods

#: what a bare budget number means per method
_BUDGET_FIELD = {"vispruner": "num_keep", "fastervlm": "num_keep", "divprune": "num_keep", "random": "num_keep",
                 "uniform": "num_keep", "hired": "budget_rate", "fastv": "keep_ratio", "visionzip": None,
                 "prumerge_plus": None}


@dataclasses.dataclass(frozen=True)
class MethodRun:
    label: str
    method: str
    budget: Any
    settings: dict
    pruner: Any  # a vlmprune pruner or None


def _num(s: str):
    """A setting's value: int, float, True/False, None, or the string itself."""
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def parse_methods(specs) -> list[MethodRun]:
    """``name[:budget,budget...][:key=value,...]`` -> runs. ``none`` = no pruning.

    Budgets: kept tokens (``num_keep``) for vispruner/fastervlm/divprune/random/uniform, the budget rate for hired,
    the keep ratio for fastv, the total kept tokens for visionzip (split 54:10 like its README's 64 = 54 dominant
    + 10 contextual). LLaVA-NeXT: per-tile budgets, as the methods define them.
    Examples: ``vispruner:64,128,192``, ``hired:0.2``, ``fastv:0.25``, ``vispruner:64:important_ratio=0.25``,
    ``prumerge_plus::plus=False`` (settings without a budget).
    """
    from vlmprune import prune

    runs: list[MethodRun] = []
    for spec in specs:
        for part in str(spec).split():
            bits = part.split(":")
            name = bits[0].lower().replace("-", "_")
            if name in ("none", "full", "baseline"):
                runs.append(MethodRun("none", "none", None, {}, None))
                continue
            if name not in prune.REGISTRY:
                raise BenchError(f"unknown method {bits[0]!r} in {part!r}; choose from none, "
                                 f"{', '.join(sorted(prune.REGISTRY))}")
            budgets = [_num(b) for b in bits[1].split(",") if b] if len(bits) > 1 and bits[1] else [None]
            if any(not isinstance(b, (int, float)) or isinstance(b, bool) for b in budgets if b is not None):
                raise BenchError(f"budgets in {part!r} must be numbers")
            extra = {}
            if len(bits) > 2:
                for kv in ",".join(bits[2:]).split(","):
                    if not kv:
                        continue
                    k, _, v = kv.partition("=")
                    if not k or not v:
                        raise BenchError(f"bad setting {kv!r} in {part!r}: write key=value")
                    extra[k] = _num(v)
            for b in budgets:
                kw = dict(extra)
                if b is not None:
                    field = _BUDGET_FIELD.get(name)
                    if name == "visionzip":
                        b = int(b)
                        contextual = max(1, round(b * 10 / 64))
                        kw.update(dominant=b - contextual, contextual=contextual)
                    elif field is None:
                        raise BenchError(f"{name} takes no budget (its kept count is adaptive); write just {name!r}")
                    else:
                        kw[field] = b
                try:
                    pruner = prune.get(name, **kw)
                except (TypeError, ValueError) as e:
                    raise BenchError(f"{part}: {e}") from e
                label = name if b is None else f"{name}@{b}"
                if extra:
                    label += "(" + ",".join(f"{k}={v}" for k, v in extra.items()) + ")"
                runs.append(MethodRun(label, name, b, kw, pruner))
    if not runs:
        raise BenchError("no methods given")
    return runs


# ----------------------------------------------------------------------------------------------- timing


def _stats(xs: list[float]) -> dict | None:
    if not xs:
        return None
    a = np.asarray(xs, float)
    med = float(np.median(a))
    return {"median": med, "min": float(a.min()), "max": float(a.max()), "n": int(a.size),
            "spread": float((a.max() - a.min()) / 2 / med) if med else 0.0}


def _timed(fn: Callable[[], Any], sync: Callable[[Any], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    sync(out)
    return time.perf_counter() - t0, out


def _jax_sync(x):
    import jax

    return jax.block_until_ready(x)


def _torch_sync(x):
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return x


#: the selection alone is timed over at least this many calls: it takes milliseconds, and its median is the
#: numerator of a target (share of the encoder's time) that 3 calls on a noisy host leave ~10 % uncertain
SELECTION_REPEATS = 20


def measure(jfn, tfn=None, *, repeats: int, warmup: int, scale: float = 1e3, invert: float | None = None):
    """Time jfn (JAX) and tfn (PyTorch, optional), interleaved. Returns (jax stats, torch stats).

    Times are in ms (``scale``); with ``invert=k`` the figure is a rate ``k / seconds`` instead.
    """
    js, ts = [], []
    for i in range(warmup + repeats):
        dj, _ = _timed(jfn, _jax_sync)
        dt = _timed(tfn, _torch_sync)[0] if tfn is not None else None
        if i >= warmup:
            js.append(invert / dj if invert else dj * scale)
            if dt is not None:
                ts.append(invert / dt if invert else dt * scale)
    return _stats(js), _stats(ts)


# ----------------------------------------------------------------------------------------------- model building


def preset_dir(preset: str, root: str = "checkpoints") -> str:
    return os.path.join(root, f"bench-{preset}")


def _hf_config(preset: Preset):
    """(tokenizer, HF config, processor) for an in-memory preset."""
    from vlmprune import tiny

    tok = tiny.build_tokenizer()
    ids = (len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    if preset.next_model:
        cfg = tiny.tiny_llava_next_config(*ids, **preset.overrides)
        return tok, cfg, tiny.build_next_processor(tok, cfg)
    cfg = tiny.tiny_llava_config(*ids, **preset.overrides)
    return tok, cfg, tiny.build_processor(tok, cfg)


def ensure_checkpoint(preset: str, root: str = "checkpoints", seed: int = 0) -> str:
    """Write the preset's random HF checkpoint once (tiny / cpu-small); reuse it afterwards."""
    from vlmprune.tiny import write_random_llava

    p = PRESETS[preset]
    d = preset_dir(preset, root)
    if os.path.exists(os.path.join(d, "model.safetensors")):
        return d
    log(f"writing random {preset} checkpoint (HF format) to {d} ...")
    t = time.perf_counter()
    write_random_llava(d, seed=seed, **p.overrides)
    log(f"written in {time.perf_counter() - t:.1f}s")
    return d


def _param_count(abstract) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)))


def memory_estimate(cfg, n_params: int, dtype_bytes: int, *, seq_len: int, batch: int) -> dict:
    """Rough device-memory need (bytes): params + batch KV cache + prefill activations + float32 logits."""
    t = cfg.text
    kv = 2 * t.num_hidden_layers * batch * seq_len * t.num_key_value_heads * t.head_dim * dtype_bytes
    act = batch * seq_len * (4 * t.hidden_size + 3 * t.intermediate_size) * dtype_bytes * 2
    logits = batch * seq_len * t.vocab_size * 4
    params = n_params * dtype_bytes
    total = int((params + kv + act + logits) * 1.15)
    return {"params": params, "kv_cache": kv, "activations": act, "logits": logits, "total": total}


def _hash_uniform(shape, salt: int, dtype):
    """Deterministic uniform(-0.5, 0.5) noise from an integer hash of the element index (murmur3 finaliser).

    Cheap to compile (a few integer ops on an iota), unlike ``jax.random``'s generators, which matters for the
    many distinct parameter shapes of a model; quality is ample for random-weight timing runs.
    """
    import jax.numpy as jnp

    h = jnp.arange(math.prod(shape), dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) + jnp.uint32(salt * 0x85EBCA77 % 2**32)
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    u = (h >> 8).astype(jnp.float32) * (1.0 / 2**24) - 0.5
    return u.reshape(shape).astype(dtype)


def _random_params(abstract, dtype, seed: int, std: float = 0.02):
    """Random params straight on the device in ``dtype``: norm scales 1, biases 0, the rest uniform with
    standard deviation ``std``. One jitted program builds the whole tree; nothing is staged on the host or
    written to disk."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict, unflatten_dict

    items = sorted(flatten_dict(abstract).items())
    scale = std * math.sqrt(12.0)

    def make():
        out = {}
        for i, (path, leaf) in enumerate(items):
            name, shape = path[-1], tuple(leaf.shape)
            if name == "scale" or (name == "weight" and len(shape) == 1):
                out[path] = jnp.ones(shape, dtype)
            elif name == "bias":
                out[path] = jnp.zeros(shape, dtype)
            else:
                out[path] = (_hash_uniform(shape, seed * 100003 + i, jnp.float32) * scale).astype(dtype)
        return unflatten_dict(out)

    return jax.jit(make)()


def build_model(preset: str, dtype: str = "float32", *, root: str = "checkpoints", seed: int = 0,
                batch: int = 4, max_new_tokens: int = 32):
    """(LlavaModel, checkpoint directory or None, info dict). Refuses presets that cannot fit the backend."""
    import jax

    import vlmprune
    from vlmprune.checkpoint import _abstract
    from vlmprune.config import LlavaConfig
    from vlmprune.model import DTYPES, LlavaModel
    from vlmprune.models.llava import Llava

    if preset not in PRESETS:
        raise BenchError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise BenchError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    p = PRESETS[preset]
    dev = jax.devices()[0]
    if not p.real:
        d = ensure_checkpoint(preset, root, seed)
        model = vlmprune.load(d, dtype=dtype)
        return model, d, {"params": _param_count(model.params)}

    tok, hf, proc = _hf_config(p)
    nbytes = np.dtype(DTYPES[dtype]).itemsize
    try:
        cfg = LlavaConfig.from_hf(hf)
        module = Llava(cfg, dtype=DTYPES[dtype])
        abstract = _abstract(module, cfg)
    except (ValueError, NotImplementedError) as e:
        raise BenchError(f"{preset}: this vlmprune cannot build the model: {e}") from e
    n_params = _param_count(abstract)
    tiles = 5 if p.next_model else 1  # NeXT: base image + up to a 2x2 grid
    vis = cfg.tokens_per_image * tiles
    est = memory_estimate(cfg, n_params, nbytes, seq_len=vis + 96 + max_new_tokens, batch=batch)
    need = (f"{preset} ({n_params / 1e9:.2f} B params) needs about {est['total'] / GiB:.1f} GiB of device memory "
            f"in {dtype} (params {est['params'] / GiB:.1f} GiB + KV cache at batch {batch} "
            f"{est['kv_cache'] / GiB:.2f} GiB + activations/logits "
            f"{(est['activations'] + est['logits']) / GiB:.1f} GiB)")
    if p.gpu_only and dev.platform == "cpu":
        raise BenchError(f"{need}; real-shape presets run on GPU/TPU only and this JAX backend is CPU. "
                         f"Use --preset cpu-small (or tiny) on CPU.")
    stats = dev.memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit and est["total"] > limit:
        raise BenchError(f"{need}, but {dev.device_kind} has {limit / GiB:.1f} GiB; try --dtype bfloat16, a smaller "
                         f"--batch, or a larger device.")
    log(f"initialising random {preset} params on {dev.device_kind} in {dtype} ({n_params / 1e9:.3f} B) ...")
    params = _random_params(abstract, DTYPES[dtype], seed)
    model = LlavaModel(cfg, params, dtype=dtype, processor=proc, hf_config=hf)
    return model, None, {"params": n_params, "memory_estimate": est}


def bench_inputs(model, batch: int = 1):
    """Processor outputs (numpy) for the demo image and PROMPT, the same pair repeated ``batch`` times."""
    from vlmprune.demo import prepare_inputs
    from vlmprune.tiny import demo_image

    x = prepare_inputs(model, [demo_image()], [PROMPT])
    return {k: np.concatenate([v] * batch) for k, v in x.items()}


# ----------------------------------------------------------------------------------------------- JAX pieces


class JaxPieces:
    """Jitted components of the pipeline for one model, reused across methods."""

    def __init__(self, model):
        import functools

        import jax
        import jax.numpy as jnp

        from vlmprune import model as model_mod
        from vlmprune.models.llama import KVCache
        from vlmprune.models.llava import Llava

        self.model = model
        m = model.module

        def llm_prefill(params, embeds, positions, mask, extra, *, max_len):
            """The model's prefill minus the assembly: ``Llava.prefill`` into a fresh cache, last-token logits.

            ``extra``: whatever ``_assemble`` returns after (embeds, mask, positions) (FastV's config), passed on.
            """
            b = embeds.shape[0]
            cache = KVCache.zeros(m.config.text, b, max_len, embeds.dtype)
            out = m.apply({"params": params}, embeds, positions, mask, cache, *extra, method=Llava.prefill)
            logits, out_mask, cache = out if len(out) == 3 else (out[0], mask, out[1])
            last = out_mask.shape[1] - 1 - jnp.argmax(out_mask[:, ::-1], axis=1)
            return logits[jnp.arange(b), last], cache

        self.llm_prefill = jax.jit(llm_prefill, static_argnames=("max_len",))
        self.assemble = jax.jit(functools.partial(model_mod._assemble, m), static_argnames=("pruner", "stride"))
        self.project = jax.jit(lambda params, f: m.apply({"params": params}, f, method=Llava.project))
        self._next_tokens = getattr(model_mod, "_next_visual_tokens", None)

    def llm_prefill_program(self, args, static, max_len: int):
        """The assembled sequence of ``args``/``static`` (from :func:`plan_inputs`) and the compiled LLM prefill on
        it: (compiled, its call arguments, XLA's FLOP count of the program)."""
        params = self.model.params
        embeds, mask, positions, *extra = self.assemble(params, *args, **static)
        call = (params, embeds, positions, mask, tuple(extra))
        lowered = self.llm_prefill.lower(*call, max_len=max_len)
        # FLOPs of the program as written (pre-optimisation HLO): after compilation the GPU backend moves the
        # matmuls into library calls that its cost model does not count.
        return lowered.compile(), call, _xla_flops(lowered)

    def vision_fn(self, pruner, pix):
        """pix: the pixel array the model itself encodes (NeXT: (NI, T, C, S, S), flattened to tiles here)."""
        req = pruner.vision_request(self.model.config) if pruner is not None else {}
        kw = dict(cls_attention_layers=tuple(req.get("cls_attention_layers", ())),
                  key_layers=tuple(req.get("key_layers", ())),
                  post_layernorm=bool(req.get("post_layernorm", False)))
        if req.get("hidden_state_layers"):
            kw["hidden_state_layers"] = tuple(req["hidden_state_layers"])
        pv = {"params": self.model.params}
        px = pix.reshape((-1,) + tuple(pix.shape[-3:])) if pix.ndim == 5 else pix
        return lambda: self.model._vision_jit(pv, px, **kw)

    def next_select_project(self, pruner, stride):
        """NeXT: jitted (params, enc, layout) -> (tokens, valid) with the official packing (model internals)."""
        import jax

        from vlmprune.models.llava import Llava

        if self._next_tokens is None:
            raise NotImplementedError("this vlmprune.model has no LLaVA-NeXT packing")
        m, fn = self.model.module, self._next_tokens

        def go(params, enc, layout):
            project = lambda f: m.apply({"params": params}, f, method=Llava.project)  # noqa: E731
            return fn(m, params, enc, project, pruner, layout, stride)

        return jax.jit(go)


def plan_inputs(model, x, pruner):
    """The model's own host planning: (plan, jit args, static kwargs, layout or None).

    Goes through ``LlavaModel._plan`` / ``_args`` so that the timed pieces see exactly the arrays
    ``LlavaModel.prefill`` builds (older versions of these return fewer items; both are handled).
    """
    ids, am, pix = x["input_ids"], x["attention_mask"], x["pixel_values"]
    if model.config.model_type == "llava_next":
        out = model._plan(ids, am, pix, pruner, x.get("image_sizes"))
    else:
        out = model._plan(ids, am, pix, pruner)
    if isinstance(out, tuple):
        plan, pix2, layout, stride = out
        return plan, model._args(ids, pix2, plan, layout), {"pruner": pruner, "stride": stride}, layout
    return out, model._args(ids, pix, out), {"pruner": pruner}, None


def _prefill_kw(model, x) -> dict:
    return {"image_sizes": x["image_sizes"]} if model.config.model_type == "llava_next" else {}


def _project_first(pruner, enc, project_shape_fn) -> bool:
    """True when the pruner projects all features before selecting (DivPrune)."""
    import jax

    shapes = []

    def rec(x):
        shapes.append(tuple(x.shape))
        return x

    jax.eval_shape(lambda e: pruner.apply(e, rec), enc)
    full = tuple(enc["features"].shape)
    return any(s == full for s in shapes) and project_shape_fn(pruner) < full[1]


def recover_indices(tokens, valid, projected_all, rtol: float = 1e-3):
    """Indices (NI, K) of the kept tokens among the projected features, or None when the method merged tokens."""
    t = np.asarray(tokens, np.float64)
    p = np.asarray(projected_all, np.float64)
    v = np.asarray(valid, bool)
    idx = np.zeros(v.shape, np.int64)
    for i in range(t.shape[0]):
        d2 = (t[i] ** 2).sum(-1)[:, None] - 2 * t[i] @ p[i].T + (p[i] ** 2).sum(-1)[None, :]
        j = d2.argmin(-1)
        err = np.sqrt(np.maximum(d2[np.arange(len(j)), j], 0)) / (np.linalg.norm(t[i], axis=-1) + 1e-12)
        if np.any(err[v[i]] > rtol):
            return None
        idx[i] = np.where(v[i], j, 0)
    return idx


# ----------------------------------------------------------------------------------------------- PyTorch side


class TorchSide:
    """The HF PyTorch model with the same weights, fed the tokens JAX kept."""

    def __init__(self, directory: str | None, dtype: str, *, model=None):
        """Load the HF model from ``directory``, or (``directory=None``) build it from ``model``'s HF config and
        copy ``model``'s params into it (the real-shape presets, whose random weights live only on the device)."""
        import torch
        from transformers import LlavaForConditionalGeneration

        self.torch = torch
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if directory is not None:
            self.model = LlavaForConditionalGeneration.from_pretrained(
                directory, attn_implementation="sdpa", dtype=self.dtype).to(self.device).eval()
        else:
            self.model = self._from_params(model)
        cfg = self.model.config
        self.feature_layer = cfg.vision_feature_layer
        self.strategy = cfg.vision_feature_select_strategy

    def _from_params(self, model):
        """The HF LLaVA of ``model.hf_config`` holding ``model.params``, copied tensor by tensor (DLPack on the
        same device, else through the host) so the weights are never held twice over."""
        torch = self.torch
        from transformers import LlavaForConditionalGeneration

        from vlmprune.weights import LLAVA_RENAMES, LLAVA_RULES, iter_export

        if model.hf_config is None or model.config.model_type != "llava":
            raise BenchError("the PyTorch comparison supports LLaVA-1.5 models with an HF config")
        with torch.device(self.device):
            tm = LlavaForConditionalGeneration._from_config(model.hf_config, attn_implementation="sdpa",
                                                            dtype=self.dtype)
        state = tm.state_dict()

        def convert(x):
            if self.device == "cuda" and x.devices().pop().platform == "gpu":
                return torch.from_dlpack(x)
            a = np.array(x)  # a writable host copy
            if a.dtype.name == "bfloat16":  # numpy has no bf16 for torch.from_numpy: go through its bits
                return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
            return torch.from_numpy(a)

        with torch.no_grad():
            for key, value in iter_export(model.params, {k: tuple(v.shape) for k, v in state.items()},
                                          LLAVA_RULES, renames=LLAVA_RENAMES, convert=convert):
                state[key].copy_(value)
        return tm.eval()

    def t(self, x, dtype=None):
        return self.torch.as_tensor(np.array(x), device=self.device, dtype=dtype)  # a writable copy

    # pieces -------------------------------------------------------------------------------------
    def features(self, pix):
        hs = self.model.model.vision_tower(pix, output_hidden_states=True).hidden_states[self.feature_layer]
        return hs[:, 1:] if self.strategy == "default" else hs

    def visual_tokens(self, pix, sel):
        """HF projected visual tokens for the kept selection ``sel`` (dict from ``_torch_selection``)."""
        f = self.features(pix)
        proj = self.model.model.multi_modal_projector
        if sel is None:
            return proj(f)
        if sel["tokens"] is not None:  # merging method: JAX's merged tokens
            return sel["tokens"]
        rows = self.torch.arange(f.shape[0], device=self.device)[:, None]
        if sel["project_first"]:
            return proj(f)[rows, sel["idx"]]
        return proj(f[rows, sel["idx"]])

    def assemble(self, input_ids, vis, plan_t):
        torch = self.torch
        text_src, vis_src, text_mask, valid = plan_t
        emb = self.model.get_input_embeddings()(input_ids)
        rows = torch.arange(input_ids.shape[0], device=self.device)[:, None]
        t_emb = emb[rows, text_src.clamp(min=0)]
        flat = vis.reshape(-1, vis.shape[-1]).to(t_emb.dtype)
        is_vis = vis_src >= 0
        v_emb = flat[vis_src.clamp(min=0)]
        embeds = torch.where(is_vis[..., None], v_emb, t_emb)
        mask = torch.where(is_vis, valid.reshape(-1)[vis_src.clamp(min=0)], text_mask)
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)
        return embeds, mask.long(), pos

    def prefill(self, embeds, mask, pos, logits_to_keep=0):
        return self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True,
                          logits_to_keep=logits_to_keep)

    def decode(self, first_tok, cache, mask, next_pos, n_new: int):
        """A closure that greedily decodes ``n_new - 1`` tokens after ``first_tok`` with HF's KV cache.

        Every call starts from the same prefill state: the cache (a private copy) is cut back to its prefill
        length at the end of each call (a view, no copy).
        """
        import copy

        torch = self.torch
        cache = copy.deepcopy(cache)
        start_len = cache.get_seq_length()
        b = first_tok.shape[0]
        ones = torch.ones((b, 1), dtype=mask.dtype, device=self.device)

        def run():
            tok, m = first_tok, mask
            for t in range(n_new - 1):
                m = torch.cat([m, ones], dim=1)
                out = self.model(input_ids=tok[:, None], attention_mask=m, position_ids=(next_pos + t)[:, None],
                                 past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1].argmax(-1)
            for layer in cache.layers:
                layer.keys = layer.keys[..., :start_len, :]
                layer.values = layer.values[..., :start_len, :]
            return tok

        return run

    @staticmethod
    def cache_bytes(cache) -> int | None:
        layers = getattr(cache, "layers", None)
        try:
            if layers is not None:
                return int(sum(lyr.keys.nbytes + lyr.values.nbytes for lyr in layers))
            return int(sum(k.nbytes + v.nbytes for k, v in zip(cache.key_cache, cache.value_cache)))
        except Exception:  # noqa: BLE001
            return None

    def peak_bytes(self) -> int | None:
        if self.device == "cuda":
            return int(self.torch.cuda.max_memory_allocated())
        return None

    def flops(self, fn) -> int | None:
        try:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                fn()
            return int(fc.get_total_flops())
        except Exception:  # noqa: BLE001
            return None


# ----------------------------------------------------------------------------------------------- one run


def _xla_flops(compiled_or_lowered) -> float | None:
    try:
        ca = compiled_or_lowered.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


def _peak_device_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    v = stats.get("peak_bytes_in_use")
    return int(v) if v is not None else None


def run_one(model, pieces: JaxPieces, run: MethodRun, x1, xb, *, torch_side: TorchSide | None, repeats: int,
            warmup: int, max_new_tokens: int, progress=log) -> dict:
    """Measure one method/budget. x1 / xb: processor outputs at batch 1 / the decode batch."""
    import jax
    import jax.numpy as jnp

    from vlmprune.flops import prefill_macs
    from vlmprune.model import sample_token

    cfg = model.config
    p = run.pruner
    if p is not None:
        p.validate(cfg)
    params = model.params
    is_next = cfg.model_type == "llava_next"
    ids1, pix1, am1 = x1["input_ids"], x1["pixel_values"], x1["attention_mask"]
    res: dict = {"label": run.label, "method": run.method, "budget": run.budget, "settings": run.settings}
    try:
        res["load_average_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    jx: dict = {}
    th: dict = {}
    tick = time.perf_counter()
    inside_llm = p is not None and getattr(p, "inside_llm", False)
    if inside_llm and torch_side is not None:
        torch_side = None  # HF has no in-LLM pruning to feed the same tokens to
        res["torch_skipped"] = "method prunes inside the LLM; HF LLaVA has no equivalent"

    def step(name):
        progress(f"  {run.label}: {name} ({time.perf_counter() - tick:.1f}s)")

    plan, args, static, layout = plan_inputs(model, x1, p)
    pix_model = args[1]  # the pixel array the model encodes (NeXT: padded to the largest tile grid)

    # ---- vision encoder
    step("vision encoder")
    vis_fn = pieces.vision_fn(p, pix_model)
    pix_t = torch_side.t(pix1, torch_side.dtype) if torch_side else None
    tfn = (lambda: torch_side.features(pix_t)) if torch_side else None
    with _torch_mode(torch_side):
        jx["vision_ms"], th["vision_ms"] = measure(vis_fn, tfn, repeats=repeats, warmup=warmup)
    enc = vis_fn()

    # ---- selection (pure) and select+project
    step("selection")
    project_first = False
    if is_next:
        sp_jit = pieces.next_select_project(None if inside_llm else p, static.get("stride"))
        sp = lambda: sp_jit(params, enc, layout)  # noqa: E731
        if p is None or inside_llm:
            jx["selection_ms"] = None
        else:
            # the selection alone on precomputed encoder outputs (and, for DivPrune, projected embeddings)
            enc_sel = dict(enc, embeddings=pieces.project(params, enc["features"]))
            sel_jit = jax.jit(lambda e, lay: p.tile_mask(e, lay, cfg))
            jx["selection_ms"], _ = measure(lambda: sel_jit(enc_sel, layout),
                                            repeats=max(repeats, SELECTION_REPEATS), warmup=warmup)
        tokens, valid = sp()
        proj_all = None
    else:
        proj_all = pieces.project(params, enc["features"])
        if p is None or inside_llm:
            jx["selection_ms"] = None
            sp = lambda: pieces.project(params, enc["features"])  # noqa: E731
            tokens, valid = proj_all, jnp.ones(proj_all.shape[:2], bool)
        else:
            project_first = _project_first(p, enc, lambda q: q.num_slots(cfg))
            enc_sel = dict(enc, features=proj_all) if project_first else enc
            sel_jit = jax.jit(lambda e: p.apply(e, lambda f: f))
            jx["selection_ms"], _ = measure(lambda: sel_jit(enc_sel), repeats=max(repeats, SELECTION_REPEATS),
                                            warmup=warmup)
            proj = type(model.module).project
            apply_jit = jax.jit(lambda prm, e: p.apply(e, lambda f: model.module.apply({"params": prm}, f,
                                                                                      method=proj)))
            sp = lambda: apply_jit(params, enc)  # noqa: E731
            tokens, valid = sp()
    jx["select_project_ms"], _ = measure(sp, repeats=repeats, warmup=warmup)
    n_valid = float(np.asarray(valid).sum(-1).mean())
    res["visual_tokens"] = n_valid
    res["visual_slots"] = int(valid.shape[1])
    res["project_first"] = project_first

    # ---- LLM prefill on the assembled sequence
    step("LLM prefill")
    max_len = plan.length + max_new_tokens
    compiled, call, res["xla_flops_llm_prefill"] = pieces.llm_prefill_program(args, static, max_len)
    res["xla_flops_prefill"] = _xla_flops(model._prefill_jit.lower(params, *args, **static, max_len=max_len))
    n_text = int(np.asarray(plan.text_mask[0]).sum())
    res["text_tokens"] = n_text
    res["sequence_slots"] = int(plan.length)
    t = cfg.text
    n = n_text + n_valid
    fkw = {}
    if inside_llm:  # FastV: all tokens up to layer K, the kept ones after (algorithms.md §6.1)
        kept = p.kept_per_image(cfg) * plan.num_images
        fkw = dict(drop_after_layer=p.layer, dropped=int(round(n_valid)) - kept)
        res["visual_tokens"] = kept
        res["visual_tokens_before_drop"] = n_valid
    dims = (t.hidden_size, t.intermediate_size, t.num_hidden_layers)
    macs2 = prefill_macs(int(round(n)), *dims, **fkw)
    macs3 = prefill_macs(int(round(n)), *dims, ffn="3ndm", **fkw)
    res["analytic"] = {"n_tokens": n, "macs_2ndm": macs2, "flops_2ndm": 2 * macs2, "flops_3ndm": 2 * macs3}

    tsel = None
    if torch_side is not None:
        tsel = _torch_selection(torch_side, p, tokens, valid, proj_all, project_first)
        res["torch_tokens"] = "jax-merged" if (tsel and tsel["tokens"] is not None) else "hf-at-kept-indices"
        plan_t = tuple(torch_side.t(a) for a in (plan.text_src, plan.vis_src, plan.text_mask)) + (
            torch_side.t(np.asarray(valid)),)
        ids_t = torch_side.t(ids1, torch_side.torch.long)
        with _torch_mode(torch_side):
            vis_t = torch_side.visual_tokens(pix_t, tsel)
            emb_t, mask_t, pos_t = torch_side.assemble(ids_t, vis_t, plan_t)
        tfn = lambda: torch_side.prefill(emb_t, mask_t, pos_t)  # noqa: E731
        tfn_last = lambda: torch_side.prefill(emb_t, mask_t, pos_t, logits_to_keep=1)  # noqa: E731
    else:
        tfn = tfn_last = None
    with _torch_mode(torch_side):
        jx["llm_prefill_ms"], th["llm_prefill_ms"] = measure(
            lambda: compiled(*call), tfn, repeats=repeats, warmup=warmup)
        if torch_side is not None:
            _, th["llm_prefill_last_logits_ms"] = measure(lambda: None, tfn_last, repeats=repeats, warmup=warmup)
            th["flops_llm_prefill"] = torch_side.flops(tfn)
            res["logits_vs_torch"] = _compare_logits(compiled(*call)[0], tfn_last().logits[:, -1])

    # ---- time to first token (whole pipeline)
    step("time to first token")
    state = {}
    pkw = _prefill_kw(model, x1)

    def jttft():
        logits, cache, pos, plan_ = model.prefill(ids1, pix1, attention_mask=am1, pruner=p,
                                                  max_new_tokens=max_new_tokens, **pkw)
        first = sample_token(logits, None, do_sample=False, temperature=1.0, top_p=1.0)
        state.update(logits=logits, cache=cache, pos=pos, plan=plan_, first=first)
        return first

    tttft = None
    if torch_side is not None:
        tst = {}

        def tttft():
            if p is None:
                m = torch_side.t(am1)
                out = torch_side.model(input_ids=ids_t, pixel_values=pix_t, attention_mask=m, use_cache=True,
                                       logits_to_keep=1)
                pos = m.long().sum(1)
            else:
                v = torch_side.visual_tokens(pix_t, tsel)
                e, m, ps = torch_side.assemble(ids_t, v, plan_t)
                out = torch_side.model(inputs_embeds=e, attention_mask=m, position_ids=ps, use_cache=True,
                                       logits_to_keep=1)
                pos = m.sum(1)
            tok = out.logits[:, -1].argmax(-1)
            tst.update(cache=out.past_key_values, tok=tok, mask=m.long(), pos=pos)
            return tok

    with _torch_mode(torch_side):
        jx["ttft_ms"], th["ttft_ms"] = measure(jttft, tttft, repeats=repeats, warmup=warmup)
    cache = state["cache"]
    jx["kv_cache_bytes"] = cache.nbytes
    if torch_side is not None:
        th["kv_cache_bytes"] = torch_side.cache_bytes(tst["cache"])

    # ---- decode, batch 1
    step("decode (batch 1)")
    n_new = max_new_tokens

    def jdecode(st):
        return lambda: model._decode_jit(
            params, st["logits"], st["cache"], st["pos"], jax.random.PRNGKey(0), jnp.float32(1.0),
            jnp.float32(1.0), start_slot=st["plan"].length + 1, max_new_tokens=n_new, do_sample=False,
            eos_ids=(-1,), pad_id=cfg.pad_token_id)

    with _torch_mode(torch_side):
        tdec = (torch_side.decode(tst["tok"], tst["cache"], tst["mask"], tst["pos"], n_new)
                if torch_side is not None else None)
        jx["decode_tok_s_b1"], th["decode_tok_s_b1"] = measure(
            jdecode(state), tdec, repeats=repeats, warmup=warmup, invert=(n_new - 1))

    # ---- decode, larger batch (the same prompt and image repeated: identical selection in every row)
    bsz = xb["input_ids"].shape[0]
    step(f"decode (batch {bsz})")
    stb = {}

    def jttft_b():
        out = model.prefill(xb["input_ids"], xb["pixel_values"], attention_mask=xb["attention_mask"], pruner=p,
                            max_new_tokens=max_new_tokens, **_prefill_kw(model, xb))
        stb.update(logits=out[0], cache=out[1], pos=out[2], plan=out[3])
        return sample_token(out[0], None, do_sample=False, temperature=1.0, top_p=1.0)

    # the batch's time to first token and LLM prefill (JAX only): where the weight reads are shared by B rows,
    # i.e. where the prefill becomes compute-bound and pruning's FLOP cut shows in the time
    jx[f"ttft_ms_b{bsz}"], _ = measure(jttft_b, repeats=repeats, warmup=warmup)
    tdec_b = cache_b_t = None
    if torch_side is not None:
        # The rows are identical, so the batch cache is the batch-1 prefill cache repeated (no second prefill).
        import copy

        cache_b_t = copy.deepcopy(tst["cache"])
        cache_b_t.batch_repeat_interleave(bsz)
        rep = lambda a: a.repeat(bsz, *([1] * (a.dim() - 1)))  # noqa: E731
        tdec_b = torch_side.decode(rep(tst["tok"]), cache_b_t, rep(tst["mask"]), rep(tst["pos"]), n_new)
    with _torch_mode(torch_side):
        jx[f"decode_tok_s_b{bsz}"], th[f"decode_tok_s_b{bsz}"] = measure(
            jdecode(stb), tdec_b, repeats=repeats, warmup=warmup, invert=bsz * (n_new - 1))
    stb.clear()  # drop the batch's caches before the batch LLM prefill allocates its own
    tdec_b = cache_b_t = None  # noqa: F841
    plan_bb, args_b, static_b, _ = plan_inputs(model, xb, p)
    comp_b, call_b, res[f"xla_flops_llm_prefill_b{bsz}"] = pieces.llm_prefill_program(
        args_b, static_b, plan_bb.length + max_new_tokens)
    jx[f"llm_prefill_ms_b{bsz}"], _ = measure(lambda: comp_b(*call_b), repeats=repeats, warmup=warmup)
    jx["peak_device_bytes"] = _peak_device_bytes()
    if torch_side is not None:
        th["peak_device_bytes"] = torch_side.peak_bytes()

    res["jax"] = jx
    if torch_side is not None:
        res["torch"] = th
        res["ratio"] = _ratios(jx, th)
    step("done")
    return res


def _compare_logits(jax_logits, torch_logits) -> dict:
    """Last-token logits of the two LLM prefills on the same sequence: relative L2 error and top-1 agreement.

    The check that both sides compute the same model (bf16: expect ~1e-2; float32: ~1e-6)."""
    a = np.asarray(jax_logits, np.float32)
    b = torch_logits.float().cpu().numpy()
    return {"rel_l2": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)),
            "top1_agree": float((a.argmax(-1) == b.argmax(-1)).mean())}


def _torch_selection(ts: TorchSide, pruner, tokens, valid, proj_all, project_first):
    if pruner is None:
        return None
    idx = recover_indices(tokens, valid, proj_all)
    if idx is None:
        return {"idx": None, "tokens": ts.t(np.asarray(tokens, np.float32), ts.dtype), "project_first": False}
    return {"idx": ts.t(idx, ts.torch.long), "tokens": None, "project_first": project_first}


class _torch_mode:
    """``torch.inference_mode()`` when a PyTorch side exists, else nothing."""

    def __init__(self, ts):
        self.cm = ts.torch.inference_mode() if ts is not None else None

    def __enter__(self):
        if self.cm is not None:
            self.cm.__enter__()

    def __exit__(self, *a):
        if self.cm is not None:
            return self.cm.__exit__(*a)


def _med(x):
    if isinstance(x, dict):
        return x.get("median")
    return x


def _ratios(jx: dict, th: dict) -> dict:
    out = {}
    for k, v in jx.items():
        a, b = _med(v), _med(th.get(k))
        out[k] = (a / b) if (a is not None and b) else None
    return out


# ----------------------------------------------------------------------------------------------- the benchmark


@dataclasses.dataclass
class BenchConfig:
    preset: str = "cpu-small"
    methods: tuple = DEFAULT_METHODS
    dtype: str = "float32"
    batch: int = 4  # the larger decode batch
    repeats: int = 3
    warmup: int = 1
    max_new_tokens: int = 16
    compare_torch: bool = False
    out_dir: str = os.path.join("experiments", "results")
    tag: str | None = None
    checkpoint_root: str = "checkpoints"
    seed: int = 0
    plots: bool = True
    threads: int | None = None  # 1: single-threaded JAX (XLA flags) and PyTorch; None: each framework's default


def run_bench(bc: BenchConfig) -> dict:
    """Run the benchmark, write ``efficiency_<tag>.{json,md}`` and PNGs under ``bc.out_dir``; return the results."""
    t_start = time.perf_counter()
    if bc.threads is not None:
        _set_threads(bc.threads)
    if bc.compare_torch:
        # PyTorch's OpenMP workers spin after every op unless told to sleep, and in one process they then take the
        # CPU cores from XLA's threads: a 607x2816 @ 2816x1024 matmul ran 1.8x slower in JAX right after a torch
        # call on 2 cores. PASSIVE must be set before torch loads its OpenMP runtime.
        if "torch" in sys.modules and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
            log("warning: torch was imported before the benchmark set OMP_WAIT_POLICY=PASSIVE; its spinning "
                "OpenMP threads can slow the JAX timings on CPU")
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # Two frameworks share the accelerator: JAX gets a fixed half (its default arena is 75 %, and a growing,
        # non-preallocated pool keeps what it freed, which starved PyTorch's 13B decode at batch 8 on an H100).
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    import jax

    runs = parse_methods(bc.methods)
    if bc.batch < 1 or bc.repeats < 1 or bc.warmup < 0 or bc.max_new_tokens < 2:
        raise BenchError("need --batch >= 1, --repeats >= 1, --warmup >= 0, --max-new-tokens >= 2")
    dev = jax.devices()[0]
    if bc.compare_torch and bc.preset in PRESETS and PRESETS[bc.preset].next_model:
        raise BenchError(f"--compare-torch supports the LLaVA-1.5 presets; {bc.preset} is a LLaVA-NeXT model")
    model, directory, info = build_model(bc.preset, bc.dtype, root=bc.checkpoint_root, seed=bc.seed,
                                         batch=bc.batch, max_new_tokens=bc.max_new_tokens)
    torch_side = None
    if bc.compare_torch:
        if directory is None:
            log(f"building the HF PyTorch model with the same {bc.dtype} weights ...")
        else:
            log(f"loading the HF PyTorch model from {directory} ...")
        torch_side = TorchSide(directory, bc.dtype, model=model)
    x1 = bench_inputs(model, 1)
    xb = bench_inputs(model, bc.batch)
    meta = _meta(bc, model, info, dev, x1, torch_side)
    pieces = JaxPieces(model)
    results = []
    for i, run in enumerate(runs, 1):
        log(f"[{i}/{len(runs)}] {run.label} (elapsed {time.perf_counter() - t_start:.0f}s)")
        try:
            results.append(run_one(model, pieces, run, x1, xb, torch_side=torch_side, repeats=bc.repeats,
                                   warmup=bc.warmup, max_new_tokens=bc.max_new_tokens))
        except (NotImplementedError, ValueError, ImportError) as e:
            log(f"  {run.label}: FAILED: {type(e).__name__}: {e}")
            if os.environ.get("VLMPRUNE_BENCH_DEBUG"):
                import traceback

                traceback.print_exc()
            results.append({"label": run.label, "method": run.method, "budget": run.budget,
                            "settings": run.settings, "error": f"{type(e).__name__}: {e}"})
        _write_partial(bc, meta, results)
    _derived(results, meta)
    meta["elapsed_s"] = time.perf_counter() - t_start
    out = {"meta": meta, "runs": results, "targets": evaluate_targets(results, meta)}
    paths = write_outputs(out, bc)
    out["files"] = paths
    log(f"done in {meta['elapsed_s']:.0f}s; wrote {', '.join(paths)}")
    return out


def _set_threads(n: int) -> None:
    """Pin both frameworks to ``n`` threads. JAX: only 1 is supported (XLA flags, read when the backend starts)."""
    if n != 1:
        raise BenchError("--threads supports only 1 (XLA's CPU thread pool size cannot be set otherwise)")
    flags = os.environ.get("XLA_FLAGS", "")
    want = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    if want not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + want).strip()
    try:
        import jax

        if jax._src.xla_bridge.backends_are_initialized():  # noqa: SLF001
            log("warning: the JAX backend is already initialised; --threads 1 does not apply to JAX")
    except Exception:  # noqa: BLE001
        pass
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def _write_partial(bc, meta, results):
    os.makedirs(bc.out_dir, exist_ok=True)
    with open(os.path.join(bc.out_dir, f"efficiency_{_tag(bc)}.partial.json"), "w") as f:
        json.dump({"meta": meta, "runs": results}, f, indent=1, default=_json_default)


def _tag(bc: BenchConfig) -> str:
    if bc.tag:
        return bc.tag
    import jax

    return f"{jax.devices()[0].platform}-{bc.preset}-{bc.dtype}"


def _meta(bc, model, info, dev, x1, torch_side) -> dict:
    import jax

    c = model.config
    meta = {
        "preset": bc.preset, "preset_description": PRESETS[bc.preset].description, "dtype": bc.dtype,
        "backend": dev.platform, "device": dev.device_kind, "devices": jax.device_count(),
        "host_cpus": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
        "repeats": bc.repeats, "selection_repeats": max(bc.repeats, SELECTION_REPEATS), "warmup": bc.warmup,
        "decode_batch": bc.batch, "max_new_tokens": bc.max_new_tokens,
        "params": info.get("params"), "tokens_per_image": c.tokens_per_image,
        "input_tokens": int(x1["input_ids"].shape[1]),
        "vision": dataclasses.asdict(c.vision),
        "text": {k: v for k, v in dataclasses.asdict(c.text).items() if k != "rope_scaling"},
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "threads": bc.threads or "default",
        "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
        "compare_torch": torch_side is not None, "peak_flops": peak_flops(dev.device_kind, bc.dtype),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        meta["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    if torch_side is not None:
        import torch
        import transformers

        meta.update(torch=torch.__version__, transformers=transformers.__version__,
                    torch_threads=torch.get_num_threads(),
                    torch_device=torch_side.device, torch_attn="sdpa",
                    omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    if "memory_estimate" in info:
        meta["memory_estimate"] = info["memory_estimate"]
    return meta


#: Dense bf16/fp16 peak FLOP/s from the vendors' datasheets (no sparsity), matched on ``device_kind``
#: (first match wins, so the more specific names come first). Override with VLMPRUNE_PEAK_FLOPS.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12), ("H20", 148e12),
    ("GH200", 989.4e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The chip's dense peak FLOP/s for ``dtype`` (bf16/fp16 only), or None where unknown."""
    env = os.environ.get("VLMPRUNE_PEAK_FLOPS")
    if env:
        return float(env)
    if dtype not in ("bfloat16", "float16"):
        return None
    for name, v in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return v
    return None


def _mfu(mfu: dict, suffix: str = "") -> float | None:
    """A run's LLM-prefill MFU (``suffix`` "" for batch 1, "_b<B>" for the larger batch): XLA's FLOP count where
    the backend gives one, else the analytic 3ndm count."""
    v = mfu.get("xla" + suffix)
    return v if v is not None else mfu.get("analytic_3ndm" + suffix)


def _derived(results: list[dict], meta: dict | None = None) -> None:
    """Reductions vs the unpruned run, selection share of the encoder time and model FLOP utilisation."""
    from vlmprune.flops import reduction

    peak = (meta or {}).get("peak_flops")
    base = next((r for r in results if r.get("method") == "none" and "error" not in r), None)
    for r in results:
        if "error" in r:
            continue
        j = r["jax"]
        if peak and j.get("llm_prefill_ms"):
            sec = j["llm_prefill_ms"]["median"] / 1e3
            fl = r.get("xla_flops_llm_prefill")
            r["mfu_llm_prefill"] = {"xla": fl / sec / peak if fl else None,
                                    "analytic_3ndm": r["analytic"]["flops_3ndm"] / sec / peak}
            b = (meta or {}).get("decode_batch")
            flb, tb = r.get(f"xla_flops_llm_prefill_b{b}"), j.get(f"llm_prefill_ms_b{b}")
            if tb:
                secb = tb["median"] / 1e3
                r["mfu_llm_prefill"][f"xla_b{b}"] = flb / secb / peak if flb else None
                r["mfu_llm_prefill"][f"analytic_3ndm_b{b}"] = b * r["analytic"]["flops_3ndm"] / secb / peak
        if j.get("selection_ms") and j.get("vision_ms"):
            r["selection_share_of_vision"] = j["selection_ms"]["median"] / j["vision_ms"]["median"]
        if base is None:
            continue
        a, b = r["analytic"], base["analytic"]
        r["reduction_vs_none"] = red = {
            "analytic_2ndm": reduction(a["flops_2ndm"], b["flops_2ndm"]),
            "analytic_3ndm": reduction(a["flops_3ndm"], b["flops_3ndm"]),
            "xla_llm_prefill": (reduction(r["xla_flops_llm_prefill"], base["xla_flops_llm_prefill"])
                                if r.get("xla_flops_llm_prefill") and base.get("xla_flops_llm_prefill") else None),
            "jax_llm_prefill_ms": 1 - j["llm_prefill_ms"]["median"] / base["jax"]["llm_prefill_ms"]["median"],
            "jax_ttft_ms": 1 - j["ttft_ms"]["median"] / base["jax"]["ttft_ms"]["median"],
        }
        for k in [k for k in j if k.startswith(("ttft_ms_b", "llm_prefill_ms_b"))]:
            if j.get(k) and base["jax"].get(k):
                red[f"jax_{k}"] = 1 - j[k]["median"] / base["jax"][k]["median"]
        if "torch" in r and r["torch"].get("llm_prefill_ms") and base.get("torch", {}).get("llm_prefill_ms"):
            tb = base["torch"]
            red["torch_llm_prefill_ms"] = 1 - r["torch"]["llm_prefill_ms"]["median"] / tb["llm_prefill_ms"]["median"]
            red["torch_ttft_ms"] = 1 - r["torch"]["ttft_ms"]["median"] / tb["ttft_ms"]["median"]


def evaluate_targets(results: list[dict], meta: dict) -> dict:
    """The issue's targets, read off the results (None where a figure is missing)."""
    ok = [r for r in results if "error" not in r]
    t: dict = {}
    b = meta.get("decode_batch", 4)
    if meta.get("compare_torch"):
        pr = [r["ratio"]["llm_prefill_ms"] for r in ok if r.get("ratio", {}).get("llm_prefill_ms")]
        t["jax_llm_prefill_le_torch"] = {"max_ratio": max(pr) if pr else None,
                                         "median_ratio": float(np.median(pr)) if pr else None,
                                         "met": bool(pr) and max(pr) <= 1.0, "aim_0.7_met": bool(pr) and max(pr) <= 0.7}
        tt = [r["ratio"]["ttft_ms"] for r in ok if r.get("ratio", {}).get("ttft_ms")]
        t["jax_ttft_le_torch"] = {"max_ratio": max(tt) if tt else None, "met": bool(tt) and max(tt) <= 1.0}
        for key in ("decode_tok_s_b1", f"decode_tok_s_b{b}"):
            d = [r["ratio"][key] for r in ok if r.get("ratio", {}).get(key)]
            t[f"jax_{key}_ge_torch"] = {"min_ratio": min(d) if d else None, "met": bool(d) and min(d) >= 1.0}
    shares = {r["label"]: r.get("selection_share_of_vision") for r in ok if r.get("method") != "none"}
    vals = [v for v in shares.values() if v is not None]
    t["selection_le_2pct_of_vision"] = {"shares": shares, "max": max(vals) if vals else None,
                                        "met": bool(vals) and max(vals) <= 0.02}
    vp = next((r for r in ok if r.get("method") == "vispruner" and r.get("budget") == 64
               and r.get("reduction_vs_none")), None)
    base = next((r for r in ok if r.get("method") == "none"), None)
    if meta.get("backend") != "cpu":  # the accelerator targets, at batch 1 and at the larger batch
        if base is not None and base.get("mfu_llm_prefill"):
            m = base["mfu_llm_prefill"]
            v = _mfu(m)
            t["unpruned_llm_prefill_mfu_ge_40pct_b1"] = {"mfu": v, "mfu_analytic_3ndm": m["analytic_3ndm"],
                                                         "peak_tflops": meta["peak_flops"] / 1e12, "met": v >= 0.40}
            vb = _mfu(m, f"_b{b}")
            if vb is not None:
                t[f"unpruned_llm_prefill_mfu_ge_40pct_b{b}"] = {"mfu": vb, "met": vb >= 0.40}
        if base is not None and vp is not None:
            for key, name in (("ttft_ms", "b1"), (f"ttft_ms_b{b}", f"b{b}")):
                if vp["jax"].get(key) and base["jax"].get(key):
                    r = vp["jax"][key]["median"] / base["jax"][key]["median"]
                    t[f"vispruner64_ttft_le_0.3x_unpruned_{name}"] = {"ratio": r, "met": r <= 0.3}
    if vp is not None:
        red = vp["reduction_vs_none"]
        t["vispruner64_llm_prefill_cut_ge_70pct"] = {"cut": red["jax_llm_prefill_ms"],
                                                     "met": red["jax_llm_prefill_ms"] >= 0.70}
        # the measured count: XLA's, else (GPU, where the lowered program reports none) PyTorch's FLOP counter
        measured = red["xla_llm_prefill"]
        src = "xla"
        tf_vp, tf_base = vp.get("torch", {}).get("flops_llm_prefill"), (base or {}).get("torch", {}).get(
            "flops_llm_prefill")
        if measured is None and tf_vp and tf_base:
            measured, src = 1 - tf_vp / tf_base, "torch_flop_counter"
        t["vispruner64_flops_cut_as_predicted"] = {
            "analytic_2ndm": red["analytic_2ndm"], "analytic_3ndm": red["analytic_3ndm"],
            "measured": measured, "measured_by": src,
            "met": measured is not None and abs(measured - red["analytic_3ndm"]) <= 0.05,
        }
    return t


# ----------------------------------------------------------------------------------------------- output


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _fmt_t(s: dict | None, digits: int = 1) -> str:
    if not s:
        return "n/a"
    return f"{s['median']:.{digits}f} ±{100 * s['spread']:.0f}%"


def _fmt_r(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _fmt_b(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def _fmt_g(x) -> str:
    return "n/a" if x is None else f"{x / 1e9:.2f}"


def markdown(out: dict) -> str:
    meta, runs = out["meta"], out["runs"]
    b = meta["decode_batch"]
    lines = [
        f"# Efficiency: {meta['preset']} ({meta['dtype']}) on {meta['backend']} ({meta['device']})",
        "",
        f"{meta['preset_description']}; {meta['params'] / 1e6:.0f} M params, {meta['tokens_per_image']} visual tokens "
        f"per image, {meta['input_tokens']} input tokens. Median ± half range over {meta['repeats']} timed runs after "
        f"{meta['warmup']} warm-up run(s); decode = {meta['max_new_tokens']} greedy tokens (EOS disabled). "
        f"jax {meta['jax']}" + (f", torch {meta.get('torch')} ({meta.get('torch_threads')} threads, SDPA, "
                                f"OMP_WAIT_POLICY={meta.get('omp_wait_policy')}), "
                                f"transformers {meta.get('transformers')}" if meta.get("compare_torch") else "") +
        f". Host: {meta['host_cpus']} CPUs" + (f", load average at start {meta['load_average'][0]:.1f}"
                                                if meta.get("load_average") else "") + ".",
        "",
        "FLOPs: analytic = 2 × §6 MACs over `n_text + kept` tokens (2ndm = papers' convention, 3ndm = SwiGLU); "
        "XLA = `cost_analysis()` of the LLM-prefill program (incl. LM head over all positions, norms, RoPE). "
        "Selection = the method alone on precomputed encoder outputs (median over "
        f"{meta.get('selection_repeats', meta['repeats'])} calls); select+proj adds the projector.",
        "",
        "## JAX",
        "",
        "| method | kept | analytic GFLOPs 2ndm (cut) | XLA GFLOPs LLM prefill (cut) | vision ms "
        "| selection ms (% of vision) | select+proj ms | LLM prefill ms (cut) | TTFT ms | decode tok/s b1 "
        f"| decode tok/s b{b} | KV cache MiB | peak dev MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} |" + " |" * 11)
            continue
        j, red = r["jax"], r.get("reduction_vs_none", {})
        def cut(k, red=red, r=r):
            return f" ({100 * red[k]:.1f}%)" if red.get(k) is not None and r["method"] != "none" else ""

        share = r.get("selection_share_of_vision")
        sel = "—" if j.get("selection_ms") is None else f"{_fmt_t(j['selection_ms'], 2)} ({100 * share:.2f}%)"
        lines.append(
            f"| {r['label']} | {r['visual_tokens']:g} | {_fmt_g(r['analytic']['flops_2ndm'])}{cut('analytic_2ndm')} | "
            f"{_fmt_g(r.get('xla_flops_llm_prefill'))}{cut('xla_llm_prefill')} | {_fmt_t(j['vision_ms'])} | {sel} | "
            f"{_fmt_t(j['select_project_ms'], 2)} | {_fmt_t(j['llm_prefill_ms'])}{cut('jax_llm_prefill_ms')} | "
            f"{_fmt_t(j['ttft_ms'])} | {_fmt_t(j['decode_tok_s_b1'])} | {_fmt_t(j.get(f'decode_tok_s_b{b}'))} | "
            f"{_fmt_b(j['kv_cache_bytes'])} | {_fmt_b(j.get('peak_device_bytes'))} |")
    lines += ["", f"Batch {b} (the same prompt and image in every row; JAX): the weight reads are shared by {b} rows, so "
                  "the prefill is compute-bound and pruning's FLOP cut shows in the time.", "",
              f"| method | TTFT ms b{b} (cut) | LLM prefill ms b{b} (cut) | MFU LLM prefill b1 | MFU b{b} |",
              "|---|---|---|---|---|"]
    for r in runs:
        if "error" in r:
            continue
        j, red, mfu = r["jax"], r.get("reduction_vs_none", {}), r.get("mfu_llm_prefill") or {}

        def pc(x):
            return "n/a" if x is None else f"{100 * x:.1f}%"

        def cutb(k, red=red, r=r):
            return f" ({100 * red[k]:.1f}%)" if red.get(k) is not None and r["method"] != "none" else ""

        lines.append(f"| {r['label']} | {_fmt_t(j.get(f'ttft_ms_b{b}'))}{cutb(f'jax_ttft_ms_b{b}')} | "
                     f"{_fmt_t(j.get(f'llm_prefill_ms_b{b}'))}{cutb(f'jax_llm_prefill_ms_b{b}')} | "
                     f"{pc(_mfu(mfu))} | {pc(_mfu(mfu, f'_b{b}'))} |")
    if meta.get("peak_flops"):
        lines += ["", f"MFU = FLOPs of the LLM prefill (XLA's count of the program, or where the backend gives none "
                      f"the analytic 3ndm count) ÷ median time ÷ the chip's dense peak of "
                      f"{meta['peak_flops'] / 1e12:.0f} TFLOP/s ({meta['dtype']})."]
    if meta.get("compare_torch"):
        lines += [
            "",
            "## JAX vs PyTorch (HF `LlavaForConditionalGeneration`, SDPA, same weights, same kept tokens)",
            "",
            "Each cell: JAX / PyTorch (ratio JAX÷PyTorch). Times in ms (lower is better), decode in tokens/s "
            "(higher is better). PyTorch TTFT uses JAX's precomputed kept indices (its selection is not run); "
            "PyTorch LLM prefill = `model(inputs_embeds=..., use_cache=True)` (full logits, like JAX), "
            "`last-logits` = the same with `logits_to_keep=1` (what `generate` does).",
            "",
            "| method | vision ms | LLM prefill ms | PT LLM prefill last-logits ms | TTFT ms | decode tok/s b1 "
            f"| decode tok/s b{b} | KV cache MiB | FLOPs LLM prefill G (XLA / torch counter) | peak dev MiB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            if "error" in r or "torch" not in r:
                continue
            j, th, ra = r["jax"], r["torch"], r["ratio"]

            def cell(k, d=1):
                return f"{_fmt_t(j.get(k), d)} / {_fmt_t(th.get(k), d)} ({_fmt_r(ra.get(k))})"

            kvr = (j["kv_cache_bytes"] / th["kv_cache_bytes"]) if th.get("kv_cache_bytes") else None
            fl = th.get("flops_llm_prefill")
            flr = (r["xla_flops_llm_prefill"] / fl) if fl and r.get("xla_flops_llm_prefill") else None
            lines.append(
                f"| {r['label']} | {cell('vision_ms')} | {cell('llm_prefill_ms')} | "
                f"{_fmt_t(th.get('llm_prefill_last_logits_ms'))} | {cell('ttft_ms')} | {cell('decode_tok_s_b1')} | "
                f"{cell(f'decode_tok_s_b{b}')} | {_fmt_b(j['kv_cache_bytes'])} / {_fmt_b(th.get('kv_cache_bytes'))} "
                f"({_fmt_r(kvr)}) | {_fmt_g(r.get('xla_flops_llm_prefill'))} / {_fmt_g(fl)} ({_fmt_r(flr)}) | "
                f"{_fmt_b(j.get('peak_device_bytes'))} / {_fmt_b(th.get('peak_device_bytes'))} |")
    lc = [f"{r['label']} {r['logits_vs_torch']['rel_l2']:.1e} / {r['logits_vs_torch']['top1_agree']:.0%}"
          for r in runs if r.get("logits_vs_torch")]
    if lc:
        lines += ["", "Same model on both sides: last-token logits of the two LLM prefills, relative L2 error / "
                      "top-1 agreement: " + ", ".join(lc) + "."]
    tg = out.get("targets") or {}
    if tg:
        lines += ["", "## Targets", ""]
        for k, v in tg.items():
            mark = "met" if v.get("met") else "NOT met"
            detail = ", ".join(f"{kk}={_short(vv)}" for kk, vv in v.items() if kk != "met")
            lines.append(f"- **{k}**: {mark} ({detail})")
    lines.append("")
    return "\n".join(lines)


def _short(v):
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items()) + "}"
    return str(v)


def plot(out: dict, path_prefix: str) -> list[str]:
    """``<prefix>_ttft.png`` and ``<prefix>_flops.png``: one line per method, PyTorch dashed beside JAX."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in out["runs"] if "error" not in r]
    methods = []
    for r in runs:
        if r["method"] not in methods:
            methods.append(r["method"])
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    meta = out["meta"]
    title = f"{meta['preset']} {meta['dtype']} on {meta['backend']}"
    paths = []

    def series(m, fn):
        pts = sorted((r["visual_tokens"], fn(r)) for r in runs if r["method"] == m and fn(r) is not None)
        return [p[0] for p in pts], [p[1] for p in pts]

    from matplotlib.lines import Line2D

    def legend(ax, styles):
        handles = [Line2D([], [], color=colors[m], marker="o", label=m) for m in methods
                   if any(ln.get_color() == colors[m] for ln in ax.lines)]
        handles += [Line2D([], [], color="0.3", linestyle=ls, marker=mk, label=lab) for lab, ls, mk in styles]
        if handles:
            ax.legend(handles=handles, fontsize=8)

    def finish(fig, ax, styles, ylabel, title_text, suffix):
        legend(ax, styles)
        ax.set_xlabel("kept visual tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title_text)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = f"{path_prefix}_{suffix}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    # time to first token
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        xs, ys = series(m, lambda r: r["jax"]["ttft_ms"]["median"])
        ax.plot(xs, ys, "o-", color=colors[m])
        xs, ys = series(m, lambda r: _med((r.get("torch") or {}).get("ttft_ms")))
        if xs:
            ax.plot(xs, ys, "s--", color=colors[m], alpha=0.7)
    styles = [("JAX", "-", "o")] + ([("PyTorch (HF)", "--", "s")] if meta.get("compare_torch") else [])
    paths.append(finish(fig, ax, styles, "time to first token (ms)", f"Time to first token — {title}", "ttft"))

    # FLOPs
    fig, ax = plt.subplots(figsize=(7, 4.5))
    has_torch = False
    for m in methods:
        xs, ys = series(m, lambda r: r["analytic"]["flops_2ndm"] / 1e9)
        ax.plot(xs, ys, "o-", color=colors[m])
        xs, ys = series(m, lambda r: r["xla_flops_llm_prefill"] / 1e9 if r.get("xla_flops_llm_prefill") else None)
        if xs:
            ax.plot(xs, ys, "^:", color=colors[m], alpha=0.8)
        xs, ys = series(m, lambda r: (r.get("torch") or {}).get("flops_llm_prefill") and
                        r["torch"]["flops_llm_prefill"] / 1e9 or None)
        if xs:
            has_torch = True
            ax.plot(xs, ys, "s--", color=colors[m], alpha=0.6)
    styles = [("analytic §6 (2ndm)", "-", "o"), ("XLA cost_analysis (JAX)", ":", "^")]
    if has_torch:
        styles.append(("torch FlopCounter (PyTorch)", "--", "s"))
    paths.append(finish(fig, ax, styles, "LLM prefill GFLOPs", f"Prefill FLOPs — {title}", "flops"))
    return paths


def write_outputs(out: dict, bc: BenchConfig) -> list[str]:
    os.makedirs(bc.out_dir, exist_ok=True)
    prefix = os.path.join(bc.out_dir, f"efficiency_{_tag(bc)}")
    with open(prefix + ".json", "w") as f:
        json.dump(out, f, indent=1, default=_json_default)
    with open(prefix + ".md", "w") as f:
        f.write(markdown(out))
    paths = [prefix + ".json", prefix + ".md"]
    if bc.plots:
        paths += plot(out, prefix)
    partial = prefix + ".partial.json"
    if os.path.exists(partial):
        os.remove(partial)
    return paths


def merge_outputs(paths: list[str], bc: BenchConfig) -> dict:
    """Merge result files of one preset/dtype/device (e.g. runs split over several sessions on a lent GPU).

    Later files replace earlier runs of the same label; derived figures and targets are recomputed, and the
    merged ``efficiency_<tag>.*`` files are written to ``bc.out_dir``.
    """
    outs = []
    for p in paths:
        with open(p) as f:
            outs.append(json.load(f))
    key = lambda m: (m["preset"], m["dtype"], m["device"], m["decode_batch"], m["max_new_tokens"])  # noqa: E731
    k0 = key(outs[0]["meta"])
    for p, o in zip(paths, outs):
        if key(o["meta"]) != k0:
            raise BenchError(f"cannot merge {p}: (preset, dtype, device, batch, new tokens) {key(o['meta'])} != {k0}")
    runs: dict[str, dict] = {}
    for o in outs:
        for r in o["runs"]:
            runs[r["label"]] = r
    meta = dict(outs[0]["meta"], merged_from=[os.path.basename(p) for p in paths],
                compare_torch=any(o["meta"].get("compare_torch") for o in outs))
    for o in outs[1:]:
        for k in ("torch", "transformers", "torch_threads", "torch_device", "torch_attn", "omp_wait_policy"):
            meta.setdefault(k, o["meta"].get(k))
    order = [r["label"] for o in outs for r in o["runs"]]
    results = [runs[lab] for lab in dict.fromkeys(order)]
    results.sort(key=lambda r: r.get("method") != "none")  # the unpruned baseline first
    for r in results:
        r.pop("reduction_vs_none", None)
    _derived(results, meta)
    out = {"meta": meta, "runs": results, "targets": evaluate_targets(results, meta)}
    out["files"] = write_outputs(out, bc)
    return out


# ----------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu-small", choices=list(PRESETS),
                   help="model shapes: tiny, cpu-small (CPU, minutes), llava-1.5-7b/13b, llava-next-7b (GPU/TPU)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="SPEC",
                   help="name[:budget,...][:key=val,...], e.g. none vispruner:64,128,192 fastervlm:64 hired:0.2 "
                        "divprune:64 (budget = kept tokens; hired: budget rate)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=4, help="the larger decode batch (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median and spread)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (the first compiles)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per decode run (default 16)")
    p.add_argument("--compare-torch", action="store_true",
                   help="also run the HF PyTorch model (same weights, same kept tokens) and print JAX/PyTorch ratios")
    p.add_argument("--out-dir", default=os.path.join("experiments", "results"))
    p.add_argument("--tag", default=None, help="output name efficiency_<tag>.* (default <backend>-<preset>-<dtype>)")
    p.add_argument("--checkpoint-root", default="checkpoints", help="where bench-<preset>/ checkpoints are written")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge efficiency_*.json files of one preset/device into efficiency_<tag>.* (no run)")
    p.add_argument("--threads", type=int, default=None, choices=[1],
                   help="1: run JAX (XLA flags) and PyTorch single-threaded (robust timings on a loaded host)")


def config_from_args(args) -> BenchConfig:
    return BenchConfig(preset=args.preset, methods=tuple(args.methods), dtype=args.dtype, batch=args.batch,
                       repeats=args.repeats, warmup=args.warmup, max_new_tokens=args.max_new_tokens,
                       compare_torch=args.compare_torch, out_dir=args.out_dir, tag=args.tag,
                       checkpoint_root=args.checkpoint_root, seed=args.seed, plots=not args.no_plots,
                       threads=args.threads)


def main_from_args(args) -> int:
    try:
        if args.merge:
            if not args.tag:
                raise BenchError("--merge needs --tag (the merged files' name)")
            out = merge_outputs(args.merge, config_from_args(args))
        else:
            out = run_bench(config_from_args(args))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(out))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vlmprune bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return main_from_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
