"""Model families: each family's rule table loads its own standalone HF model, unknown model types are refused by
name, a new FAMILIES entry is all LLaVA needs, and models/ + io/ import only downward."""

import ast
import dataclasses
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
import torch

import vlmprune
from reference.paths import REPO_DIR
from vlmprune.io.weights import CheckpointError, abstract_params, load_params, prefix_rules
from vlmprune.models import FAMILIES, TEXT, VISION, family
from vlmprune.models.llava import Llava, param_shapes, weight_rules
from vlmprune.models.llava_config import LlavaConfig
from vlmprune.models.vision import clip

VISION_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "num_channels",
    "num_patches",
    "num_positions",
)
TEXT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rope_scaling",
)
ATOL = 1e-4  # fp32 under "highest" matmul precision: a couple of layers of rounding on O(1) logits


def _perturbed(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():  # HF's init leaves norms at 1 and biases at 0: perturb so every tensor is tested
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_configs_have_what_the_composition_reads(model_type):
    fam = FAMILIES[model_type]
    cfg = fam.config()
    for name in VISION_FIELDS if fam.kind == VISION else TEXT_FIELDS:
        assert hasattr(cfg, name), (model_type, name)
    hash(cfg)  # static argument of the jitted model
    assert fam.module(cfg).__class__ is fam.module


def test_clip_tower_rules_load_a_standalone_clip_vision_model(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hf = _perturbed(
        CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=28,
                patch_size=14,
            )
        )
    )
    hf.save_pretrained(tmp_path)
    fam = family("clip_vision_model", VISION)
    cfg = fam.config.from_hf(hf.config)
    module = fam.module(cfg)
    pix = np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32)
    abstract = abstract_params(module, pix)
    # transformers 5.x saves CLIPVisionModel flat ("embeddings.*"), older versions under "vision_model."
    params = load_params(str(tmp_path), abstract, fam.weight_rules, renames=[(r"^vision_model\.", "")])
    out = module.apply({"params": params}, pix, output_hidden_states=True)
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(pix), output_hidden_states=True).hidden_states
    for i, h in enumerate(ref):
        np.testing.assert_allclose(np.asarray(out["hidden_states"][i]), h.numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_decoder_rules_load_a_standalone_causal_lm(tmp_path, model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.for_model(
        model_type,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    hf = _perturbed(AutoModelForCausalLM.from_config(hf_cfg))
    hf.save_pretrained(tmp_path)
    fam = family(model_type, TEXT)
    cfg = fam.config.from_hf(hf.config)
    module = fam.module(cfg)
    ids = np.random.default_rng(1).integers(0, 64, (2, 7))
    pos, mask = np.tile(np.arange(7), (2, 1)), np.ones((2, 7), bool)

    def run(m, ids):
        return m(m.embed(ids), pos, mask)[0]

    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, method=run))["params"]
    params = load_params(str(tmp_path), abstract, fam.weight_rules, tied=fam.tied)
    logits = module.apply({"params": params}, ids, method=run)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), ref, atol=ATOL, rtol=0)


def test_rules_move_under_a_prefix():
    rules = prefix_rules(clip.WEIGHT_RULES, "vision_tower.vision_model.", "vision_tower")
    hits = [re.fullmatch(p, "vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight") for p, _, _ in rules]
    ((m, tmpl),) = [(m, t) for m, (_, t, _) in zip(hits, rules, strict=True) if m]
    assert m.expand(tmpl) == "vision_tower/layers_3/fc1/kernel"


def _hf_llava(vision_type="clip_vision_model", text_type="llama"):
    """A tiny HF LLaVA config whose sub-configs claim other model types."""
    from vlmprune.tiny import tiny_llava_config

    cfg = tiny_llava_config(100, 99, 0)
    cfg.vision_config.model_type = vision_type
    cfg.text_config.model_type = text_type
    return cfg


def test_unknown_tower_and_decoder_are_refused_by_name():
    with pytest.raises(
        ValueError,
        match=r"unsupported vision tower 'dinov2'; vlmprune implements clip_vision_model, siglip_vision_model",
    ):
        LlavaConfig.from_hf(_hf_llava(vision_type="dinov2"))
    with pytest.raises(
        ValueError, match=r"unsupported language model 'gemma'; vlmprune implements llama, mistral, qwen2"
    ):
        LlavaConfig.from_hf(_hf_llava(text_type="gemma"))
    with pytest.raises(ValueError, match="unsupported language model 'clip_vision_model'"):
        LlavaConfig.from_hf(_hf_llava(text_type="clip_vision_model"))  # a tower is not a decoder


def test_a_new_family_is_one_families_entry(monkeypatch):
    """A tower registered under a new model_type (here CLIP's classes under another name) is parsed, built and
    given weight rules by LLaVA with nothing else edited."""

    @dataclasses.dataclass(frozen=True)
    class OtherConfig(clip.CLIPVisionConfig):
        pass

    @classmethod
    def from_hf(cls, c):
        return cls(**dataclasses.asdict(clip.CLIPVisionConfig.from_hf(c)))

    OtherConfig.from_hf = from_hf
    other = dataclasses.replace(clip.FAMILY, name="Other", config=OtherConfig)
    monkeypatch.setitem(FAMILIES, "other_vision_model", other)
    cfg = LlavaConfig.from_hf(_hf_llava(vision_type="other_vision_model"))
    assert type(cfg.vision) is OtherConfig
    shapes = param_shapes(Llava(cfg))
    assert "layers_0" in shapes["vision_tower"]
    assert any(t.startswith("vision_tower/") for _, t, _ in weight_rules(cfg))


def test_loading_reports_every_problem_before_reading(mha_dir, tmp_path, monkeypatch):
    """Shapes are checked from the headers: a bad checkpoint raises without a single tensor being read."""
    from vlmprune.io.safetensors import SafetensorsFile

    d = tmp_path / "bad"
    shutil.copytree(mha_dir, d)
    cfg = json_load(d / "config.json")
    cfg["text_config"]["intermediate_size"] += 1
    json_dump(cfg, d / "config.json")
    read = []
    monkeypatch.setattr(SafetensorsFile, "get", lambda self, key: read.append(key))
    with pytest.raises(CheckpointError, match="shape mismatch") as e:
        vlmprune.load(str(d))
    assert len(e.value.problems) == 3 * cfg["text_config"]["num_hidden_layers"]  # gate, up, down of each layer
    assert read == []


def json_load(p):
    with open(p) as f:
        return json.load(f)


def json_dump(obj, p):
    with open(p, "w") as f:
        json.dump(obj, f)


# ---------------------------------------------------------------------------------------------- layering

ROOT = os.path.join(REPO_DIR, "vlmprune")
# package -> the vlmprune modules it may import (by prefix): models -> io, sharding, checks, anyres; io -> io only
ALLOWED = {
    "vlmprune.io": ("vlmprune.io",),
    "vlmprune.models": ("vlmprune.models", "vlmprune.io", "vlmprune.sharding", "vlmprune.checks", "vlmprune.anyres"),
    # the anyres geometry sits below the models (the OneVision packing is planned from it) and above types only
    "vlmprune.anyres": ("vlmprune.anyres", "vlmprune.types", "vlmprune.checks"),
    "vlmprune.sharding": (),
}


def _modules():
    for pkg in ALLOWED:
        base = os.path.join(ROOT, *pkg.split(".")[1:])
        files = (
            [base + ".py"]
            if os.path.isfile(base + ".py")
            else [os.path.join(r, f) for r, _, fs in os.walk(base) for f in fs if f.endswith(".py")]
        )
        for path in files:
            rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
            yield pkg, rel.removesuffix(".__init__"), ast.parse(open(path).read())


@pytest.mark.parametrize("pkg, name, tree", list(_modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_models_and_io_import_only_downward(pkg, name, tree):
    top = set(tree.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlmprune"):
            mods = [node.module]
            # a private module of the package (vlmprune.checks) is fine; a private name from a module is not
            private = [a.name for a in node.names if a.name.startswith("_") and node.module != "vlmprune"]
            assert not private, f"{name} imports private names {private}"
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names if a.name.startswith("vlmprune")]
        else:
            continue
        if not mods:
            continue
        assert node in top, f"{name}: import of {mods} inside a function or block"
        for m in mods:
            target = m if m != "vlmprune" else "vlmprune." + node.names[0].name
            assert any(target == a or target.startswith(a + ".") for a in ALLOWED[pkg]), f"{name} imports {target}"
            family_file = name.startswith(("vlmprune.models.vision.", "vlmprune.models.text."))
            other = target.startswith(("vlmprune.models.vision", "vlmprune.models.text")) and target != name
            # the one sanctioned reuse: a decoder family built on LLaMA's layers (Qwen2 = LLaMA + q/k/v biases)
            other = other and not (name.startswith("vlmprune.models.text.") and target == "vlmprune.models.text.llama")
            assert not (family_file and other), f"family {name} imports another family ({target})"
