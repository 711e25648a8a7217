"""Benchmarks: ``vlmprune bench`` (the efficiency suite) and the selection-speed suite.

Layout, in the order a run uses it:

* ``config``: ``BenchConfig``, the method runs parsed from specs (``vlmprune.prune.parse_spec`` syntax);
* ``presets``: the model shapes (random HF checkpoints on disk, or real shapes built on the device);
* ``model_access``: the model's stages jitted one by one from the public pipeline (``vlmprune.pipeline``) and
  ``LlavaModel``'s planning and decode;
* ``timing``: the one timer (interleaved JAX / PyTorch calls) and the one stats schema;
* ``efficiency``: one method run stage by stage, and the whole suite; ``torch_side``: HF's PyTorch model with the
  same weights, fed the same tokens; ``targets``: derived figures and the issue's targets;
* ``selection`` (+ ``torch_reference``): the selection functions alone against straightforward PyTorch loops;
* ``report``: markdown, plots, JSON files and merging; ``cli``: the command line.

The selection suite needs torch and is imported on its own (``vlmprune.bench.selection``).
"""

from vlmprune.bench.cli import add_arguments, config_from_args, main, main_from_args  # noqa: F401
from vlmprune.bench.config import DEFAULT_METHODS, PROMPT, BenchConfig, BenchError, MethodRun, parse_methods  # noqa: F401
from vlmprune.bench.efficiency import run_bench, run_one  # noqa: F401
from vlmprune.bench.presets import (  # noqa: F401
    PRESETS,
    Preset,
    bench_inputs,
    build_model,
    ensure_checkpoint,
    hf_config,
    memory_estimate,
    preset_dir,
    random_params,
)
from vlmprune.bench.report import markdown, merge_outputs, plot, write_outputs  # noqa: F401
from vlmprune.bench.targets import evaluate_targets, peak_flops  # noqa: F401
from vlmprune.bench.timing import SELECTION_REPEATS, measure, stats  # noqa: F401
from vlmprune.bench.torch_side import TorchSide, recover_indices  # noqa: F401
