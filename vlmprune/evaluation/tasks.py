"""The benchmarks: lmms-lab dataset layouts, LLaVA-1.5 evaluation prompts, and what each metric needs.

Each ``Task`` knows where its data lives on the hub (``lmms-lab/*``), which columns it reads, how LLaVA-1.5 phrases
the question (the ``llava/eval`` question files), and which fields of a row the metric needs (``reference``, stored
with every prediction so a run can be re-scored from its predictions file alone).

Column names (lmms-lab):

* POPE ``lmms-lab/POPE`` (test): question, answer (yes/no), image, category (adversarial/popular/random).
* TextVQA ``lmms-lab/textvqa`` (validation): question, answers (10 human answers), image, ocr_tokens (optional).
* GQA ``lmms-lab/GQA`` (testdev_balanced_instructions / testdev): question, answer, image -- or ``imageId`` into
  the ``testdev_balanced_images`` table (id, image), which is how the hub stores it.
* MME ``lmms-lab/MME`` (test): question, answer (Yes/No), image, category, question_id (the image, two questions
  each).
* ScienceQA-IMG ``lmms-lab/ScienceQA`` (ScienceQA-IMG / test): question, choices, answer (index), image, hint.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from vlmprune.evaluation.metrics import LETTERS, image_digest

SHORT_ANSWER = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
# LLaVA-1.5's conversation template ``vicuna_v1`` starts with this system prompt.
LLAVA_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions."
)
# LLaVA-OneVision's conversation template ``qwen_1_5`` (Qwen2's chat format) starts with this one.
ONEVISION_SYSTEM_PROMPT = "You are a helpful assistant."


def default_system_prompt(model_type: str | None) -> str:
    """The system prompt the family's own conversation template starts with: OneVision's ``qwen_1_5``, else
    LLaVA-1.5's ``vicuna_v1`` (LLaVA-NeXT included, and a run without a model)."""
    return ONEVISION_SYSTEM_PROMPT if model_type == "llava_onevision" else LLAVA_SYSTEM_PROMPT


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    hub_path: str
    hub_config: str | None
    split: str
    required: tuple[str, ...]  # columns a row must have (besides the image)
    prompt_fn: Callable[[dict, dict], str]
    reference_fn: Callable[[dict], dict]
    id_columns: tuple[str, ...] = ()  # first of these whose values are unique keys the run (else: row index)
    max_new_tokens: int = 16
    image_table: tuple[str, str | None, str] | None = None  # (hub path, config, split) of a separate image table
    image_key: str | None = None  # column of the question table pointing into image_table's "id"

    def prompt(self, row: dict, **options) -> str:
        return self.prompt_fn(row, options)

    def reference(self, row: dict, sample: str | None = None) -> dict:
        """What the metric needs from ``row``; a missing or invalid label raises ValueError naming ``sample``."""
        try:
            return self.reference_fn(row)
        except (ValueError, KeyError, TypeError) as e:
            what = f"sample {sample}" if sample is not None else "a sample"
            raise ValueError(f"{self.name}: {what}: {e}") from e


# ------------------------------------------------------------------------------------------- prompts


def _short(row, opts):
    return f"{str(row['question']).strip()}\n{SHORT_ANSWER}"


def _textvqa_prompt(row, opts):
    # LLaVA-1.5's llava_textvqa_val_v051_ocr.jsonl: question, the OCR tokens, then the short-answer suffix.
    q = str(row["question"]).strip()
    ocr = row.get("ocr_tokens")
    if opts.get("ocr", True) and ocr:
        q = f"{q}\nReference OCR token: {', '.join(str(t) for t in ocr)}"
    return f"{q}\n{SHORT_ANSWER}"


def _sqa_prompt(row, opts):
    # LLaVA-1.5 ScienceQA (CQM-A, single-pred prompt): "Context: <hint>\n<question>\nA. ...\nB. ...\n<suffix>".
    hint = str(row.get("hint") or "").strip()
    choices = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"]))
    context = f"Context: {hint}\n" if hint else ""
    return f"{context}{str(row['question']).strip()}\n{choices}\n{MULTIPLE_CHOICE}"


# ------------------------------------------------------------------------------------------- references
# Each reference function validates the labels it reads (a bad label would be scored silently otherwise, e.g. a
# POPE answer None counted as "yes"); ``Task.reference`` adds which sample it was.


def _yes_no(row, field="answer") -> str:
    v = row.get(field)
    if not isinstance(v, str) or v.strip().lower() not in ("yes", "no"):
        raise ValueError(f"label {field!r} must be 'yes' or 'no', got {v!r}")
    return v.strip().lower()


def _text(row, field) -> str:
    v = row.get(field)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"label {field!r} must be a non-empty string, got {v!r}")
    return v


def _pope_ref(row):
    return {"answer": _yes_no(row), "category": str(row.get("category") or "all")}


def _textvqa_ref(row):
    answers = row.get("answers")
    if not isinstance(answers, (list, tuple)) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"label 'answers' must be a non-empty list of strings, got {answers!r}")
    return {"answers": [str(a) for a in answers]}


def _gqa_ref(row):
    return {"answer": _text(row, "answer")}


def _mme_ref(row):
    answer = _yes_no(row)
    category = _text(row, "category")
    pair = row.get("question_id")
    if pair is None:  # pair the two questions of an image by its pixels
        pair = image_digest(row["image"])
    return {"answer": answer, "category": category, "pair": str(pair)}


def _sqa_ref(row):
    choices, answer = row.get("choices"), row.get("answer")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2:
        raise ValueError(f"'choices' must be a list of at least 2 options, got {choices!r}")
    if len(choices) > len(LETTERS):
        raise ValueError(f"'choices' has {len(choices)} options; at most {len(LETTERS)} can be lettered")
    if isinstance(answer, bool) or not isinstance(answer, (int, np.integer)) or not 0 <= answer < len(choices):
        raise ValueError(f"label 'answer' must be an option index in [0, {len(choices)}), got {answer!r}")
    return {"answer": int(answer), "num_choices": len(choices)}


TASKS: dict[str, Task] = {
    "pope": Task(
        "pope",
        "lmms-lab/POPE",
        None,
        "test",
        ("question", "answer"),
        _short,
        _pope_ref,
        id_columns=("question_id", "id"),
    ),
    "textvqa": Task(
        "textvqa",
        "lmms-lab/textvqa",
        None,
        "validation",
        ("question", "answers"),
        _textvqa_prompt,
        _textvqa_ref,
        id_columns=("question_id",),
    ),
    "gqa": Task(
        "gqa",
        "lmms-lab/GQA",
        "testdev_balanced_instructions",
        "testdev",
        ("question", "answer"),
        _short,
        _gqa_ref,
        id_columns=("id", "question_id"),
        image_table=("lmms-lab/GQA", "testdev_balanced_images", "testdev"),
        image_key="imageId",
    ),
    "mme": Task("mme", "lmms-lab/MME", None, "test", ("question", "answer", "category"), _short, _mme_ref),
    "scienceqa_img": Task(
        "scienceqa_img",
        "lmms-lab/ScienceQA",
        "ScienceQA-IMG",
        "test",
        ("question", "choices", "answer"),
        _sqa_prompt,
        _sqa_ref,
    ),
}


def get_task(name: str) -> Task:
    key = name.lower().replace("-", "_")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[key]


# ------------------------------------------------------------------------------------------- data


def _is_saved(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "dataset_info.json"))
        or os.path.exists(os.path.join(path, "dataset_dict.json"))
    )


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_data_path(path: str, what: str = "data") -> str:
    """``path`` if it exists locally or reads as a hub id (``owner/name``); a missing local path raises
    FileNotFoundError instead of being looked up on the hub."""
    if os.path.exists(path):
        return path
    if path.startswith((".", "~", os.sep)) or os.path.isabs(path) or not _HUB_ID.match(path):
        raise FileNotFoundError(f"{what} {path!r}: no such file or directory (and not a hub id owner/name)")
    return path


def _load(path: str, config: str | None, split: str | None, cache_dir: str | None):
    """A ``save_to_disk`` directory (Dataset or DatasetDict), else ``datasets.load_dataset`` (hub id, or a local
    directory in the hub's layout, e.g. a clone of lmms-lab/POPE with its parquet files)."""
    import datasets

    if _is_saved(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                if len(ds) == 1:
                    return next(iter(ds.values()))
                raise ValueError(f"{path} has splits {sorted(ds)}; pass split=... (got {split!r})")
            ds = ds[split]
        return ds
    return datasets.load_dataset(path, name=config, split=split, cache_dir=cache_dir)


class TaskData:
    """A task's rows with their ids, reading images lazily (also from a separate image table, as GQA's)."""

    def __init__(self, task: Task, dataset, images=None):
        self.task = task
        self.dataset = dataset
        cols = set(dataset.column_names)
        missing = [c for c in task.required if c not in cols]
        if missing:
            raise ValueError(f"{task.name}: the data lacks column(s) {missing} (has {sorted(cols)})")
        self._image_index = None
        if "image" not in cols:
            if images is None or task.image_key is None or task.image_key not in cols:
                raise ValueError(
                    f"{task.name}: the data has no 'image' column"
                    + (
                        f" and no image table for its {task.image_key!r} column (pass images=... / --images)"
                        if task.image_key
                        else ""
                    )
                )
            if not {"id", "image"} <= set(images.column_names):
                raise ValueError(
                    f"{task.name}: the image table needs columns 'id' and 'image' (has {sorted(images.column_names)})"
                )
            self.images = images
            self._image_index = {str(k): i for i, k in enumerate(images["id"])}
        self.ids = self._sample_ids()

    def _sample_ids(self) -> list[str]:
        for col in self.task.id_columns:
            if col in self.dataset.column_names:
                vals = [str(v) for v in self.dataset[col]]
                if len(set(vals)) == len(vals):
                    return vals
        return [str(i) for i in range(len(self.dataset))]

    def __len__(self) -> int:
        return len(self.dataset)

    def check_labels(self, n: int) -> None:
        """Validate the labels of the first ``n`` rows (without decoding images) so that a bad one stops a run
        before anything is generated; the error names the sample id."""
        cols = [c for c in self.dataset.column_names if c != "image"]
        table = self.dataset.select(range(n)).select_columns(cols).to_dict() if n else {c: [] for c in cols}
        for i in range(n):
            row = {c: table[c][i] for c in cols}
            row.setdefault("question_id", "")  # MME pairs by image when absent: not a label, so not read here
            self.task.reference(row, self.ids[i])

    def row(self, i: int) -> dict:
        r = dict(self.dataset[int(i)])
        if self._image_index is not None:
            key = str(r[self.task.image_key])
            if key not in self._image_index:
                raise KeyError(f"{self.task.name}: image {key!r} of row {i} is not in the image table")
            r["image"] = self.images[self._image_index[key]]["image"]
        img = r.get("image")
        if img is not None and not hasattr(img, "convert"):
            raise TypeError(
                f"{self.task.name}: row {i} 'image' is {type(img).__name__}, expected a PIL image "
                "(a datasets Image feature)"
            )
        return r


def _load_default_config(path: str, config: str | None, default: str | None, split: str | None, cache_dir):
    """Load with ``config`` if given, else the task's hub config; a local directory without that config (plain
    parquet/json files) is read without one."""
    if config is not None:
        return _load(path, config, split, cache_dir)
    try:
        return _load(path, default, split, cache_dir)
    except ValueError as e:
        if default is None or not os.path.isdir(path) or "config" not in str(e).lower():
            raise
        return _load(path, None, split, cache_dir)


def load_task_data(
    task: Task | str,
    data: str | None = None,
    *,
    split: str | None = None,
    config: str | None = None,
    images: str | None = None,
    cache_dir: str | None = None,
    dataset: Any = None,
) -> TaskData:
    """Open a task's data.

    Args:
      data: a ``save_to_disk`` directory, a local directory in the hub layout, or a hub id; default the task's
        lmms-lab dataset.
      split / config: default the task's (e.g. ``test``; ``ScienceQA-IMG``); ``config`` only for hub layouts.
      images: GQA only: where the image table (id, image) lives when the questions carry ``imageId`` (a
        ``save_to_disk`` directory, a local hub-layout directory or a hub id); default the
        ``testdev_balanced_images`` config of ``data`` (or of the hub repository).
      dataset: an already open ``datasets.Dataset`` instead of ``data``.
    """
    task = get_task(task) if isinstance(task, str) else task
    if data is not None:
        check_data_path(data, "data")
    if images is not None:
        check_data_path(images, "images")
    if dataset is None:
        dataset = _load_default_config(data or task.hub_path, config, task.hub_config, split or task.split, cache_dir)
    table = None
    if "image" not in dataset.column_names and task.image_table is not None:
        hub, cfg, sp = task.image_table
        source = images or data or hub
        if images is not None or not _is_saved(source):  # a save_to_disk question table has no image config
            table = _load_default_config(source, None, cfg, sp, cache_dir)
    return TaskData(task, dataset, table)
