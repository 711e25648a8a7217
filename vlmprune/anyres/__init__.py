"""LLaVA-NeXT "anyres" geometry (host), layouts (host -> NextLayout) and packing (device).

One grid convention, :class:`Grid` ``(rows, cols)``; one unpad rule with the originals' rounding variants
(:func:`unpad_bounds`); one packer (:func:`pack`).
"""

from vlmprune.anyres.geometry import (  # noqa: F401
    CONVENTIONS,
    LLAVA_V16_PINPOINTS,
    UNPAD_RULES,
    Grid,
    grid_for,
    grid_to_tiles,
    hero_valid_mask,
    max_tiles,
    select_best_resolution,
    tiles_to_grid,
    unpad_bounds,
    unpad_grid,
)
from vlmprune.anyres.layout import (  # noqa: F401
    STYLES,
    BatchLayout,
    ImageLayout,
    batch_layout,
    image_layout,
    reference_pinpoints,
    reference_processor,
)
from vlmprune.anyres.pack import (  # noqa: F401
    layout_candidates,
    layout_keep,
    pack,
    selection_mask,
    tiles_to_image_indices,
)
