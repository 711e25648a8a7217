"""lmms-eval runs ``--model vlmprune`` (found through the entry point) on a local POPE task offline; its
predictions and POPE score equal ``vlmprune eval``'s on the same data, model and pruner."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

lmms_eval = pytest.importorskip("lmms_eval")
datasets = pytest.importorskip("datasets")

from PIL import Image  # noqa: E402

from reference.hf_builders import build_hf_llava_next  # noqa: E402
from vlmprune.evaluation import metrics, runner  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end runs of the commands: skipped by make test-fast

ANSWERS = ["yes", "no", "yes", "no", "yes"]
TASK_YAML = """task: vlmprune_pope_local
dataset_path: {data}
dataset_kwargs:
  load_from_disk: True
test_split: test
output_type: generate_until
doc_to_visual: !function utils.pope_doc_to_visual
doc_to_text: !function utils.pope_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function utils.pope_process_results
metric_list:
  - metric: pope_f1_score
    aggregation: !function utils.pope_aggregate_f1_score
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
"""


@pytest.fixture(scope="module")
def pope_task(tmp_path_factory):
    """lmms-lab POPE's columns (question_id, question, answer, image_source, image, category), saved with
    save_to_disk as a DatasetDict with a ``test`` split, and a task directory reusing lmms-eval's POPE functions."""
    d = tmp_path_factory.mktemp("lmms_pope")
    n = len(ANSWERS)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 27, 3), dtype=np.uint8)) for i in range(n)]
    ds = datasets.Dataset.from_dict(
        dict(
            id=[str(i) for i in range(n)],
            question_id=[str(100 + i) for i in range(n)],
            question=[f"Is there a {w} in the image?" for w in "dog cat car sign tree".split()],
            answer=ANSWERS,
            image_source=[f"COCO_{i}" for i in range(n)],
            image=imgs,
            category=["random"] * n,
        ),
        features=datasets.Features(
            id=datasets.Value("string"),
            question_id=datasets.Value("string"),
            question=datasets.Value("string"),
            answer=datasets.Value("string"),
            image_source=datasets.Value("string"),
            image=datasets.Image(),
            category=datasets.Value("string"),
        ),
    )
    data = str(d / "pope")
    datasets.DatasetDict(test=ds).save_to_disk(data)
    tasks = d / "tasks"
    tasks.mkdir()
    (tasks / "vlmprune_pope_local.yaml").write_text(TASK_YAML.format(data=data))
    (tasks / "utils.py").write_text("from lmms_eval.tasks.pope.utils import *  # noqa: F401,F403\n")
    return data, str(tasks)


def _first(v):
    while isinstance(v, list):
        v = v[0]
    return v


def test_entry_point_registers_the_model():
    from lmms_eval import models

    from vlmprune.evaluation.lmms import VlmpruneLMM

    assert models.get_model("vlmprune") is VlmpruneLMM


def test_lmms_eval_cli_matches_vlmprune_eval(pope_task, mha_dir, tmp_path):
    data, task_dir = pope_task
    out = tmp_path / "lmms"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        JAX_PLATFORMS="cpu",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "vlmprune",
        "--model_args",
        f"pretrained={mha_dir},method=vispruner,keep=4,pad_multiple=256",
        "--tasks",
        "vlmprune_pope_local",
        "--include_path",
        task_dir,
        "--batch_size",
        "2",
        "--limit",
        "3",
        "--log_samples",
        "--output_path",
        str(out),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    files = glob.glob(str(out / "**" / "*samples_vlmprune_pope_local*.jsonl"), recursive=True)
    assert len(files) == 1, (files, r.stderr[-3000:])
    with open(files[0]) as f:
        samples = sorted((json.loads(x) for x in f), key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == [0, 1, 2]  # --limit 3
    lmms_preds = [_first(s["filtered_resps"]) for s in samples]  # the logger unwraps one-element lists

    # vlmprune eval on the same data, model and pruner (the CLI, as a user runs it)
    from vlmprune import cli

    vout = str(tmp_path / "vlm")
    assert (
        cli.main(
            [
                "eval",
                "--model",
                mha_dir,
                "--task",
                "pope",
                "--data",
                data,
                "--split",
                "test",
                "--output-dir",
                vout,
                "--method",
                "vispruner",
                "--keep",
                "4",
                "--batch-size",
                "2",
                "--limit",
                "3",
                "--max-new-tokens",
                "3",
                "--pad-multiple",
                "256",
                "--no-progress",
            ]
        )
        == 0
    )
    recs = runner.read_predictions(os.path.join(vout, "predictions.jsonl"))
    ours = [recs[str(100 + i)]["prediction"] for i in range(3)]
    assert lmms_preds == ours
    with open(os.path.join(vout, "summary.json")) as f:
        summary = json.load(f)
    # the same predictions give the same POPE score with vlmprune's (LLaVA) scoring ...
    assert metrics.pope_scores(lmms_preds, ANSWERS[:3], ["random"] * 3)["f1"] == summary["headline"]
    # ... and lmms-eval's own POPE F1 is its aggregation over these predictions
    from lmms_eval.tasks.pope import utils as pope_utils

    per = [
        pope_utils.pope_process_results(dict(answer=a, question_id=str(i)), [p])["pope_f1_score"]
        for i, (a, p) in enumerate(zip(ANSWERS, ours))
    ]
    results = glob.glob(str(out / "**" / "*results*.json"), recursive=True)
    with open(results[0]) as f:
        got = json.load(f)["results"]["vlmprune_pope_local"]
    f1_key = next(k for k in got if k.startswith("pope_f1_score"))
    assert got[f1_key] == pope_utils.pope_aggregate_f1_score(per)


def _meta(task):
    return dict(task=task, doc_id=0, repeats=1)


def test_refusals_name_the_task(mha_dir):
    from lmms_eval.api.instance import Instance

    from vlmprune.evaluation.lmms import VlmpruneLMM, pruner_from_model_args

    m = VlmpruneLMM(pretrained=mha_dir, method="vispruner", keep=4, batch_size="2")
    assert m.pruner.num_keep == 4 and m.batch_size == 2
    ll = Instance("loglikelihood", ("ctx", "cont", None, 0, "mmmu_val", "test"), 0, _meta("mmmu_val"))
    with pytest.raises(NotImplementedError, match="mmmu_val need log-likelihoods"):
        m.loglikelihood([ll])
    gen = Instance(
        "generate_until", ("q", {"do_sample": True, "temperature": 0.7}, None, 0, "nocaps", "test"), 0, _meta("nocaps")
    )
    with pytest.raises(NotImplementedError, match="task nocaps asks for sampling"):
        m.generate_until([gen])
    m.task_dict = {"two_img": {"test": [{"a": 1}]}}
    img = Image.new("RGB", (8, 8))
    two = Instance(
        "generate_until", ("q", {"max_new_tokens": 2}, lambda d: [img, img], 0, "two_img", "test"), 0, _meta("two_img")
    )
    with pytest.raises(NotImplementedError, match="task two_img .* 2 visual"):
        m.generate_until([two])
    with pytest.raises(ValueError, match="does not take"):
        pruner_from_model_args("vispruner", {"budget_rate": 0.2})
    hero = pruner_from_model_args("hero", {"keep_ratio": 0.2, "clip_path": "/c"})
    assert hero.clip_path == "/c"


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    return build_hf_llava_next(tmp_path_factory.mktemp("lmms_next"), seed=5)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_generate_until_in_request_order(family, mha_dir, next_dir):
    """Both families, one image per request: answers in request order, equal to ``model_predict_fn``'s, requests
    with other generation settings in their own batches, ``until`` cutting the text."""
    from lmms_eval.api.instance import Instance

    from vlmprune.evaluation.lmms import VlmpruneLMM

    path = mha_dir if family == "llava" else next_dir
    method = dict(method="vispruner", keep=4) if family == "llava" else dict(method="hired", budget_rate=0.25)
    m = VlmpruneLMM(pretrained=path, batch_size=2, pad_multiple=256, **method)
    rng = np.random.default_rng(3)
    sizes = [(24, 40), (40, 24), (30, 30)]  # (height, width): different NeXT grids
    docs = [
        dict(image=Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), q=f"Question {i}?")
        for i, (h, w) in enumerate(sizes)
    ]
    m.task_dict = {"t": {"test": docs}}
    # request 1 has other settings (a stop string that never occurs): its own batch, the same compiled shapes
    gk = [{"max_new_tokens": 3}, {"max_new_tokens": 3, "until": ["\x00"]}, {"max_new_tokens": 3}]
    reqs = [
        Instance("generate_until", (docs[i]["q"], dict(gk[i]), lambda d: [d["image"]], i, "t", "test"), i, _meta("t"))
        for i in range(3)
    ]
    got = m.generate_until(reqs)
    fn3 = runner.model_predict_fn(m.model, pruner=m.pruner, max_new_tokens=3, batch_size=2, pad_multiple=256)
    want3 = fn3([docs[0]["q"], docs[2]["q"]], [docs[0]["image"], docs[2]["image"]], [{}, {}])
    want1 = fn3([docs[1]["q"]], [docs[1]["image"]], [{}])
    assert got == [want3[0], want1[0], want3[1]]
    if got[0]:  # a stop string cuts the answer where it first occurs
        stop = got[0][len(got[0]) // 2 :] or got[0]
        req = Instance(
            "generate_until",
            (docs[0]["q"], {"max_new_tokens": 3, "until": [stop]}, lambda d: [d["image"]], 0, "t", "test"),
            0,
            _meta("t"),
        )
        assert m.generate_until([req]) == [got[0][: got[0].index(stop)]]
    if family == "llava_next":
        with pytest.raises(ValueError, match="LLaVA-1.5 only"):
            VlmpruneLMM(pretrained=path, image_aspect="pad")
