"""Pruning methods as pure, static-shape JAX functions, and the model-facing pruners that wrap them.

Functional API (arrays in, ``Selection`` out): ``vispruner``, ``fastervlm``, ``hired``, ``hired_single``,
``hired_batched``, ``hero``, and the baselines in ``vlmprune.prune.baselines``.
Model-facing: ``VisPruner(num_keep=64, important_ratio=0.5)``, ``FasterVLM``, ``HiRED``, ``HERO``, ... or
``get(name, **settings)``; pass one as ``model(..., pruner=...)``.
"""

from vlmprune.prune.selection import Selection, from_indices, from_mask, gather_tokens  # noqa: F401
from vlmprune.prune.vispruner import fastervlm, vispruner  # noqa: F401
from vlmprune.prune.hired import hired, hired_batched, hired_single  # noqa: F401
from vlmprune.prune.hero import hero  # noqa: F401
from vlmprune.prune.pruners import (  # noqa: F401
    HERO, REGISTRY, DivPrune, FasterVLM, FastV, HiRED, PruMergePlus, Pruner, RandomKeep, Uniform, VisionZip, VisPruner,
    demo_settings, get,
)
from vlmprune.prune.spec import format_spec, parse_spec, parse_specs  # noqa: F401,E402
