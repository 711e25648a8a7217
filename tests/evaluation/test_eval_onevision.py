"""``vlmprune eval`` on LLaVA-OneVision: a tiny random SigLIP + Qwen2 checkpoint with the Qwen2 chat format in its
processor-level ``chat_template.json`` (as the llava-hf OneVision checkpoints ship it), run without pruning,
with DivPrune (on the packed block) and with a per-tile method (spatial-compat layout)."""

import json
import os

import datasets
import numpy as np
import pytest
from PIL import Image

import vlmprune
from reference.onevision_builders import build_hf_onevision_with_processor
from vlmprune import prune
from vlmprune.evaluation import runner, tasks

pytestmark = pytest.mark.slow  # end-to-end runs of the command: skipped by make test-fast

# Qwen2's chat format, one image first in the user turn (written for this test in the checkpoints' style)
QWEN2_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def ov_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_ov")
    build_hf_onevision_with_processor(d, seed=3)
    # the hub layout: the tokenizer's own template in tokenizer_config.json, the processor's in chat_template.json
    jinja, tok_cfg = os.path.join(d, "chat_template.jinja"), os.path.join(d, "tokenizer_config.json")
    with open(tok_cfg) as f:
        cfg = json.load(f)
    if os.path.exists(jinja):
        with open(jinja) as f:
            cfg["chat_template"] = f.read()
        os.remove(jinja)
    assert "<|im_start|>" not in cfg["chat_template"]
    with open(tok_cfg, "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(d, "chat_template.json"), "w") as f:
        json.dump({"chat_template": QWEN2_TEMPLATE}, f)
    return str(d)


@pytest.fixture(scope="module")
def ov_model(ov_dir):
    return vlmprune.load(ov_dir)


@pytest.fixture(scope="module")
def pope(tmp_path_factory):
    """Two POPE rows (lmms-lab schema) with 40x60 images: a 2x2 grid whose map is downsampled."""
    rng = np.random.default_rng(0)
    n = 2
    ds = datasets.Dataset.from_dict(
        dict(
            id=[str(i) for i in range(n)],
            question_id=[str(100 + i) for i in range(n)],
            question=["Is there a dog in the image?", "Is there a cat in the image?"],
            answer=["yes", "no"],
            image_source=[f"COCO_{i}" for i in range(n)],
            image=[Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)) for _ in range(n)],
            category=["random"] * n,
        )
    )
    path = str(tmp_path_factory.mktemp("eval_ov_data") / "pope")
    ds.save_to_disk(path)
    return path


def test_prompt_is_the_checkpoints_qwen2_format(ov_model):
    """The processor-level template wins over the tokenizer's, and OneVision's default system prompt is its
    qwen_1_5 template's."""
    system = runner.resolve_system_prompt(runner.FAMILY_DEFAULT, ov_model)
    assert system == tasks.ONEVISION_SYSTEM_PROMPT
    assert runner.chat_prompts(ov_model.processor, ["Is it red?"], system) == [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nIs it red?<|im_end|>\n<|im_start|>assistant\n"
    ]
    assert runner.chat_prompts(ov_model.processor, ["Is it red?"], "")[0].startswith("<|im_start|>user\n<image>\n")


@pytest.mark.parametrize("pruner", [None, prune.get("divprune", num_keep=4)], ids=["none", "divprune"])
def test_run_eval_on_onevision(ov_model, pope, pruner, tmp_path):
    kw = dict(model=ov_model, pruner=pruner, data=pope, batch_size=2, max_new_tokens=2, progress=False)
    s = runner.run_eval("pope", str(tmp_path), **kw)
    assert s["num_samples"] == 2 and s["generated_this_run"] == 2 and s["pruner"] == runner.pruner_label(pruner)
    assert s["system_prompt"] == tasks.ONEVISION_SYSTEM_PROMPT and 0.0 <= s["headline"] <= 100.0
    recs = runner.read_predictions(str(tmp_path / "predictions.jsonl"))
    assert sorted(recs) == ["100", "101"] and all(isinstance(r["prediction"], str) for r in recs.values())


def test_cli_eval_on_onevision_per_tile_method(ov_dir, pope, tmp_path, capsys):
    from vlmprune import cli

    out = str(tmp_path / "out")
    argv = ["eval", "--model", ov_dir, "--task", "pope", "--data", pope, "--output-dir", out]
    argv += ["--method", "uniform", "--keep", "4", "--batch-size", "2", "--max-new-tokens", "2", "--no-progress"]
    assert cli.main(argv) == 0
    assert "pope uniform-num_keep=4" in capsys.readouterr().out
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert s["num_samples"] == 2 and s["system_prompt"] == tasks.ONEVISION_SYSTEM_PROMPT
    assert s["selection_share"] is None  # the selection is not timed apart from the packing on OneVision
    with pytest.raises(SystemExit, match="error: .*OneVision"):
        cli.main(["eval", "--model", ov_dir, "--task", "pope", "--data", pope, "--method", "hired"])
