"""Bad eval input gets a named error before anything is generated; resumes never mix settings; the CLI prints
``error: ...`` for user errors (issue 13, eval part)."""

import json
import os

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from PIL import Image  # noqa: E402

from vlmprune import cli  # noqa: E402
from vlmprune.evaluation import runner, tasks  # noqa: E402


def _img(i):
    return Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 28, 3), dtype=np.uint8))


def _pope(tmp_path, answers, name="pope"):
    n = len(answers)
    ds = datasets.Dataset.from_dict(
        dict(
            question_id=[str(i) for i in range(n)],
            question=["Is there a dog?"] * n,
            answer=answers,
            category=["random"] * n,
            image=[_img(i) for i in range(n)],
        ),
        features=datasets.Features(
            question_id=datasets.Value("string"),
            question=datasets.Value("string"),
            answer=datasets.Value("string"),
            category=datasets.Value("string"),
            image=datasets.Image(),
        ),
    )
    path = str(tmp_path / name)
    ds.save_to_disk(path)
    return path


def _never(prompts, images, samples):
    raise AssertionError("nothing may be generated")


def _yes(prompts, images, samples):
    return ["Yes"] * len(prompts)


@pytest.mark.parametrize("bad", [None, "maybe", "", "Y"])
def test_pope_label_must_be_yes_or_no(tmp_path, bad):
    data = _pope(tmp_path, ["yes", "no", bad, "no"])
    with pytest.raises(ValueError, match=r"pope: sample 2: label 'answer' must be 'yes' or 'no', got " + repr(bad)):
        runner.run_eval("pope", str(tmp_path / "out"), data=data, predict_fn=_never, progress=False)
    assert not os.path.exists(tmp_path / "out" / "predictions.jsonl")  # refused before any output
    # the bad row outside --limit is not read
    s = runner.run_eval("pope", str(tmp_path / "out"), data=data, limit=2, predict_fn=_yes, progress=False)
    assert s["num_samples"] == 2


@pytest.mark.parametrize(
    "task, row, msg",
    [
        ("mme", dict(question="q", answer=None, category="OCR"), "'answer' must be 'yes' or 'no', got None"),
        ("mme", dict(question="q", answer="Yes", category=None), "'category' must be a non-empty string"),
        ("gqa", dict(question="q", answer=None), "'answer' must be a non-empty string, got None"),
        ("gqa", dict(question="q", answer="  "), "'answer' must be a non-empty string"),
        ("textvqa", dict(question="q", answers=[]), "'answers' must be a non-empty list of strings"),
        ("textvqa", dict(question="q", answers=["a", None]), "'answers' must be a non-empty list of strings"),
        ("scienceqa_img", dict(question="q", choices=["a", "b"], answer=2), r"option index in \[0, 2\), got 2"),
        ("scienceqa_img", dict(question="q", choices=["a", "b"], answer=-1), r"option index in \[0, 2\), got -1"),
        ("scienceqa_img", dict(question="q", choices=["a", "b"], answer=None), "option index"),
        ("scienceqa_img", dict(question="q", choices=["a"], answer=0), "at least 2 options"),
    ],
)
def test_every_task_validates_its_labels(task, row, msg):
    t = tasks.get_task(task)
    row = dict(row, image=_img(0), question_id="k")
    with pytest.raises(ValueError, match=f"{task}: sample s7: .*{msg}"):
        t.reference(row, "s7")


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(limit=-2), r"limit must be an integer >= 1, got -2"),
        (dict(limit=0), r"limit must be an integer >= 1, got 0"),
        (dict(max_new_tokens=0), r"max_new_tokens must be an integer >= 1, got 0"),
        (dict(max_new_tokens=-5), r"max_new_tokens must be an integer >= 1"),
        (dict(batch_size=0), r"batch_size must be an integer >= 1"),
        (dict(limit=2.5), r"limit must be an integer >= 1, got 2.5"),
    ],
)
def test_option_ranges(tmp_path, kw, msg):
    data = _pope(tmp_path, ["yes", "no"])
    with pytest.raises(ValueError, match=msg):
        runner.run_eval("pope", str(tmp_path / "out"), data=data, predict_fn=_never, progress=False, **kw)


@pytest.mark.parametrize("path", ["/no/such/pope", "./missing_pope", "missing_dir", "a/b/c"])
def test_missing_local_data_is_not_a_hub_lookup(tmp_path, path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        tasks.load_task_data("pope", path)
    assert tasks.check_data_path("lmms-lab/POPE") == "lmms-lab/POPE"  # a hub id stays a hub id


def test_resume_refuses_other_settings_without_run_json(tmp_path):
    data = _pope(tmp_path, ["yes", "no", "yes"])
    out = str(tmp_path / "out")
    runner.run_eval("pope", out, data=data, limit=2, predict_fn=_yes, progress=False, max_new_tokens=4)
    recs = runner.read_predictions(os.path.join(out, "predictions.jsonl"))
    assert len({r["settings"] for r in recs.values()}) == 1
    # with run.json, the message names the setting that changed
    with pytest.raises(ValueError, match=r"other settings \(max_new_tokens: 4 -> 5\)"):
        runner.run_eval("pope", out, data=data, predict_fn=_never, progress=False, max_new_tokens=5)
    os.remove(os.path.join(out, "run.json"))
    with pytest.raises(ValueError, match="2 predictions of a run with other settings .*run.json is missing"):
        runner.run_eval("pope", out, data=data, predict_fn=_never, progress=False, max_new_tokens=5, system_prompt="")
    # the same settings resume (only the third sample is generated), also without run.json
    s = runner.run_eval("pope", out, data=data, predict_fn=_yes, progress=False, max_new_tokens=4)
    assert s["generated_this_run"] == 1 and s["num_samples"] == 3
    # records of an older format (no fingerprint) are not adopted either
    path = os.path.join(out, "predictions.jsonl")
    with open(path) as f:
        lines = [json.loads(x) for x in f]
    with open(path, "w") as f:
        for r in lines:
            r.pop("settings")
            f.write(json.dumps(r) + "\n")
    with pytest.raises(ValueError, match="other settings"):
        runner.run_eval("pope", out, data=data, predict_fn=_never, progress=False, max_new_tokens=4)


def test_failed_first_batch_leaves_a_rerunnable_directory(tmp_path):
    data = _pope(tmp_path, ["yes", "no", "yes"])
    out = str(tmp_path / "out")

    def boom(prompts, images, samples):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        runner.run_eval("pope", out, data=data, predict_fn=boom, progress=False, max_new_tokens=64)
    # the corrected rerun (other settings) is accepted: no prediction was made
    s = runner.run_eval("pope", out, data=data, predict_fn=_yes, progress=False, max_new_tokens=8)
    assert s["generated_this_run"] == 3 and s["max_new_tokens"] == 8
    assert s["samples_per_second"] > 0 and s["selection_share"] is None  # no model: nothing to time


def test_cli_eval_user_errors(tmp_path, mha_dir, capsys, monkeypatch):
    import vlmprune

    monkeypatch.setattr(vlmprune, "load", lambda *a, **k: pytest.fail("the model must not be loaded"))
    data = _pope(tmp_path, ["yes", None])
    base = ["eval", "--model", mha_dir, "--task", "pope", "--output-dir", str(tmp_path / "o"), "--no-progress"]
    cases = [
        (["--data", data, "--limit", "-2"], "error: limit must be an integer >= 1, got -2"),
        (["--data", data, "--max-new-tokens", "0"], "error: max_new_tokens must be an integer >= 1, got 0"),
        (["--data", str(tmp_path / "nope")], "no such file or directory"),
        (["--data", data], "error: pope: sample 1: label 'answer' must be 'yes' or 'no', got None"),
        (
            ["--data", data, "--clip-path", mha_dir, "--method", "vispruner"],
            "error: --clip-path does not apply to --method vispruner",
        ),
    ]
    for extra, msg in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(base + extra)
        assert msg in str(e.value) and str(e.value).startswith("error: "), (extra, e.value)
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--model", str(tmp_path / "none"), "--task", "pope", "--data", data])
    assert str(e.value).startswith("error: --model")
