"""Method specs (``vlmprune.prune.parse_spec``): one text form for every command, typed by the method's fields."""

import dataclasses
from typing import ClassVar

import pytest

from vlmprune import prune
from vlmprune.prune import spec


def test_budget_and_settings():
    p = prune.parse_spec("vispruner:64:important_ratio=0.25,exact_similarity=false,layer=-3")
    assert p == prune.VisPruner(num_keep=64, important_ratio=0.25, exact_similarity=False, layer=-3)
    assert prune.parse_spec("hired:0.2") == prune.HiRED(budget_rate=0.2)
    assert prune.parse_spec("fastv:0.25:layer=3") == prune.FastV(keep_ratio=0.25, layer=3)
    assert prune.parse_spec("visionzip:64") == prune.VisionZip(dominant=54, contextual=10)
    assert prune.parse_spec("prumerge_plus:plus=false") == prune.parse_spec("prumerge_plus::plus=false")
    assert prune.parse_spec("prumerge_plus::plus=false").plus is False
    h = prune.parse_spec("hero:0.3:low_layers=(0,1),high_layers=(2,),clip_path=/m/clip,t_cls=0.05")
    assert (h.keep_ratio, h.low_layers, h.high_layers, h.clip_path, h.t_cls) == (0.3, (0, 1), (2,), "/m/clip", 0.05)
    assert prune.parse_spec("vispruner:64:layer=none").layer is None
    assert prune.parse_spec("Vis-Pruner".replace("-", "")) == prune.VisPruner()
    for name in ("none", "full", "baseline"):
        assert prune.parse_spec(name) is None


def test_lists_split_on_names():
    got = prune.parse_specs("vispruner:64,128,fastervlm:8,none hired:0.2 vispruner:4,important_ratio=0.25")
    assert got == [
        prune.VisPruner(num_keep=64),
        prune.VisPruner(num_keep=128),
        prune.FasterVLM(num_keep=8),
        None,
        prune.HiRED(budget_rate=0.2),
        prune.VisPruner(num_keep=4, important_ratio=0.25),
    ]
    assert prune.parse_specs(["none", "vispruner:64,128:important_ratio=0.25"])[2].important_ratio == 0.25
    with pytest.raises(ValueError, match="list budgets first"):
        prune.parse_specs("vispruner:64:important_ratio=0.25,128")


def test_num_tokens_counts_and_rates():
    h = prune.parse_spec("hired:115", num_tokens=576)
    assert min(576, int(576 * h.budget_rate)) == 115  # a count for a rate setting keeps exactly that many
    assert prune.parse_spec("hired:0.2", num_tokens=576).budget_rate == 0.2
    with pytest.raises(ValueError, match="budget 65 is larger than the 64 visual tokens"):
        prune.parse_spec("vispruner:65", num_tokens=64)
    assert (
        prune.parse_spec("visionzip:65", num_tokens=64).dominant
        + prune.parse_spec("visionzip:65", num_tokens=64).contextual
        == 65
    )  # VisionZip's total counts CLS


@pytest.mark.parametrize(
    "text,message",
    [
        ("nope:3", r"unknown pruning method 'nope'; available: none, "),
        ("vispruner:64:foo=1", r"vispruner: unknown setting 'foo'; its settings are .*important_ratio"),
        ("vispruner:64:important_ratio=abc", r"vispruner: setting important_ratio='abc' must be a number"),
        ("vispruner:64:exact_similarity=2", r"vispruner: setting exact_similarity='2' must be true or false"),
        ("vispruner:64:layer=x", r"vispruner: setting layer='x' must be an integer or none"),
        ("hero:0.2:low_layers=3", r"hero: setting low_layers='3' must be a tuple"),
        ("hero:0.2:low_layers=(1,a)", r"hero: setting low_layers='\(1,a\)' must be an integer"),
        ("vispruner:0.5", r"vispruner: the budget is a token count"),
        ("vispruner:abc", r"vispruner: budget 'abc' is not a number"),
        ("vispruner:-4", r"vispruner: the budget must be a positive number"),
        ("prumerge_plus:64", r"prumerge_plus takes no budget"),
        ("vispruner:64,128", r"lists 2 budgets"),
        ("none:3", r"'none' keeps every token"),
        ("vispruner:64:important_ratio", r"bad setting 'important_ratio'.*key=value"),
        (":64", r"empty method name"),
    ],
)
def test_clear_errors(text, message):
    with pytest.raises(ValueError, match=message):
        prune.parse_spec(text)


@pytest.mark.parametrize(
    "text",
    [
        "vispruner:64:important_ratio=0.25,exact_similarity=false",
        "visionzip:16",
        "hero:0.3:low_layers=(0,1),clip_path=/c",
        "prumerge_plus::plus=false",
        "none",
        "fastv:0.25:layer=3",
        "random:8:seed=3",
        "hired:0.2:alpha=0.3",
    ],
)
def test_format_is_the_inverse(text):
    p = prune.parse_spec(text)
    assert prune.parse_spec(prune.format_spec(p)) == p


def test_a_user_method_gets_specs(monkeypatch):
    """A method added to the registry from outside the package: its budget setting and typed fields work."""

    @dataclasses.dataclass(frozen=True)
    class Mine(prune.Pruner):
        share: float = 0.5
        rounds: int = 2
        tags: tuple[str, ...] = ()
        name: ClassVar[str] = "mine"
        budget_setting: ClassVar[str] = "share"

    monkeypatch.setitem(prune.REGISTRY, "mine", Mine)
    assert prune.parse_spec("mine:0.25:rounds=3,tags=(a,b)") == Mine(share=0.25, rounds=3, tags=("a", "b"))
    with pytest.raises(ValueError, match="mine: setting rounds='x' must be an integer"):
        prune.parse_spec("mine:0.25:rounds=x")
    assert spec.budget_setting(Mine) == "share"


def test_cli_method_flag_takes_a_spec():
    from vlmprune.cli import build_parser, pruner_from_args

    def args(*extra):
        return build_parser().parse_args(["generate", "--model", "m", "--image", "i", "--prompt", "p", *extra])

    assert pruner_from_args(args("--method", "vispruner:8:important_ratio=0.25")) == prune.VisPruner(
        num_keep=8, important_ratio=0.25
    )
    assert pruner_from_args(args("--method", "vispruner", "--keep", "8")) == prune.VisPruner(num_keep=8)
    with pytest.raises(SystemExit, match="not both"):
        pruner_from_args(args("--method", "vispruner:8", "--keep", "8"))
    with pytest.raises(SystemExit, match="--method: vispruner: unknown setting 'x'"):
        pruner_from_args(args("--method", "vispruner:8:x=1"))
