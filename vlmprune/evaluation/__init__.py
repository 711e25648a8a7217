"""Benchmarks the pruning papers report (POPE, TextVQA, GQA, MME, ScienceQA-IMG) with LLaVA's prompts and metrics.

``run_eval(task, output_dir, model=..., pruner=...)`` evaluates a model (``vlmprune eval`` on the command line);
``metrics`` holds the scoring functions and ``tasks`` the data layouts and prompts.
"""

from vlmprune.evaluation.metrics import (  # noqa: F401
    gqa_accuracy,
    mme_scores,
    normalize_vqa_answer,
    parse_mme,
    parse_pope,
    parse_sqa,
    pope_scores,
    score_task,
    sqa_accuracy,
    vqa_accuracy,
)
from vlmprune.evaluation.runner import model_predict_fn, pruner_label, read_predictions, run_eval  # noqa: F401
from vlmprune.evaluation.tasks import TASKS, Task, get_task, load_task_data  # noqa: F401
