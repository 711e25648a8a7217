"""Method specs: one text form for a pruner, shared by the CLI, ``visualize``, ``bench`` and the selection suite.

A spec is ``name[:budget[,budget...]][:key=value[,key=value...]]``::

    vispruner:64                        VisPruner(num_keep=64)
    vispruner:64:important_ratio=0.25   VisPruner(num_keep=64, important_ratio=0.25)
    hired:0.2                           HiRED(budget_rate=0.2)
    prumerge_plus:plus=false            settings without a budget (also ``prumerge_plus::plus=false``)
    hero:0.2:low_layers=(0,1),clip_path=/ckpt/clip
    none                                no pruning (``None``)

The positional value is the method's *budget*: the setting named by the class attribute ``budget_setting``
when the class defines one, else the entry of :data:`BUDGET_SETTINGS`, else ``num_keep`` when the method has that
field. VisionZip's budget is its total kept count, split into ``dominant + contextual`` 54:10 as in its README.
Several budgets (``vispruner:64,128``) make several pruners (:func:`parse_specs`).

Settings are typed by the method's dataclass fields: ``int``, ``float``, ``bool`` (``true``/``false``),
``None`` (``none``) where the field allows it, ``str``, and tuples written ``(0,1,2)``. An unknown method,
setting or a value of the wrong type raises ``ValueError`` naming the method and the setting. Pruners are made by
``vlmprune.prune.get(name, **settings)``, so every registered method (also one registered by a user) has specs.

``num_tokens`` (the visual tokens per image, when a model is at hand) turns an integer budget of a rate setting
(HiRED, HERO, FastV) into the rate that keeps that many tokens, and range-checks token counts.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

from vlmprune.prune.base import REGISTRY, LLMPruner, VisualPruner, get

Pruner = VisualPruner | LLMPruner  # what a spec builds

#: names that mean "no pruning"
NO_PRUNING = ("none", "full", "baseline")

#: the setting a bare budget sets, for the built-in methods that have no ``num_keep`` field
BUDGET_SETTINGS = {"hired": "budget_rate", "hero": "keep_ratio", "fastv": "keep_ratio"}

_NAME = re.compile(r"^[A-Za-z_][\w\-]*(:|$)")


@dataclasses.dataclass(frozen=True)
class SpecParts:
    """One spec split into its text fields (nothing typed yet)."""

    name: str
    budgets: tuple[str, ...] = ()
    settings: tuple[tuple[str, str], ...] = ()
    text: str = ""


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets: ``"a=(1,2),b=3"`` -> ``["a=(1,2)", "b=3"]``."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [s.strip() for s in out]


def _settings(fields: str, spec: str) -> tuple[tuple[str, str], ...]:
    out = []
    for kv in _split_top(fields):
        if not kv:
            continue
        key, eq, value = kv.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"bad setting {kv!r} in spec {spec!r}: write key=value")
        out.append((key.strip(), value.strip()))
    return tuple(out)


def split_spec(spec: str) -> SpecParts:
    """One spec string -> its name, budget strings and ``(key, value)`` strings."""
    text = str(spec).strip()
    name, _, rest = text.partition(":")
    if not name.strip():
        raise ValueError(f"empty method name in spec {spec!r}; write method[:budget][:key=value], e.g. vispruner:64")
    budgets, settings = "", ""
    if rest:
        first, _, more = rest.partition(":")
        if "=" in first:  # settings without a budget
            settings = rest
        else:
            budgets, settings = first, more
    return SpecParts(
        _norm(name), tuple(b.strip() for b in budgets.split(",") if b.strip()), _settings(settings, text), text
    )


def split_specs(specs) -> list[SpecParts]:
    """Several specs, separated by whitespace or commas (a string or an iterable of strings).

    A comma starts a new spec where the next piece begins with a method name; a number continues the budget
    list and ``key=value`` the settings of the spec before: ``"vispruner:64,128,fastervlm:64,none"`` is three.
    """
    pieces = []
    for s in [specs] if isinstance(specs, str) else list(specs):
        for word in str(s).split():
            pieces += [p for p in _split_top(word) if p]
    groups: list[list[str]] = []  # [name-and-first-fields, extra budgets..., extra settings...]
    for p in pieces:
        if _NAME.match(p) and "=" not in p.partition(":")[0]:
            groups.append([p, [], []])
        elif not groups:
            raise ValueError(f"{p!r} does not start with a method name; write method[:budget], e.g. vispruner:64")
        elif "=" in p.partition(":")[0]:
            groups[-1][2].append(p)
        else:  # a budget, maybe followed by the settings of the whole spec ("vispruner:64,128:layer=3")
            budget, _, settings = p.partition(":")
            if groups[-1][2] or groups[-1][0].count(":") > 1:
                raise ValueError(f"budget {budget!r} after the settings of {groups[-1][0]!r}: list budgets first")
            groups[-1][1].append(budget)
            if settings:
                groups[-1][2].append(settings)
    out = []
    for head, budgets, settings in groups:
        parts = split_spec(head)
        extra = tuple(_settings(",".join(settings), head)) if settings else ()
        text = ",".join([head, *budgets, *settings])
        out.append(
            dataclasses.replace(
                parts, budgets=parts.budgets + tuple(budgets), settings=parts.settings + extra, text=text
            )
        )
    if not out:
        raise ValueError("no methods given; write e.g. vispruner:64 fastervlm:64")
    return out


# ----------------------------------------------------------------------------------------------- typed values


def method_class(name: str) -> type[Pruner]:
    """The registered class of ``name``; ValueError naming the choices for an unknown one."""
    key = _norm(name)
    if key not in REGISTRY:
        choices = ", ".join(NO_PRUNING[:1] + tuple(sorted(REGISTRY)))
        raise ValueError(f"unknown pruning method {name!r}; available: {choices}")
    return REGISTRY[key]


def budget_setting(cls: type[Pruner]) -> str | None:
    """The setting a bare budget sets for ``cls`` (None: the method takes no budget, e.g. PruMerge+)."""
    own = getattr(cls, "budget_setting", None)
    if isinstance(own, str):
        return own
    if cls.name in BUDGET_SETTINGS:
        return BUDGET_SETTINGS[cls.name]
    if cls.name == "visionzip":
        return "dominant"  # the total, split by visionzip_split
    return "num_keep" if "num_keep" in _field_types(cls) else None


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _literal(text: str):
    """A value of an unannotated setting: bool, None, int, float, tuple, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    if text[:1] in "([" and text[-1:] in ")]":
        return tuple(_literal(x) for x in _split_top(text[1:-1]) if x)
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _convert(text: str, tp) -> Any:
    """``text`` as a value of the annotation ``tp``; ValueError (its message: what was expected) otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.lower() == "none":
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _convert(text, a)
            except ValueError:
                pass
        raise ValueError(" or ".join(_kind(a) for a in args))
    if origin is tuple:
        if not (text[:1] in "([" and text[-1:] in ")]"):
            raise ValueError("a tuple written (a,b,...)")
        args = typing.get_args(tp)
        items = [x for x in _split_top(text[1:-1]) if x]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(x, args[0]) for x in items)
        if args and len(args) != len(items):
            raise ValueError(f"a tuple of {len(args)} values")
        return tuple(_convert(x, a) for x, a in zip(items, args)) if args else tuple(_literal(x) for x in items)
    if tp is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError("true or false")
        return text.lower() == "true"
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("a number") from None
    if tp is str:
        return text
    if tp is type(None):
        if text.lower() != "none":
            raise ValueError("none")
        return None
    return _literal(text)


def field_names(name: str) -> tuple[str, ...]:
    """The settings of method ``name``."""
    return tuple(_field_types(method_class(name)))


def _kind(tp) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "none"}.get(
        tp, str(tp)
    )


def typed_settings(name: str, settings) -> dict:
    """``(key, text)`` pairs -> keyword settings of method ``name``, typed by its fields."""
    cls = method_class(name)
    types_ = _field_types(cls)
    out = {}
    for key, text in settings:
        if key not in types_:
            raise ValueError(f"{cls.name}: unknown setting {key!r}; its settings are {', '.join(sorted(types_))}")
        try:
            out[key] = _convert(text, types_[key])
        except ValueError as e:
            raise ValueError(f"{cls.name}: setting {key}={text!r} must be {e}") from None
    return out


# ----------------------------------------------------------------------------------------------- budgets


def visionzip_split(total: int) -> dict:
    """VisionZip's total kept count -> ``dominant`` and ``contextual`` in its README's 54:10 proportion."""
    contextual = min(max(1, round(total * 10 / 64)), total - 2) if total >= 3 else 0
    return {"dominant": total - contextual, "contextual": contextual}


def as_number(text: str) -> int | float:
    """A budget's text as a number: an int where it is a whole number >= 1, else a float."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"budget {text!r} is not a number") from None
    return int(value) if value.is_integer() and value >= 1 else value


def _as_count(name: str, budget) -> int:
    if isinstance(budget, bool) or not float(budget).is_integer() or budget < 1:
        raise ValueError(f"{name}: the budget is a token count (an integer >= 1), got {budget!r}")
    return int(budget)


def budget_settings(name: str, budget, *, num_tokens: int | None = None) -> dict:
    """The keyword settings that ``budget`` (a number, or its text) stands for in method ``name``."""
    cls = method_class(name)
    key = budget_setting(cls)
    if key is None:
        raise ValueError(f"{cls.name} takes no budget (its kept count is adaptive); write just {cls.name!r}")
    if isinstance(budget, str):
        try:
            budget = as_number(budget)
        except ValueError as e:
            raise ValueError(f"{cls.name}: {e}") from None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"{cls.name}: the budget must be a positive number, got {budget!r}")
    is_count = float(budget).is_integer() and budget >= 1
    if num_tokens is not None and is_count:
        limit = num_tokens + 1 if cls.name == "visionzip" else num_tokens  # visionzip's total counts CLS
        rate = _field_types(cls).get(key) is float
        if not rate and budget > limit:
            raise ValueError(
                f"{cls.name}: budget {int(budget)} is larger than the {num_tokens} visual tokens per "
                f"image{' (+ CLS)' if cls.name == 'visionzip' else ''}"
            )
        if rate:  # a token count for a rate: int(N * (k + 0.5) / N) == k exactly, where k / N could give k - 1
            return {key: min(1.0, (int(budget) + 0.5) / num_tokens)}
    if cls.name == "visionzip" and key == "dominant":
        return visionzip_split(_as_count(cls.name, budget))
    if _field_types(cls).get(key) is int:
        return {key: _as_count(cls.name, budget)}
    return {key: float(budget)}


def make(name: str, budget=None, *, num_tokens: int | None = None, **settings) -> Pruner | None:
    """A pruner of method ``name`` at ``budget`` with typed keyword ``settings``; None for "none"."""
    key = _norm(name)
    if key in NO_PRUNING:
        if budget is not None or settings:
            raise ValueError(f"method {key!r} keeps every token and takes no budget or settings")
        return None
    kw = dict(settings)
    if budget is not None:
        kw.update(budget_settings(key, budget, num_tokens=num_tokens))
    method_class(key)
    return get(key, **kw)


def build(parts: SpecParts, *, num_tokens: int | None = None) -> list[Pruner | None]:
    """One pruner per budget of ``parts`` (one with the defaults when it lists none)."""
    if parts.name in NO_PRUNING:
        return [make(parts.name, *parts.budgets[:1], **dict(parts.settings))]
    settings = typed_settings(parts.name, parts.settings)
    return [make(parts.name, b, num_tokens=num_tokens, **settings) for b in (parts.budgets or (None,))]


def parse_spec(spec: str, *, num_tokens: int | None = None) -> Pruner | None:
    """``"vispruner:64:important_ratio=0.25"`` -> ``VisPruner(num_keep=64, important_ratio=0.25)``; None for "none".

    Raises:
      ValueError: an unknown method or setting, a value of the wrong type, more than one budget.
    """
    parts = split_spec(spec)
    if len(parts.budgets) > 1:
        raise ValueError(f"spec {spec!r} lists {len(parts.budgets)} budgets; parse_specs makes one pruner per budget")
    return build(parts, num_tokens=num_tokens)[0]


def parse_specs(specs, *, num_tokens: int | None = None) -> list[Pruner | None]:
    """Every pruner of several specs (see :func:`split_specs`), one per budget, in order."""
    return [p for parts in split_specs(specs) for p in build(parts, num_tokens=num_tokens)]


def format_spec(pruner: Pruner | None) -> str:
    """The spec of ``pruner``: its budget then every setting that differs from the default (inverse of parse)."""
    if pruner is None:
        return "none"
    cls = type(pruner)
    key = budget_setting(cls)
    defaults = cls()
    skip = {"dominant", "contextual"} if cls.name == "visionzip" else {key}
    budget = ""
    if key is not None and not (
        cls.name == "visionzip"
        and visionzip_split(pruner.dominant + pruner.contextual)
        != {"dominant": pruner.dominant, "contextual": pruner.contextual}
    ):
        budget = str(pruner.dominant + pruner.contextual if cls.name == "visionzip" else getattr(pruner, key))
    else:
        skip = set()
    rest = [
        f"{f.name}={_text(getattr(pruner, f.name))}"
        for f in dataclasses.fields(cls)
        if f.name not in skip and getattr(pruner, f.name) != getattr(defaults, f.name)
    ]
    return ":".join([cls.name, budget, ",".join(rest)]).rstrip(":")


def _text(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return "(" + ",".join(_text(x) for x in v) + ")"
    return str(v)
