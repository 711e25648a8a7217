"""Pruning methods as pure, static-shape JAX functions, and the pruners that connect them to the model.

Functional API (arrays in, ``Selection`` or ``MergeResult`` out): ``vispruner``, ``fastervlm``, ``hired``,
``hired_single``, ``hired_batched``, ``hero``, and the baselines ``divprune`` (``divprune_picks``,
``divprune_masked``), ``visionzip`` (``visionzip_dominant``), ``prumerge_plus``, ``fastv_select``, ``random_keep``
and ``uniform``. Shared numerics (correctly rounded normalisation, torch-order head means, ranking helpers) live in
``vlmprune.prune.ops``.
Pruners: ``VisPruner(num_keep=64, important_ratio=0.5)``, ``FasterVLM``, ``HiRED``, ``HERO``, ... or
``get(name, **settings)`` / ``parse_spec("vispruner:64")``; pass one as ``model(..., pruner=...)``. The protocols
(``VisualPruner``, ``LLMPruner``) and ``register`` (for methods defined outside the package) are in
``vlmprune.prune.base``; ``docs/adding_a_method.md`` walks through a new method.
"""

from vlmprune.prune.base import (  # noqa: F401
    REGISTRY,
    Budget,
    HostInputs,
    HostNeeds,
    LLMPruner,
    PruneContext,
    VisualPruner,
    get,
    register,
    resolve_layer,
)
from vlmprune.prune.baselines import (  # noqa: F401
    MergeResult,
    cosine_distance,
    divprune,
    divprune_masked,
    divprune_num_keep,
    divprune_picks,
    fastv_select,
    prumerge_plus,
    prumerge_tables,
    random_keep,
    uniform,
    uniform_grid_indices,
    visionzip,
    visionzip_dominant,
    visionzip_targets,
)
from vlmprune.prune.fastv import FastV  # noqa: F401
from vlmprune.prune.hero import hero  # noqa: F401
from vlmprune.prune.hired import hired, hired_batched, hired_single  # noqa: F401
from vlmprune.prune.pruners import (  # noqa: F401
    HERO,
    DivPrune,
    FasterVLM,
    HiRED,
    PruMergePlus,
    RandomKeep,
    Uniform,
    VisionZip,
    VisPruner,
    demo_settings,
    hero_clip_inputs,
)
from vlmprune.prune.selection import Selection, from_indices, from_mask, gather_tokens  # noqa: F401
from vlmprune.prune.spec import format_spec, parse_spec, parse_specs  # noqa: F401
from vlmprune.prune.vispruner import fastervlm, vispruner  # noqa: F401
from vlmprune.types import PruneResult, TapRequest, VisionTaps  # noqa: F401

#: the base class of earlier versions (every built-in visual pruner derives from it)
Pruner = VisualPruner
