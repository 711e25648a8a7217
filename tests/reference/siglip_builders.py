"""A tiny random HF SigLIP vision tower and our tower loaded from it (shared by the SigLIP tests)."""

import jax.numpy as jnp
import torch
from transformers import SiglipVisionConfig as HFConfig
from transformers import SiglipVisionModel

from vlmprune.io.weights import abstract_params, load_params
from vlmprune.models.vision.siglip import (
    SiglipVisionConfig,
    SiglipVisionTransformer,
    siglip_vision_renames,
    siglip_vision_rules,
)


def build_hf_siglip(directory, image_size, patch_size, use_head, seed=0):
    """Random HF SiglipVisionModel (torch, eager attention), saved with save_pretrained; returns (model, cfg)."""
    cfg = HFConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        vision_use_head=use_head,
    )
    torch.manual_seed(seed)
    model = SiglipVisionModel._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # HF's init leaves norms at 1/0 and biases at 0: perturb every parameter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)
    return model, cfg


def load_tower(directory, hf_cfg, query_block=128, renames=None):
    cfg = SiglipVisionConfig.from_hf(hf_cfg)
    module = SiglipVisionTransformer(cfg, query_block=query_block)
    pix = jnp.zeros((1, cfg.num_channels, cfg.image_size, cfg.image_size), jnp.float32)
    params = load_params(
        directory,
        abstract_params(module, pix),
        siglip_vision_rules(),
        renames=siglip_vision_renames() if renames is None else renames,
    )
    return module, params
