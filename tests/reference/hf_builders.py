"""Tiny random HF checkpoints and processor inputs shared by the tests (written with transformers' own
``save_pretrained``, loaded through the same code path as a real checkpoint)."""

import json
import os
import shutil


def _save_random(directory, seed, model_cls, make_config, make_processor):
    """Seeded random ``model_cls`` from ``make_config(tokenizer)`` with every parameter perturbed, saved with
    save_pretrained, plus ``make_processor(tokenizer, config)``'s files."""
    import torch

    from vlmprune.tiny import build_tokenizer

    tok = build_tokenizer()
    cfg = make_config(tok)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    perturb(model, 0.02)  # HF's init leaves norms at 1/0: perturb every parameter so each one is tested
    model.save_pretrained(directory)
    make_processor(tok, cfg).save_pretrained(directory)
    return str(directory)


def perturb(model, scale):
    """Add seeded-stream Gaussian noise of std ``scale`` to every parameter of a torch model, in place."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def build_hf_llava(directory, seed=0, **overrides):
    """Random HF LlavaForConditionalGeneration (torch), saved with save_pretrained, plus processor files."""
    from transformers import LlavaForConditionalGeneration

    from vlmprune.tiny import build_processor, tiny_llava_config

    def config(tok):
        return tiny_llava_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, **overrides)

    return _save_random(directory, seed, LlavaForConditionalGeneration, config, build_processor)


def demo_inputs(directory, prompts=("What is in the image?",), images=None):
    """Processor outputs (numpy) for a batch of prompts, one demo image each, left padded."""
    from transformers import AutoProcessor

    from vlmprune.tiny import demo_image

    proc = AutoProcessor.from_pretrained(directory)
    texts = [
        proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True
        )
        for p in prompts
    ]
    if images is None:
        base = demo_image()
        images = [base.rotate(17 * i) for i in range(len(prompts))]
    return dict(proc(images=images, text=texts, return_tensors="np", padding=True))


def sharded_copy(src, dst):
    """A copy of a HF checkpoint re-saved as two shards with an index (what a real 7B directory looks like)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    t = load_file(os.path.join(dst, "model.safetensors"))
    os.remove(os.path.join(dst, "model.safetensors"))
    keys = sorted(t)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for fn, ks in halves.items():
        save_file({k: t[k] for k in ks}, os.path.join(dst, fn), metadata={"format": "pt"})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: fn for fn, ks in halves.items() for k in ks}}, f)
    return str(dst)


def build_hf_llava_next(directory, seed=0):
    """Random HF LlavaNextForConditionalGeneration (tiles of 56 px, 16 tokens each, 3 vision layers), saved with
    save_pretrained, plus processor files."""
    from transformers import LlavaNextForConditionalGeneration

    from vlmprune.tiny import build_next_processor, tiny_llava_next_config

    def config(tok):
        return tiny_llava_next_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)

    return _save_random(directory, seed, LlavaNextForConditionalGeneration, config, build_next_processor)


def build_hf_clip(directory, image_size=56, seed=0, *, with_tokenizer=True, noise=0.0, **text):
    """A tiny full HF CLIP (both towers, patch 14), as HERO's ``clip_path``; returns the directory.

    with_tokenizer: save the demo tokenizer too (its size is then the default vocabulary; else 99).
    noise: std of the perturbation added to every parameter after HF's init (0: HF's init as it is).
    text: text-tower config fields over the defaults (vocab_size, max_position_embeddings, eos_token_id, ...).
    """
    import torch
    from transformers import CLIPConfig, CLIPModel

    from vlmprune.tiny import build_tokenizer

    tok = build_tokenizer() if with_tokenizer else None
    text_config = dict(
        vocab_size=99 if tok is None else len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        eos_token_id=2,
    )
    cfg = CLIPConfig(
        text_config={**text_config, **text},
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=14,
        ),
        projection_dim=24,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    if noise:
        perturb(model, noise)
    model.save_pretrained(directory)
    if tok is not None:
        tok.save_pretrained(directory)
    return str(directory)
