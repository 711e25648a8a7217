"""Pruning methods as pure, static-shape JAX functions."""
from vlmprune.prune.selection import Selection, from_indices, from_mask, gather_tokens  # noqa: F401
