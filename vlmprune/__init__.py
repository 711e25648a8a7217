"""vlmprune: training-free visual-token pruning for LLaVA models, in JAX/Flax.

import vlmprune
model = vlmprune.load("llava-hf/llava-1.5-7b-hf local dir")
out = model(input_ids, pixel_values, pruner=vlmprune.prune.VisPruner(num_keep=64))
"""

__version__ = "0.1.0"

from vlmprune import prune  # noqa: E402,F401
from vlmprune.model import LlavaModel, ModelOutput, load  # noqa: E402,F401
from vlmprune.models.vision.clip import ClipModel, load_clip  # noqa: E402,F401
