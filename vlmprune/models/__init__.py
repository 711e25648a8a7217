"""Flax (linen) modules: CLIP vision/text towers, LLaMA decoder, LLaVA assembly."""
