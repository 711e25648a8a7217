"""Tiny random-weight LLaVA checkpoints in the real Hugging Face format, built offline.

Used by the demo (``vlmprune demo``), the notebooks and the tests. Nothing here is special-cased by the
loader: the directory it writes (``config.json``, ``model.safetensors``, tokenizer and processor files) is read
through the same code path as a real ``llava-hf/*`` checkpoint.

* ``build_tokenizer`` trains a small byte-level BPE tokenizer on an embedded text, with LLaMA's special tokens
  (<unk>=0, <s>=1, </s>=2) plus ``<image>`` and ``<pad>``, and the LLaVA-1.5 (vicuna) chat template.
* ``tiny_llava_config`` returns a HF ``LlavaConfig`` with small towers (overridable).
* ``write_random_llava`` writes seeded random weights with NumPy in the HF key layout (no torch needed);
  tests build the same directories with ``transformers.LlavaForConditionalGeneration.save_pretrained``.
* ``tiny_onevision_config`` / ``write_random_onevision``: the same for LLaVA-OneVision (SigLIP + Qwen2).
"""

from __future__ import annotations

import json
import os

import numpy as np

from vlmprune.anyres.onevision import OnevisionGeometry
from vlmprune.io.safe_output import OutputKind, read_marker, staged_dir, write_marker
from vlmprune.models.onevision_processor import OnevisionProcessor

#: what ``write_random_llava`` writes, recognised by its marker file
TINY_CHECKPOINT = OutputKind("vlmprune-tiny.json", "vlmprune-tiny-llava", "vlmprune tiny random checkpoint")
README_TEXT = "Random-weight tiny LLaVA-1.5 built offline by vlmprune (seed %d). Its text is meaningless.\n"

CORPUS = """
A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the human's questions. USER: ASSISTANT: What is in the image? Describe the
picture in detail. How many objects are there? What colour is the sign? Is there a cat on the table? Yes. No.
The image shows a red square, a blue circle and a green triangle on a white background. Where is the dog?
What is written on the red sign? Answer the question using a single word or phrase. zero one two three four
five six seven eight nine ten left right top bottom middle small large bright dark
"""

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] if "
    "message['content'] is not string else message['content'] }} {% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} {% else %}ASSISTANT: {{ message['content'] if message['content'] is string else "
    "message['content'][0]['text'] }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer(vocab_size: int = 384):
    """A LLaMA-style fast tokenizer trained offline on ``CORPUS``. Special ids: unk 0, bos 1, eos 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    fast.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    return fast


def tiny_llava_config(vocab_size: int, image_token_id: int, pad_token_id: int, **overrides):
    """A small HF ``LlavaConfig`` (CLIP 2-4 layers, LLaMA 2 layers). Keyword overrides:
    vision_* / text_* prefixed fields go to the sub-configs; others to LlavaConfig."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
        projection_dim=32,
        hidden_act="quick_gelu",
    )
    text = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_token_id,
    )
    top = dict(
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=16,
        pad_token_id=pad_token_id,
    )
    for k, v in overrides.items():
        if k.startswith("vision_") and k not in top:
            vision[k[len("vision_") :]] = v
        elif k.startswith("text_"):
            text[k[len("text_") :]] = v
        else:
            top[k] = v
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text), **top)
    n = (vision["image_size"] // vision["patch_size"]) ** 2
    cfg.image_seq_length = n if top["vision_feature_select_strategy"] == "default" else n + 1
    return cfg


def build_processor(tokenizer, hf_config):
    """LlavaProcessor with a CLIP image processor sized for the config's vision tower."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = hf_config.vision_config.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=hf_config.vision_config.patch_size,
        vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def random_llava_tensors(hf_config, seed: int = 0, std: float = 0.05) -> dict[str, np.ndarray]:
    """Seeded random weights under HF's (>= 4.52) LLaVA key names, float32."""
    rng = np.random.default_rng(seed)
    v, t = hf_config.vision_config, hf_config.text_config
    out: dict[str, np.ndarray] = {}

    def w(name, *shape, ones=False, zeros=False):
        if ones:
            out[name] = np.ones(shape, np.float32)
        elif zeros:
            out[name] = np.zeros(shape, np.float32)
        else:
            out[name] = (rng.standard_normal(shape) * std).astype(np.float32)

    vp = "model.vision_tower.vision_model."
    d, n_pos = v.hidden_size, (v.image_size // v.patch_size) ** 2 + 1
    w(vp + "embeddings.class_embedding", d)
    w(vp + "embeddings.patch_embedding.weight", d, v.num_channels, v.patch_size, v.patch_size)
    w(vp + "embeddings.position_embedding.weight", n_pos, d)
    for ln in ("pre_layrnorm", "post_layernorm"):
        w(vp + ln + ".weight", d, ones=True)
        w(vp + ln + ".bias", d, zeros=True)
    for i in range(v.num_hidden_layers):
        p = f"{vp}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w(p + f"self_attn.{proj}.weight", d, d)
            w(p + f"self_attn.{proj}.bias", d)
        for ln in ("layer_norm1", "layer_norm2"):
            w(p + ln + ".weight", d, ones=True)
            w(p + ln + ".bias", d, zeros=True)
        w(p + "mlp.fc1.weight", v.intermediate_size, d)
        w(p + "mlp.fc1.bias", v.intermediate_size)
        w(p + "mlp.fc2.weight", d, v.intermediate_size)
        w(p + "mlp.fc2.bias", d)
    h = t.hidden_size
    w("model.multi_modal_projector.linear_1.weight", h, d)
    w("model.multi_modal_projector.linear_1.bias", h)
    w("model.multi_modal_projector.linear_2.weight", h, h)
    w("model.multi_modal_projector.linear_2.bias", h)
    lp = "model.language_model."
    hd = getattr(t, "head_dim", None) or h // t.num_attention_heads
    kvh = t.num_key_value_heads or t.num_attention_heads
    w(lp + "embed_tokens.weight", t.vocab_size, h)
    w(lp + "norm.weight", h, ones=True)
    for i in range(t.num_hidden_layers):
        p = f"{lp}layers.{i}."
        w(p + "self_attn.q_proj.weight", t.num_attention_heads * hd, h)
        w(p + "self_attn.k_proj.weight", kvh * hd, h)
        w(p + "self_attn.v_proj.weight", kvh * hd, h)
        w(p + "self_attn.o_proj.weight", h, t.num_attention_heads * hd)
        w(p + "mlp.gate_proj.weight", t.intermediate_size, h)
        w(p + "mlp.up_proj.weight", t.intermediate_size, h)
        w(p + "mlp.down_proj.weight", h, t.intermediate_size)
        w(p + "input_layernorm.weight", h, ones=True)
        w(p + "post_attention_layernorm.weight", h, ones=True)
    w("lm_head.weight", t.vocab_size, h)
    return out


def write_random_llava(
    directory: str, *, seed: int = 0, overwrite: bool = False, flag: str = "overwrite=True", **overrides
) -> str:
    """Write a complete tiny HF LLaVA-1.5 directory (weights, config, tokenizer, processor). Returns the path.

    The directory must be absent, empty or an earlier tiny checkpoint (replaced whole) unless ``overwrite``;
    it is built in a temporary sibling and renamed into place (``vlmprune.io.safe_output``).
    """
    from safetensors.numpy import save_file

    tok = build_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = tiny_llava_config(len(tok), image_id, tok.pad_token_id, **overrides)
    with staged_dir(directory, TINY_CHECKPOINT, overwrite=overwrite, flag=flag) as tmp:
        save_file(random_llava_tensors(cfg, seed), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(tmp)
        build_processor(tok, cfg).save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(README_TEXT % seed)
        write_marker(tmp, TINY_CHECKPOINT, seed=seed, overrides={k: repr(v) for k, v in overrides.items()})
    return directory


def is_tiny_checkpoint(directory: str) -> bool:
    """True for a complete directory written by ``write_random_llava`` or ``write_random_onevision`` (or by
    earlier vlmprune versions, which left only their README as a mark)."""
    if not all(os.path.isfile(os.path.join(directory, f)) for f in ("model.safetensors", "config.json")):
        return False
    if read_marker(directory, TINY_CHECKPOINT) is not None:
        return True
    try:
        with open(os.path.join(directory, "README.md")) as f:
            return f.read(80).startswith(README_TEXT.split(" (seed")[0])
    except OSError:
        return False


def demo_image(path: str | None = None):
    """The image shipped with the package (``vlmprune/assets/demo.png``) as a PIL image."""
    from PIL import Image

    if path is None:
        path = os.path.join(os.path.dirname(__file__), "assets", "demo.png")
    return Image.open(path).convert("RGB")


def config_json(directory: str) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


def tiny_pinpoints(tile: int) -> list[list[int]]:
    """LLaVA-v1.6's pinpoints (1x2, 2x1, 2x2, 1x3, 3x1 tiles), scaled to a tile size, as HF (height, width)."""
    return [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [tile, 3 * tile], [3 * tile, tile]]


def tiny_llava_next_config(vocab_size: int, image_token_id: int, pad_token_id: int, **overrides):
    """A small HF ``LlavaNextConfig`` (same towers as ``tiny_llava_config``) with pinpoints scaled to the tile."""
    from transformers import LlavaNextConfig

    base = tiny_llava_config(vocab_size, image_token_id, pad_token_id, **overrides)
    tile = base.vision_config.image_size
    return LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_index=image_token_id,
        vision_feature_layer=base.vision_feature_layer,
        vision_feature_select_strategy=base.vision_feature_select_strategy,
        projector_hidden_act="gelu",
        image_grid_pinpoints=tiny_pinpoints(tile),
        pad_token_id=pad_token_id,
    )


def build_next_processor(tokenizer, hf_config):
    """LlavaNextProcessor whose image processor tiles with the config's pinpoints."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    size = hf_config.vision_config.image_size
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=hf_config.image_grid_pinpoints,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=hf_config.vision_config.patch_size,
        vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


# ----------------------------------------------------------------------------------------------- LLaVA-OneVision

OV_README_TEXT = "Random-weight tiny LLaVA-OneVision built offline by vlmprune (seed %d). Its text is meaningless.\n"


def build_onevision_tokenizer(vocab_size: int = 384):
    """``build_tokenizer`` plus the ``<video>`` placeholder a OneVision config names (``video_token_index``)."""
    tok = build_tokenizer(vocab_size)
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tok


def tiny_onevision_config(vocab_size: int, image_token_id: int, video_token_id: int, pad_token_id: int, **overrides):
    """A small HF ``LlavaOnevisionConfig``: a SigLIP tower (no pooling head) and a Qwen2 decoder, tied embeddings,
    ``anyres_max_9``, pinpoints for 1x1, 1x2 and 2x1 grids of the tile. Keyword overrides: ``vision_*`` /
    ``text_*`` prefixed fields go to the sub-configs, the others (``image_grid_pinpoints``,
    ``vision_aspect_ratio``, ``tie_word_embeddings``, ...) to the top level; ``tie_word_embeddings`` is applied to
    both levels, as HF's converter writes it."""
    from transformers import LlavaOnevisionConfig

    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
        vision_use_head=False,
    )
    text = dict(
        model_type="qwen2",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=1e6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_token_id,
    )
    top = dict(
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=True,
        image_grid_pinpoints=None,
        pad_token_id=pad_token_id,
    )
    for k, v in overrides.items():
        if k.startswith("vision_") and k not in top:
            vision[k[len("vision_") :]] = v
        elif k.startswith("text_"):
            text[k[len("text_") :]] = v
        else:
            top[k] = v
    text["tie_word_embeddings"] = top["tie_word_embeddings"]
    if top["image_grid_pinpoints"] is None:
        s = vision["image_size"]
        top["image_grid_pinpoints"] = [[s, s], [s, 2 * s], [2 * s, s]]
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, **top)


def build_onevision_processor(tokenizer, hf_config):
    """``OnevisionProcessor`` whose image processor (HF's PIL backend) tiles with the config's pinpoints and
    normalises with SigLIP's mean/std 0.5, as the released checkpoints' preprocessor configs do."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    size = hf_config.vision_config.image_size
    image_processor = LlavaOnevisionImageProcessorPil(
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"height": size, "width": size},
        image_grid_pinpoints=[list(p) for p in hf_config.image_grid_pinpoints],
    )
    return OnevisionProcessor(image_processor, tokenizer, OnevisionGeometry.from_hf(hf_config))


def random_onevision_tensors(hf_config, seed: int = 0, std: float = 0.05) -> dict[str, np.ndarray]:
    """Seeded random weights under HF's (>= 4.52) LLaVA-OneVision key names, float32; no ``lm_head.weight`` when
    the embeddings are tied (HF's ``save_pretrained`` leaves it out too)."""
    rng = np.random.default_rng(seed)
    v, t = hf_config.vision_config, hf_config.text_config
    out: dict[str, np.ndarray] = {}

    def w(name, *shape, ones=False, zeros=False):
        if ones:
            out[name] = np.ones(shape, np.float32)
        elif zeros:
            out[name] = np.zeros(shape, np.float32)
        else:
            out[name] = (rng.standard_normal(shape) * std).astype(np.float32)

    vp = "model.vision_tower."
    d = v.hidden_size
    w(vp + "embeddings.patch_embedding.weight", d, v.num_channels, v.patch_size, v.patch_size)
    w(vp + "embeddings.patch_embedding.bias", d)
    w(vp + "embeddings.position_embedding.weight", (v.image_size // v.patch_size) ** 2, d)
    w(vp + "post_layernorm.weight", d, ones=True)
    w(vp + "post_layernorm.bias", d, zeros=True)
    for i in range(v.num_hidden_layers):
        p = f"{vp}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w(p + f"self_attn.{proj}.weight", d, d)
            w(p + f"self_attn.{proj}.bias", d)
        for ln in ("layer_norm1", "layer_norm2"):
            w(p + ln + ".weight", d, ones=True)
            w(p + ln + ".bias", d, zeros=True)
        w(p + "mlp.fc1.weight", v.intermediate_size, d)
        w(p + "mlp.fc1.bias", v.intermediate_size)
        w(p + "mlp.fc2.weight", d, v.intermediate_size)
        w(p + "mlp.fc2.bias", d)
    h = t.hidden_size
    w("model.image_newline", h)
    w("model.multi_modal_projector.linear_1.weight", h, d)
    w("model.multi_modal_projector.linear_1.bias", h)
    w("model.multi_modal_projector.linear_2.weight", h, h)
    w("model.multi_modal_projector.linear_2.bias", h)
    lp = "model.language_model."
    hd = getattr(t, "head_dim", None) or h // t.num_attention_heads
    kvh = t.num_key_value_heads
    w(lp + "embed_tokens.weight", t.vocab_size, h)
    w(lp + "norm.weight", h, ones=True)
    for i in range(t.num_hidden_layers):
        p = f"{lp}layers.{i}."
        w(p + "self_attn.q_proj.weight", t.num_attention_heads * hd, h)
        w(p + "self_attn.q_proj.bias", t.num_attention_heads * hd)
        for proj in ("k_proj", "v_proj"):
            w(p + f"self_attn.{proj}.weight", kvh * hd, h)
            w(p + f"self_attn.{proj}.bias", kvh * hd)
        w(p + "self_attn.o_proj.weight", h, t.num_attention_heads * hd)
        w(p + "mlp.gate_proj.weight", t.intermediate_size, h)
        w(p + "mlp.up_proj.weight", t.intermediate_size, h)
        w(p + "mlp.down_proj.weight", h, t.intermediate_size)
        w(p + "input_layernorm.weight", h, ones=True)
        w(p + "post_attention_layernorm.weight", h, ones=True)
    if not t.tie_word_embeddings:
        w("lm_head.weight", t.vocab_size, h)
    return out


def write_random_onevision(
    directory: str, *, seed: int = 0, overwrite: bool = False, flag: str = "overwrite=True", **overrides
) -> str:
    """Write a complete tiny HF LLaVA-OneVision directory (weights, config, tokenizer, image processor), read by
    ``vlmprune.load`` (and HF's ``LlavaOnevisionForConditionalGeneration``) like a real checkpoint. Overrides as
    :func:`tiny_onevision_config`. Same directory rules as :func:`write_random_llava`. Returns the path."""
    from safetensors.numpy import save_file

    tok = build_onevision_tokenizer()
    ids = [tok.convert_tokens_to_ids(s) for s in ("<image>", "<video>")]
    cfg = tiny_onevision_config(len(tok), *ids, tok.pad_token_id, **overrides)
    with staged_dir(directory, TINY_CHECKPOINT, overwrite=overwrite, flag=flag) as tmp:
        save_file(
            random_onevision_tensors(cfg, seed), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"}
        )
        cfg.save_pretrained(tmp)
        build_onevision_processor(tok, cfg).save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(OV_README_TEXT % seed)
        write_marker(tmp, TINY_CHECKPOINT, seed=seed, overrides={k: repr(v) for k, v in overrides.items()})
    return directory
