"""docs/adding_a_method.md: its first python block runs as written from an empty directory, and the registry's
refusals."""

from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess
import sys
from typing import ClassVar

import pytest

from reference.paths import REPO_DIR
from vlmprune import prune

DOC = pathlib.Path(REPO_DIR) / "docs" / "adding_a_method.md"


def test_first_python_block_runs_in_an_empty_directory(tmp_path):
    block = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(block)
    before = set(p.name for p in tmp_path.iterdir())
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "kept 8 of" in res.stdout
    assert set(p.name for p in tmp_path.iterdir()) == before  # writes nothing into the working directory


def test_register_refuses_taken_names_and_non_pruners():
    @dataclasses.dataclass(frozen=True)
    class Clash(prune.VisualPruner):
        name: ClassVar[str] = "vispruner"

    with pytest.raises(ValueError, match="taken by VisPruner"):
        prune.register(Clash)

    class NotAPruner:
        name = "nope"

    with pytest.raises(TypeError, match="not a VisualPruner or LLMPruner"):
        prune.register(NotAPruner)

    class Mutable(prune.VisualPruner):
        name: ClassVar[str] = "mutable_one"

    with pytest.raises(TypeError, match="frozen dataclass"):
        prune.register(dataclasses.dataclass(Mutable))
    assert "mutable_one" not in prune.REGISTRY and prune.REGISTRY["vispruner"] is prune.VisPruner


def test_register_under_another_name_and_get_checks_settings():
    @dataclasses.dataclass(frozen=True)
    class Keep(prune.VisualPruner):
        num_keep: int = 3
        name: ClassVar[str] = "keep_three"

    try:
        prune.register(name="Keep-Three")(Keep)
        assert prune.get("keep_three", num_keep=4) == Keep(num_keep=4)
        with pytest.raises(ValueError, match=r"does not take \['k'\]"):
            prune.get("keep-three", k=1)
    finally:
        prune.REGISTRY.pop("keep_three", None)
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune.get("keep_three")
