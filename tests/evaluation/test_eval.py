"""Benchmark evaluation: metrics against hand-computed values, lmms-lab-schema fixture datasets, the runner
(stubbed predictions scored exactly; the tiny model end to end), resumption and the ``vlmprune eval`` CLI."""

import json
import os

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from PIL import Image  # noqa: E402

from reference.paths import REPO_DIR  # noqa: E402
from vlmprune.evaluation import metrics, runner, tasks  # noqa: E402
from vlmprune.evaluation.metrics import (  # noqa: E402
    gqa_accuracy,
    mme_scores,
    normalize_vqa_answer,
    parse_mme,
    parse_pope,
    parse_sqa,
    pope_scores,
    sqa_accuracy,
    vqa_accuracy,
)

# ------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    "raw, want",
    [
        ("The Two Dogs!", "2 dogs"),  # lower case, "!" -> space, article dropped, number word -> digit
        ("Yes.", "yes"),  # trailing period stripped
        ("3.5", "3.5"),  # a period between digits stays
        ("dont", "don't"),  # contraction table
        ("a red, blue car", "red blue car"),  # commas removed, article dropped
        ("none", "0"),
        ("it's", "it 's"),  # "'s" split off as the official tokenizer does
    ],
)
def test_vqa_normalisation(raw, want):
    assert normalize_vqa_answer(raw) == want


def test_vqa_accuracy_leave_one_out():
    # 10 answers, normalised: red x3 ("Red." -> "red"), blue x7.
    answers = ["red", "red", "Red.", *["blue"] * 7]
    # "red": the 3 subsets leaving out a "red" hold 2 reds -> 2/3; the 7 others hold 3 -> 1.
    #        (3 * 2/3 + 7 * 1) / 10 = 9/10
    assert vqa_accuracy("red", answers) == pytest.approx(0.9)
    # "Blue": every subset holds >= 6 blues -> 1
    assert vqa_accuracy("Blue", answers) == pytest.approx(1.0)
    assert vqa_accuracy("green", answers) == 0.0
    # red x1: leaving out the red -> 0 matches; the 9 others -> 1/3.  9 * (1/3) / 10 = 0.3
    assert vqa_accuracy("red", ["red", *["blue"] * 9]) == pytest.approx(0.3)
    # "two" normalises to "2", 2 of 10: 2 * (1/3) + 8 * (2/3) = 6 -> 6/10
    assert vqa_accuracy("two", ["2", "2", *["3"] * 8]) == pytest.approx(0.6)


def test_pope_parsing_and_metrics():
    # LLaVA's eval_pope: first sentence only; the words "No", "no", "not" (case-sensitive: "Not" is not one).
    assert [
        parse_pope(t)
        for t in [
            "Yes",
            "No.",
            "No, there is not.",
            "There is no dog.",
            "I'm not sure",
            "Not sure.",
            "Nothing",
            "yes. There is no cat.",
        ]
    ] == ["yes", "no", "no", "no", "no", "yes", "yes", "yes"]
    labels = ["yes", "yes", "no", "no", "yes", "yes", "yes", "no"]
    cats = ["adversarial"] * 4 + ["random"] * 4
    preds = [
        "Yes",
        "No, there is not.",
        "Yes, there is a dog.",
        "There is no cat.",  # yes no yes no
        "Yes.",
        "yes",
        "I do not think so",
        "No",
    ]  # yes yes no no
    s = pope_scores(preds, labels, cats)
    # adversarial: TP=1 FN=1 FP=1 TN=1 -> acc 2/4, precision 1/2, recall 1/2, F1 1/2, yes-ratio 2/4
    a = s["categories"]["adversarial"]
    assert (a["accuracy"], a["precision"], a["recall"], a["f1"], a["yes_ratio"]) == pytest.approx((50, 50, 50, 50, 50))
    # random: TP=2 FN=1 TN=1 FP=0 -> acc 3/4, precision 2/2, recall 2/3, F1 = 2*1*(2/3)/(1+2/3) = 4/5, yes 2/4
    r = s["categories"]["random"]
    assert (r["accuracy"], r["precision"], r["recall"], r["f1"], r["yes_ratio"]) == pytest.approx(
        (75, 100, 200 / 3, 80, 50)
    )
    # headline = mean F1 over categories = (50 + 80) / 2; mean accuracy (50 + 75) / 2
    assert s["f1"] == pytest.approx(65.0) and s["accuracy"] == pytest.approx(62.5)
    # all 8: TP=3 FN=2 FP=1 TN=2 -> acc 5/8, P 3/4, R 3/5, F1 = 2*.75*.6/1.35 = 2/3
    o = s["overall"]
    assert (o["accuracy"], o["precision"], o["recall"], o["f1"]) == pytest.approx((62.5, 75, 60, 200 / 3))


def test_gqa_exact_match():
    # "Yes." -> yes (hit), " left " -> left (hit), "The table" != "table" (miss), "red" == "Red" (hit): 3/4
    assert gqa_accuracy(["Yes.", " left ", "The table", "red"], ["yes", "left", "table", "Red"]) == 75.0


def test_mme_score():
    assert [parse_mme(t) for t in ["Yes", "No.", "Yes, it is", "Maybe", "Not", "The answer is no"]] == [
        "yes",
        "no",
        "yes",
        "other",
        "no",
        "other",
    ]
    preds = [
        "Yes",
        "No",
        "Yes",
        "Yes, it is",  # existence img1: both right; img2: second wrong
        "No",
        "no",  # OCR img3: first wrong (answer yes)
        "yes",
        "Maybe",
    ]  # code_reasoning img4: "other" is wrong
    answers = ["Yes", "No", "Yes", "No", "Yes", "No", "Yes", "No"]
    cats = ["existence"] * 4 + ["OCR"] * 2 + ["code_reasoning"] * 2
    pairs = ["e1", "e1", "e2", "e2", "o1", "o1", "c1", "c1"]
    s = mme_scores(preds, answers, cats, pairs)
    # existence: acc 3/4 = 75, acc+ 1/2 images = 50 -> 125;  OCR: acc 1/2 = 50, acc+ 0/1 = 0 -> 50
    assert s["categories"]["existence"]["score"] == pytest.approx(125.0)
    assert s["categories"]["OCR"]["score"] == pytest.approx(50.0)
    assert s["perception"] == pytest.approx(175.0)  # 125 + 50
    assert s["cognition"] == pytest.approx(50.0)  # code_reasoning: 50 + 0


def test_sqa_parsing_and_accuracy():
    assert parse_sqa("B", 3) == 1 and parse_sqa("A. cat", 3) == 0 and parse_sqa("The answer is C.", 3) == 2
    assert parse_sqa("b", 3) == -1 and parse_sqa("E", 3) == -1 and parse_sqa("A.cat", 3) == -1
    # hits: B=1, A=0, C=2; "b" unparsable, "E" out of range for 3 choices -> 3/5
    assert sqa_accuracy(["B", "A. cat", "The answer is C.", "b", "E"], [1, 0, 2, 1, 1], [3] * 5) == 60.0


# ------------------------------------------------------------------------------------------- fixtures


def _img(i):
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, (24 + 4 * i, 32, 3), dtype=np.uint8))


POPE_LABELS = ["yes", "yes", "no", "no", "yes", "yes", "yes", "no"]
POPE_CATS = ["adversarial"] * 4 + ["random"] * 4
POPE_PREDS = [
    "Yes",
    "No, there is not.",
    "Yes, there is a dog.",
    "There is no cat.",
    "Yes.",
    "yes",
    "I do not think so",
    "No",
]


def _save(d, name, columns, features=None):
    ds = datasets.Dataset.from_dict(columns, features=features)
    path = os.path.join(d, name)
    ds.save_to_disk(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Small datasets in the lmms-lab schemas, written with save_to_disk."""
    d = str(tmp_path_factory.mktemp("evaldata"))
    img = datasets.Image()
    out = {}
    n = len(POPE_LABELS)
    out["pope"] = _save(
        d,
        "pope",
        dict(
            id=[str(i) for i in range(n)],
            question_id=[str(100 + i) for i in range(n)],
            question=[f"Is there a {w} in the image?" for w in "dog cat car sign tree cup bird ball".split()],
            answer=POPE_LABELS,
            image_source=[f"COCO_{i}" for i in range(n)],
            image=[_img(i) for i in range(n)],
            category=POPE_CATS,
        ),
    )
    out["textvqa"] = _save(
        d,
        "textvqa",
        dict(
            question_id=[11, 12, 13, 14],
            question=["what colour is it?", "what is written?", "which brand?", "how many?"],
            answers=[
                ["red", "red", "Red.", *["blue"] * 7],
                ["Blue", *["blue"] * 9],
                ["nikon"] * 10,
                ["red", *["blue"] * 9],
            ],
            ocr_tokens=[["STOP", "Main St"], [], ["nikon"], ["2"]],
            image=[_img(i) for i in range(4)],
        ),
    )
    # GQA as on the hub: questions carry imageId into a separate (id, image) table.
    out["gqa"] = _save(
        d,
        "gqa",
        dict(
            id=["q1", "q2", "q3", "q4"],
            imageId=["n1", "n2", "n1", "n2"],
            question=["Is it sunny?", "Which side?", "What is it on?", "What colour?"],
            answer=["yes", "left", "table", "red"],
        ),
    )
    out["gqa_images"] = _save(
        d,
        "gqa_images",
        dict(id=["n2", "n1"], image=[_img(5), _img(6)]),
        datasets.Features(id=datasets.Value("string"), image=img),
    )
    out["mme"] = _save(
        d,
        "mme",
        dict(
            question_id=["existence/1.png"] * 2 + ["existence/2.png"] * 2 + ["OCR/3.png"] * 2 + ["code/4.png"] * 2,
            question=[f"Question {i}? Please answer yes or no." for i in range(8)],
            answer=["Yes", "No", "Yes", "No", "Yes", "No", "Yes", "No"],
            category=["existence"] * 4 + ["OCR"] * 2 + ["code_reasoning"] * 2,
            image=[_img(i // 2) for i in range(8)],
        ),
    )
    out["scienceqa_img"] = _save(
        d,
        "sqa",
        dict(
            question=["Which animal is shown?", "Which is a mammal?", "Which state is farthest north?"],
            choices=[["cat", "dog"], ["frog", "whale", "shark"], ["Ohio", "Texas", "Maine", "Utah"]],
            answer=[0, 1, 2],
            hint=["A pet.", "", "Look at the map."],
            image=[_img(i) for i in range(3)],
        ),
    )
    return out


def test_prompts_follow_llava(data_dir):
    td = tasks.load_task_data("scienceqa_img", data_dir["scienceqa_img"])
    assert td.task.prompt(td.row(0)) == (
        "Context: A pet.\nWhich animal is shown?\nA. cat\nB. dog\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert td.task.prompt(td.row(1)).startswith("Which is a mammal?\nA. frog\nB. whale\nC. shark\n")
    tv = tasks.load_task_data("textvqa", data_dir["textvqa"])
    assert tv.task.prompt(tv.row(0)) == (
        "what colour is it?\nReference OCR token: STOP, Main St\nAnswer the question using a single word or phrase."
    )
    assert tv.task.prompt(tv.row(1)) == "what is written?\nAnswer the question using a single word or phrase."
    assert tv.task.prompt(tv.row(0), ocr=False) == (
        "what colour is it?\nAnswer the question using a single word or phrase."
    )
    assert tv.ids == ["11", "12", "13", "14"]
    mme = tasks.load_task_data("mme", data_dir["mme"])
    assert mme.ids == [str(i) for i in range(8)]  # question_id names the image (2 questions each): row index
    # without question_id, MME pairs an image's questions by its pixels
    no_qid = datasets.load_from_disk(data_dir["mme"]).remove_columns("question_id")
    refs = [tasks.TASKS["mme"].reference(r) for r in no_qid]
    assert [r["pair"] == refs[0]["pair"] for r in refs[:4]] == [True, True, False, False]
    assert refs[2]["pair"] == refs[3]["pair"]
    gqa = tasks.load_task_data("gqa", data_dir["gqa"], images=data_dir["gqa_images"])
    assert np.array_equal(np.asarray(gqa.row(1)["image"]), np.asarray(_img(5)))  # imageId n2 -> table row 0
    with pytest.raises(ValueError, match="no 'image' column .*pass images="):
        tasks.load_task_data("gqa", data_dir["gqa"])
    with pytest.raises(ValueError, match="image table needs columns 'id' and 'image'"):
        tasks.load_task_data("gqa", data_dir["gqa"], images=data_dir["gqa"])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['answers'\]"):
        tasks.load_task_data("textvqa", data_dir["gqa"])


def test_hub_layout_directory(tmp_path):
    """A local directory in the hub's layout (parquet under data/) loads through datasets.load_dataset."""
    ds = datasets.Dataset.from_dict(
        dict(question=["Is there a dog?"], answer=["yes"], category=["random"], question_id=["1"], image=[_img(0)]),
        features=datasets.Features(
            question=datasets.Value("string"),
            answer=datasets.Value("string"),
            category=datasets.Value("string"),
            question_id=datasets.Value("string"),
            image=datasets.Image(),
        ),
    )
    os.makedirs(tmp_path / "POPE" / "data")
    ds.to_parquet(str(tmp_path / "POPE" / "data" / "test-00000-of-00001.parquet"))
    td = tasks.load_task_data("pope", str(tmp_path / "POPE"), cache_dir=str(tmp_path / "cache"))
    assert len(td) == 1 and td.row(0)["image"].size == (32, 24) and td.ids == ["1"]


# ------------------------------------------------------------------------------------------- runner, stubbed

FORCED = {
    # task: (predictions in row order, headline, hand computation)
    "pope": (POPE_PREDS, 65.0),  # mean F1 (50 + 80) / 2, see test_pope_parsing_and_metrics
    # 0.9 (red, 3 of 10) + 1.0 (blue) + 0 (canon != nikon) + 0.3 (red, 1 of 10) = 2.2 / 4 = 55
    "textvqa": (["red", "Blue.", "canon", "Red"], 55.0),
    "gqa": (["Yes.", " left ", "The table", "red"], 75.0),  # 3 of 4
    # existence 125 + OCR 50 (code_reasoning is cognition) = 175
    "mme": (["Yes", "No", "Yes", "Yes, it is", "No", "no", "yes", "Maybe"], 175.0),
    "scienceqa_img": (["A", "C", "The answer is C."], 200 / 3),  # A right, C wrong (whale=B), C right: 2/3
}


def _forced_fn(preds, calls):
    def fn(prompts, images, samples):
        calls.append([s["index"] for s in samples])
        assert all(hasattr(im, "convert") for im in images)
        return [preds[s["index"]] for s in samples]

    return fn


@pytest.mark.parametrize("task", sorted(FORCED))
def test_runner_scores_forced_predictions(task, data_dir, tmp_path):
    preds, want = FORCED[task]
    calls = []
    extra = dict(images=data_dir["gqa_images"]) if task == "gqa" else {}
    s = runner.run_eval(
        task,
        str(tmp_path),
        data=data_dir[task],
        batch_size=3,
        predict_fn=_forced_fn(preds, calls),
        progress=False,
        **extra,
    )
    assert s["headline"] == pytest.approx(want)
    assert s["num_samples"] == len(preds) and s["generated_this_run"] == len(preds)
    assert [len(c) for c in calls] == [3] * (len(preds) // 3) + ([len(preds) % 3] if len(preds) % 3 else [])
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["headline"] == pytest.approx(want)
    recs = runner.read_predictions(str(tmp_path / "predictions.jsonl"))
    assert [r["prediction"] for r in recs.values()] == list(preds)
    # the predictions file alone re-scores the run
    assert metrics.score_task(task, recs.values())["headline"] == pytest.approx(want)


def test_runner_resumes(data_dir, tmp_path):
    calls = []
    fn = _forced_fn(POPE_PREDS, calls)
    s = runner.run_eval(
        "pope", str(tmp_path), data=data_dir["pope"], limit=3, batch_size=2, predict_fn=fn, progress=False
    )
    assert s["num_samples"] == 3 and calls == [[0, 1], [2]]
    # a crash mid-write leaves a torn last line: it is dropped and that sample generated again
    with open(tmp_path / "predictions.jsonl", "a") as f:
        f.write('{"id": "103", "predic')
    calls.clear()
    s = runner.run_eval("pope", str(tmp_path), data=data_dir["pope"], batch_size=2, predict_fn=fn, progress=False)
    assert calls == [[3, 4], [5, 6], [7]] and s["generated_this_run"] == 5
    assert s["headline"] == pytest.approx(65.0)
    calls.clear()
    s2 = runner.run_eval("pope", str(tmp_path), data=data_dir["pope"], batch_size=2, predict_fn=fn, progress=False)
    assert calls == [] and s2["generated_this_run"] == 0 and s2["headline"] == s["headline"]
    with open(tmp_path / "predictions.jsonl") as f:
        assert len(f.read().splitlines()) == 8
    with pytest.raises(ValueError, match="other settings .*max_new_tokens"):
        runner.run_eval("pope", str(tmp_path), data=data_dir["pope"], max_new_tokens=3, predict_fn=fn, progress=False)
    calls.clear()
    s3 = runner.run_eval(
        "pope",
        str(tmp_path),
        data=data_dir["pope"],
        max_new_tokens=3,
        predict_fn=fn,
        progress=False,
        overwrite=True,
        batch_size=8,
    )
    assert calls == [list(range(8))] and s3["generated_this_run"] == 8 and s3["max_new_tokens"] == 3


# ------------------------------------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def tiny_model(mha_dir):
    import vlmprune

    return vlmprune.load(mha_dir)


def _counting(model):
    calls = []
    gen = model.generate

    def generate(*a, **k):
        calls.append(a[0].shape)
        return gen(*a, **k)

    return generate, calls


@pytest.mark.parametrize("task", ["pope", "scienceqa_img"])
def test_runner_end_to_end(task, tiny_model, data_dir, tmp_path, monkeypatch):
    from vlmprune import prune

    gen, calls = _counting(tiny_model)
    monkeypatch.setattr(tiny_model, "generate", gen)
    pruner = prune.get("vispruner", num_keep=4)
    # both tasks (and the CLI test) pad to (2, 256) and generate 3 tokens: one prefill and one decode compile
    kw = dict(
        model=tiny_model,
        pruner=pruner,
        data=data_dir[task],
        limit=3,
        batch_size=2,
        max_new_tokens=3,
        pad_multiple=256,
        progress=False,
    )
    s = runner.run_eval(task, str(tmp_path), **kw)
    assert s["num_samples"] == 3 and s["generated_this_run"] == 3 and s["pruner"].startswith("vispruner-num_keep=4")
    assert calls == [(2, 256), (2, 256)]  # the last batch is filled up to 2 rows
    assert 0.0 <= s["headline"] <= 100.0
    # throughput: samples/s over the run, and the selection's share of the time inside generate
    assert s["samples_per_second"] > 0 and 0.0 < s["selection_share"] < 1.0 and s["selection_ms_per_batch"] > 0
    assert s["image_aspect"] == "crop" and len(s["settings_fingerprint"]) == 16
    recs = runner.read_predictions(str(tmp_path / "predictions.jsonl"))
    assert len(recs) == 3 and all(isinstance(r["prediction"], str) for r in recs.values())
    # left padding: a sample's prediction does not depend on its batch mates or its row
    td = tasks.load_task_data(task, data_dir[task])
    fn = runner.model_predict_fn(tiny_model, pruner=pruner, max_new_tokens=3, batch_size=2, pad_multiple=256)
    rows = [td.row(2), td.row(0)]
    assert fn([td.task.prompt(r) for r in rows], [r["image"] for r in rows], [{}, {}]) == [
        recs[td.ids[2]]["prediction"],
        recs[td.ids[0]]["prediction"],
    ]
    calls.clear()
    s2 = runner.run_eval(task, str(tmp_path), **kw)
    assert calls == [] and s2["generated_this_run"] == 0 and s2["headline"] == s["headline"]


def test_cli_eval(mha_dir, tiny_model, data_dir, tmp_path, monkeypatch, capsys):
    import vlmprune
    from vlmprune import cli

    loaded = []
    monkeypatch.setattr(vlmprune, "load", lambda path, dtype="float32": loaded.append((path, dtype)) or tiny_model)
    out = str(tmp_path / "out")
    argv = [
        "eval",
        "--model",
        mha_dir,
        "--task",
        "pope",
        "--data",
        data_dir["pope"],
        "--output-dir",
        out,
        "--method",
        "vispruner",
        "--keep",
        "4",
        "--batch-size",
        "2",
        "--limit",
        "2",
        "--max-new-tokens",
        "3",
        "--pad-multiple",
        "256",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    assert loaded == [(mha_dir, "float32")]
    printed = capsys.readouterr().out
    assert "pope vispruner-num_keep=4" in printed and "f1 =" in printed
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert s["num_samples"] == 2 and s["model"] == os.path.abspath(mha_dir) and s["headline_metric"] == "f1"
    assert cli.main(argv) == 0
    assert "0 generated now" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", mha_dir, "--task", "vqav2"])


def test_accuracy_experiment(tiny_model, data_dir, tmp_path, monkeypatch, capsys):
    """experiments/accuracy.py: the published tables print without a model; a (tiny) table runs end to end."""
    import importlib.util

    import vlmprune

    path = os.path.join(REPO_DIR, "experiments", "accuracy.py")
    spec = importlib.util.spec_from_file_location("accuracy_experiment", path)
    acc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(acc)
    assert acc.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert (
        "| 64 vispruner | – (55.4) [55.59] | – (69.1) [68.57] | – (55.8) [55.68] | – (80.4) [80.91] | – (1369.9) |"
        in out
    )
    assert "| HiRED 20% | – (73.4) | – (61.4) | – (1483.0) | – (87.0) |" in out
    # a tiny table with the shapes of test_runner_end_to_end (no new compile)
    monkeypatch.setitem(
        acc.TABLES,
        "tiny",
        (
            "tiny",
            ("pope", "scienceqa_img"),
            [("4 vispruner", "vispruner", dict(num_keep=4))],
            dict(pad_multiple=256, max_new_tokens=3, progress=False),
        ),
    )
    monkeypatch.setitem(acc.PUBLISHED, "tiny", {"4 vispruner": {"pope": 50.0}})
    monkeypatch.setattr(vlmprune, "load", lambda path, dtype: tiny_model)
    argv = [
        "--table",
        "tiny",
        "--model",
        "m",
        "--data",
        f"pope={data_dir['pope']}",
        "--data",
        f"scienceqa_img={data_dir['scienceqa_img']}",
        "--limit",
        "2",
        "--batch-size",
        "2",
        "--out-dir",
        str(tmp_path),
    ]
    assert acc.main(argv) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "tiny.json") as f:
        res = json.load(f)["results"]["4 vispruner"]
    assert set(res) == {"pope", "scienceqa_img"}
    assert f"| 4 vispruner | {res['pope']:.1f} (50.0) | {res['scienceqa_img']:.1f} (–) |" in out
    assert os.path.exists(tmp_path / "tiny" / "pope" / "4_vispruner" / "predictions.jsonl")
