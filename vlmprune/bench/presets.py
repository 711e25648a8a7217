"""Model presets: random HF-format checkpoints on disk (``tiny``, ``cpu-small``) or real shapes built on the device.

``tiny``, ``cpu-small``, ``tiny-ov`` and ``cpu-small-ov`` are random HF checkpoints written once under
``checkpoints/bench-<preset>/``; the real shapes (``llava-1.5-7b``, ``llava-1.5-13b``, ``llava-next-7b``,
``llava-onevision-0.5b``, ``llava-onevision-7b``) and ``tiny-next`` are initialised directly on the device in the
requested dtype (never written to disk); the real shapes are refused on CPU.

The LLaVA-OneVision presets benchmark one fixed image size (``Preset.image_hw``, the demo image resized to it),
so that the packed block, and with it every figure, is the same on every run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

import vlmprune
from vlmprune import tiny
from vlmprune.anyres.onevision import CLASS_DEFAULT_PINPOINTS, geometry, image_layout
from vlmprune.bench import model_access as access
from vlmprune.bench.config import PROMPT, BenchError, log
from vlmprune.demo import prepare_inputs

_CLIP_L336 = dict(
    vision_hidden_size=1024,
    vision_intermediate_size=4096,
    vision_num_hidden_layers=24,
    vision_num_attention_heads=16,
    vision_image_size=336,
    vision_patch_size=14,
    vision_projection_dim=768,
)
_VICUNA_7B = dict(
    text_hidden_size=4096,
    text_intermediate_size=11008,
    text_num_hidden_layers=32,
    text_num_attention_heads=32,
    text_num_key_value_heads=32,
    text_vocab_size=32064,
    text_max_position_embeddings=4096,
)
_VICUNA_13B = dict(
    _VICUNA_7B,
    text_hidden_size=5120,
    text_intermediate_size=13824,
    text_num_hidden_layers=40,
    text_num_attention_heads=40,
    text_num_key_value_heads=40,
)
#: SigLIP so400m-patch14-384 as LLaVA-OneVision uses it: 26 layers (the 27th dropped), no pooling head;
#: 27 x 27 = 729 tokens per 384-px tile
_SIGLIP_SO400M = dict(
    vision_hidden_size=1152,
    vision_intermediate_size=4304,
    vision_num_hidden_layers=26,
    vision_num_attention_heads=16,
    vision_image_size=384,
    vision_patch_size=14,
)
#: the llava-hf OneVision checkpoints' anyres_max_9 canvases: (384a, 384b), a, b in 1..6, (height, width)
_OV_PINPOINTS = dict(
    image_grid_pinpoints=[list(p) for p in CLASS_DEFAULT_PINPOINTS], vision_aspect_ratio="anyres_max_9"
)
#: Qwen2-0.5B-Instruct with the converter's vocabulary (151936 + <image>, <video>, padded to a multiple of 64)
_QWEN2_05B = dict(
    text_hidden_size=896,
    text_intermediate_size=4864,
    text_num_hidden_layers=24,
    text_num_attention_heads=14,
    text_num_key_value_heads=2,
    text_vocab_size=152000,
    text_max_position_embeddings=32768,
    text_rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
#: Qwen2-7B-Instruct (152064 + 2, padded to a multiple of 64), untied LM head
_QWEN2_7B = dict(
    _QWEN2_05B,
    text_hidden_size=3584,
    text_intermediate_size=18944,
    text_num_hidden_layers=28,
    text_num_attention_heads=28,
    text_num_key_value_heads=4,
    text_vocab_size=152128,
    tie_word_embeddings=False,
)
#: the OneVision real-shape presets' image: a 3:4 photo, a 2x3 grid + base = 7 tiles, cropped to 54 x 73 tokens
#: (not downsampled): 729 + 54·74 = 4725 packed visual tokens
_OV_IMAGE_HW = (768, 1024)


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    overrides: dict
    real: bool  # params built on the device in memory (never written to disk)
    description: str
    next_model: bool = False
    gpu_only: bool = False  # refused on the CPU backend (real shapes)
    onevision: bool = False  # a LLaVA-OneVision model (SigLIP + Qwen2)
    image_hw: tuple[int, int] | None = None  # OneVision: the benchmark image's (height, width)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny",
        dict(
            vision_image_size=56,
            vision_num_hidden_layers=3,
            text_num_hidden_layers=2,
            text_hidden_size=64,
            text_intermediate_size=128,
        ),
        False,
        "16 visual tokens, 2-layer LLM: smoke tests only",
    ),
    "cpu-small": Preset(
        "cpu-small",
        dict(
            vision_image_size=336,
            vision_patch_size=14,
            vision_hidden_size=768,
            vision_intermediate_size=3072,
            vision_num_hidden_layers=8,
            vision_num_attention_heads=12,
            vision_projection_dim=512,
            text_hidden_size=1024,
            text_intermediate_size=2816,
            text_num_hidden_layers=6,
            text_num_attention_heads=16,
            text_num_key_value_heads=16,
            text_vocab_size=32064,
            text_max_position_embeddings=2048,
        ),
        False,
        "CLIP-B-like 8-layer tower at 336 px (576 visual tokens) + 6-layer d1024 LLaMA, 32k vocab",
    ),
    "tiny-next": Preset(
        "tiny-next",
        dict(
            vision_image_size=56,
            vision_num_hidden_layers=3,
            text_num_hidden_layers=2,
            text_hidden_size=64,
            text_intermediate_size=128,
        ),
        True,
        "tiny LLaVA-NeXT (anyres tiles of 16 tokens), params in memory: smoke tests only",
        next_model=True,
    ),
    "llava-1.5-7b": Preset(
        "llava-1.5-7b",
        dict(_CLIP_L336, **_VICUNA_7B),
        True,
        "CLIP-L/14-336 + Vicuna-7B shapes (random weights)",
        gpu_only=True,
    ),
    "llava-1.5-13b": Preset(
        "llava-1.5-13b",
        dict(_CLIP_L336, **_VICUNA_13B),
        True,
        "CLIP-L/14-336 + Vicuna-13B shapes (random weights)",
        gpu_only=True,
    ),
    "llava-next-7b": Preset(
        "llava-next-7b",
        dict(_CLIP_L336, **_VICUNA_7B),
        True,
        "LLaVA-NeXT-7B shapes (anyres, up to 5 tiles of 576 tokens; random weights)",
        next_model=True,
        gpu_only=True,
    ),
    "tiny-ov": Preset(
        "tiny-ov",
        {},
        False,
        "tiny LLaVA-OneVision (SigLIP 4x4 tokens per tile, 1x2 grid + base = 52 packed tokens), 2-layer Qwen2: "
        "smoke tests only",
        onevision=True,
        image_hw=(56, 112),
    ),
    "cpu-small-ov": Preset(
        "cpu-small-ov",
        dict(
            vision_image_size=384,
            vision_patch_size=14,
            vision_hidden_size=384,
            vision_intermediate_size=1536,
            vision_num_hidden_layers=6,
            vision_num_attention_heads=6,
            text_hidden_size=512,
            text_intermediate_size=1536,
            text_num_hidden_layers=4,
            text_num_attention_heads=8,
            text_num_key_value_heads=2,
            text_vocab_size=16384,
            text_max_position_embeddings=8192,
        ),
        False,
        "LLaVA-OneVision at the real 27x27 = 729 tokens per 384-px tile: SigLIP-like 6-layer d384 tower + 4-layer "
        "d512 Qwen2 (GQA 8/2, tied, 16k vocab); a 384x768 image = 1x2 grid + base, 729 + 27·55 = 2214 packed tokens",
        onevision=True,
        image_hw=(384, 768),
    ),
    "llava-onevision-0.5b": Preset(
        "llava-onevision-0.5b",
        dict(_SIGLIP_SO400M, **_QWEN2_05B, **_OV_PINPOINTS),
        True,
        "LLaVA-OneVision-0.5B shapes (SigLIP so400m 26 layers + Qwen2-0.5B, tied; anyres_max_9, 36 pinpoints; "
        "a 768x1024 image = 2x3 grid + base, 4725 packed tokens; random weights)",
        gpu_only=True,
        onevision=True,
        image_hw=_OV_IMAGE_HW,
    ),
    "llava-onevision-7b": Preset(
        "llava-onevision-7b",
        dict(_SIGLIP_SO400M, **_QWEN2_7B, **_OV_PINPOINTS),
        True,
        "LLaVA-OneVision-7B shapes (SigLIP so400m 26 layers + Qwen2-7B, untied; anyres_max_9, 36 pinpoints; "
        "a 768x1024 image = 2x3 grid + base, 4725 packed tokens; random weights)",
        gpu_only=True,
        onevision=True,
        image_hw=_OV_IMAGE_HW,
    ),
}


GiB = 1024**3


def preset_dir(preset: str, root: str = "checkpoints") -> str:
    return os.path.join(root, f"bench-{preset}")


def hf_config(preset: Preset):
    """(tokenizer, HF config, processor) for an in-memory preset."""
    if preset.onevision:
        tok = tiny.build_onevision_tokenizer()
        ids = (len(tok), tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<video>"), tok.pad_token_id)
        cfg = tiny.tiny_onevision_config(*ids, **preset.overrides)
        return tok, cfg, tiny.build_onevision_processor(tok, cfg)
    tok = tiny.build_tokenizer()
    ids = (len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    if preset.next_model:
        cfg = tiny.tiny_llava_next_config(*ids, **preset.overrides)
        return tok, cfg, tiny.build_next_processor(tok, cfg)
    cfg = tiny.tiny_llava_config(*ids, **preset.overrides)
    return tok, cfg, tiny.build_processor(tok, cfg)


def ensure_checkpoint(preset: str, root: str = "checkpoints", seed: int = 0) -> str:
    """Write the preset's random HF checkpoint once (tiny, cpu-small, tiny-ov, cpu-small-ov); reuse it afterwards."""
    p = PRESETS[preset]
    d = preset_dir(preset, root)
    if os.path.exists(os.path.join(d, "model.safetensors")):
        return d
    log(f"writing random {preset} checkpoint (HF format) to {d} ...")
    t = time.perf_counter()
    (tiny.write_random_onevision if p.onevision else tiny.write_random_llava)(d, seed=seed, **p.overrides)
    log(f"written in {time.perf_counter() - t:.1f}s")
    return d


def param_count(abstract) -> int:
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


def hash_uniform(shape, salt: int, dtype):
    """Deterministic uniform(-0.5, 0.5) noise from an integer hash of the element index (murmur3 finaliser).

    Cheap to compile (a few integer ops on an iota), unlike ``jax.random``'s generators, which matters for the
    many distinct parameter shapes of a model; quality is ample for random-weight timing runs.
    """
    h = jnp.arange(math.prod(shape), dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) + jnp.uint32(salt * 0x85EBCA77 % 2**32)
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    u = (h >> 8).astype(jnp.float32) * (1.0 / 2**24) - 0.5
    return u.reshape(shape).astype(dtype)


def random_params(abstract, dtype, seed: int, std: float = 0.02):
    """Random params straight on the device in ``dtype``: norm scales 1, biases 0, the rest uniform with
    standard deviation ``std``. One jitted program builds the whole tree; nothing is staged on the host or
    written to disk."""
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
                out[path] = (hash_uniform(shape, seed * 100003 + i, jnp.float32) * scale).astype(dtype)
        return unflatten_dict(out)

    return jax.jit(make)()


def build_model(
    preset: str,
    dtype: str = "float32",
    *,
    root: str = "checkpoints",
    seed: int = 0,
    batch: int = 4,
    max_new_tokens: int = 32,
    model_dir: str | None = None,
):
    """(LlavaModel, checkpoint directory or None, info dict). Refuses presets that cannot fit the backend.

    ``model_dir``: load that checkpoint (either family) instead of building the preset.
    """
    if model_dir is not None:
        if not os.path.isdir(model_dir):
            raise BenchError(f"model directory {model_dir!r} not found")
        if dtype not in access.DTYPES:
            raise BenchError(f"dtype must be one of {sorted(access.DTYPES)}, got {dtype!r}")
        model = vlmprune.load(model_dir, dtype=dtype)
        if model.processor is None:
            raise BenchError(f"{model_dir} has no tokenizer/processor files; the benchmark needs them for its inputs")
        return model, model_dir, {"params": param_count(model.params)}
    if preset not in PRESETS:
        raise BenchError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if dtype not in access.DTYPES:
        raise BenchError(f"dtype must be one of {sorted(access.DTYPES)}, got {dtype!r}")
    p = PRESETS[preset]
    dev = jax.devices()[0]
    if not p.real:
        d = ensure_checkpoint(preset, root, seed)
        model = vlmprune.load(d, dtype=dtype)
        return model, d, {"params": param_count(model.params)}

    tok, hf, proc = hf_config(p)
    nbytes = np.dtype(access.DTYPES[dtype]).itemsize
    try:
        cfg = access.LlavaConfig.from_hf(hf)
        module = access.Llava(cfg, dtype=access.DTYPES[dtype])
        abstract = access.abstract_params(module)
    except (ValueError, NotImplementedError) as e:
        raise BenchError(f"{preset}: this vlmprune cannot build the model: {e}") from e
    n_params = param_count(abstract)
    if p.onevision:  # the packed block of the preset's image
        vis = image_layout(p.image_hw, geometry(cfg)).num_tokens
    else:
        vis = cfg.tokens_per_image * (5 if p.next_model else 1)  # NeXT: base image + up to a 2x2 grid
    est = memory_estimate(cfg, n_params, nbytes, seq_len=vis + 96 + max_new_tokens, batch=batch)
    need = (
        f"{preset} ({n_params / 1e9:.2f} B params) needs about {est['total'] / GiB:.1f} GiB of device memory "
        f"in {dtype} (params {est['params'] / GiB:.1f} GiB + KV cache at batch {batch} "
        f"{est['kv_cache'] / GiB:.2f} GiB + activations/logits "
        f"{(est['activations'] + est['logits']) / GiB:.1f} GiB)"
    )
    if p.gpu_only and dev.platform == "cpu":
        raise BenchError(
            f"{need}; real-shape presets run on GPU/TPU only and this JAX backend is CPU. "
            f"Use --preset cpu-small (or tiny) on CPU."
        )
    stats = dev.memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit and est["total"] > limit:
        raise BenchError(
            f"{need}, but {dev.device_kind} has {limit / GiB:.1f} GiB; try --dtype bfloat16, a smaller "
            f"--batch, or a larger device."
        )
    log(f"initialising random {preset} params on {dev.device_kind} in {dtype} ({n_params / 1e9:.3f} B) ...")
    params = random_params(abstract, access.DTYPES[dtype], seed)
    model = access.LlavaModel(cfg, params, dtype=dtype, processor=proc, hf_config=hf)
    return model, None, {"params": n_params, "memory_estimate": est}


def bench_inputs(model, batch: int = 1, image_hw: tuple[int, int] | None = None):
    """Processor outputs (numpy) for the demo image and PROMPT, the same pair repeated ``batch`` times.

    image_hw: (height, width) the demo image is resized to first (the OneVision presets' fixed image size)."""
    image = tiny.demo_image()
    if image_hw is not None:
        image = image.resize((int(image_hw[1]), int(image_hw[0])))
    x = prepare_inputs(model, [image], [PROMPT])
    return {k: np.concatenate([v] * batch) for k, v in x.items()}
