"""Writing outputs without losing anyone's files.

The rule every vlmprune writer follows:

* a directory output goes only into a path that is absent, an empty directory, or a directory carrying the
  marker file of this writer's own earlier output of the same kind; anything else is refused with
  :class:`OutputExistsError` unless ``overwrite=True`` is given, and a directory that holds the source being
  read is refused even then;
* a file output goes only to a path that does not exist yet, unless ``overwrite=True``;
* the output is built in a hidden temporary sibling (``.<name>.tmp-*``) and renamed into place only once it is
  complete, so an interrupted or failed write leaves the destination exactly as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence


class OutputExistsError(FileExistsError):
    """The destination holds files this writer did not make (or the source itself); nothing was written."""


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """A kind of directory output: ``marker`` is a JSON file in it whose ``"format"`` field equals ``format``."""

    marker: str
    format: str
    description: str


def read_marker(directory: str, kind: OutputKind) -> dict | None:
    """The marker dict when ``directory`` is this kind's own output, else None (unreadable markers are None)."""
    path = os.path.join(directory, kind.marker)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == kind.format else None


def write_marker(directory: str, kind: OutputKind, **fields) -> None:
    with open(os.path.join(directory, kind.marker), "w") as f:
        json.dump({"format": kind.format, **fields}, f, indent=1)


def _listing(directory: str, limit: int = 5) -> str:
    names = sorted(os.listdir(directory))
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def _inside(path: str, parent: str) -> bool:
    """True when ``path`` is ``parent`` or lies under it (both resolved)."""
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_dir_target(
    path: str, kind: OutputKind, *, overwrite: bool = False, protect: Sequence[str] = (), flag: str = "overwrite=True"
) -> None:
    """Raise :class:`OutputExistsError` unless ``path`` may receive a ``kind`` output.

    Args:
      path: the destination directory.
      kind: what will be written there.
      overwrite: allow replacing a directory of any content (never one that holds a ``protect`` path).
      protect: paths being read (the conversion's source): the destination may not be or contain them.
      flag: how the caller spells the overwrite switch, for the message (``--overwrite`` on the CLI).
    """
    for src in protect:
        if _inside(src, path):
            raise OutputExistsError(
                f"{path}: the output directory would replace {src!r}, which is being read; write to another directory"
            )
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        if overwrite and not os.path.isdir(path):
            return
        raise OutputExistsError(
            f"{path}: exists and is not a directory; refusing to replace it"
            + ("" if overwrite else f" (pass {flag} to replace it)")
        )
    if not os.listdir(path) or read_marker(path, kind) is not None or overwrite:
        return
    raise OutputExistsError(
        f"{path}: directory is not empty and is not a {kind.description} ({kind.marker} missing); it holds "
        f"{_listing(path)}. Nothing was written: choose an empty or new directory, or pass {flag} to replace "
        "the whole directory"
    )


def _temp_sibling(path: str) -> tuple[str, str]:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return parent, f".{os.path.basename(os.path.abspath(path))}.tmp-"


@contextlib.contextmanager
def staged_dir(
    path: str, kind: OutputKind, *, overwrite: bool = False, protect: Sequence[str] = (), flag: str = "overwrite=True"
) -> Iterator[str]:
    """Yield a fresh temporary sibling of ``path`` to write into; on success it replaces ``path`` by rename.

    The check of :func:`check_dir_target` runs first. The caller must write the ``kind`` marker into the staged
    directory (so a later run recognises it). On any exception the staged directory is removed and ``path`` is
    left untouched.
    """
    check_dir_target(path, kind, overwrite=overwrite, protect=protect, flag=flag)
    parent, prefix = _temp_sibling(path)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        if read_marker(tmp, kind) is None:
            raise RuntimeError(f"staged output {tmp} lacks its {kind.marker} marker")  # a bug in the writer
        check_dir_target(path, kind, overwrite=overwrite, protect=protect, flag=flag)  # still allowed?
        old = None
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.old-", dir=parent)
            os.rmdir(old)
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)
            raise
        if old is not None:
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_file_target(path: str, *, overwrite: bool = False, flag: str = "overwrite=True") -> None:
    """Raise :class:`OutputExistsError` when ``path`` exists (and ``overwrite`` is off) or is a directory."""
    if os.path.isdir(path):
        raise OutputExistsError(f"{path}: is a directory; give a file name")
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{path}: file exists; nothing was written (pass {flag} to replace it)")


@contextlib.contextmanager
def staged_file(path: str, *, overwrite: bool = False, flag: str = "overwrite=True") -> Iterator[str]:
    """Yield a temporary sibling file name of ``path``; on success it is moved to ``path``.

    Without ``overwrite`` the move is a hard link that fails if ``path`` appeared meanwhile, so an existing file
    is never replaced. On any exception the temporary file is removed.
    """
    check_file_target(path, overwrite=overwrite, flag=flag)
    parent, prefix = _temp_sibling(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=os.path.splitext(path)[1], dir=parent)
    os.close(fd)
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputExistsError(f"{path}: file appeared while writing; nothing was replaced") from None
            except OSError:  # file systems without hard links: check once more, then rename
                check_file_target(path, overwrite=False, flag=flag)
                os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
