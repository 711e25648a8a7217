"""Minimal, streaming safetensors reader (memory-mapped, no torch), with errors that name the file.

Why our own: numpy's safetensors backend cannot read bfloat16, and a truncated file must be reported as
"truncated" with its name rather than as an opaque deserialisation error.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsError(ValueError):
    pass


def _check_entry(path: str, key: str, e) -> None:
    """One header entry: a known dtype, a shape of non-negative ints, offsets spanning exactly its bytes."""
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
        raise SafetensorsError(f"{path}: corrupt safetensors header: entry {key!r} lacks dtype/shape/data_offsets")
    if e["dtype"] not in _DTYPES:
        raise SafetensorsError(f"{path}: tensor {key!r} has unsupported dtype {e['dtype']}")
    shape, off = e["shape"], e["data_offsets"]

    def ints(xs):
        return isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)

    if not ints(shape) or not ints(off) or len(off) != 2 or off[1] < off[0]:
        raise SafetensorsError(
            f"{path}: corrupt safetensors header: tensor {key!r} has shape {shape!r} and data_offsets {off!r}"
        )
    need = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[e["dtype"]]).itemsize
    if off[1] - off[0] != need:
        raise SafetensorsError(
            f"{path}: corrupt safetensors header: tensor {key!r} {e['dtype']} {shape} needs "
            f"{need} bytes but its data_offsets span {off[1] - off[0]}"
        )


class SafetensorsFile:
    """Lazy view of one .safetensors file: ``keys()``, ``shape(key)``, ``get(key)`` -> np.ndarray (a copy)."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        if size < 8:
            raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise SafetensorsError(
                    f"{path}: truncated or corrupt safetensors header (header length {n}, file {size} bytes)"
                )
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self._base = 8 + n
        self._size = size
        for k, e in header.items():
            _check_entry(path, k, e)
        self._entries = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._base + end > size:
            raise SafetensorsError(
                f"{path}: truncated safetensors file: tensors need {self._base + end} bytes, file has {size}"
            )
        self._mm = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> str:
        """The tensor's safetensors dtype name (``"F32"``, ``"BF16"``, ``"I8"``, ...)."""
        return self._entries[key]["dtype"]

    def get(self, key: str) -> np.ndarray:
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        e = self._entries[key]
        start, stop = e["data_offsets"]
        dt = np.dtype(_DTYPES[e["dtype"]])
        arr = np.frombuffer(self._mm, dtype=dt, count=(stop - start) // dt.itemsize, offset=self._base + start)
        return arr.reshape(e["shape"]).copy()

    def close(self):
        if self._mm is not None:
            self._mm.close()
            self._mm = None


def list_files(directory: str) -> list[str]:
    """The safetensors files of a HF checkpoint directory (sharded via index.json or single)."""
    idx = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(idx):
        try:
            with open(idx) as f:
                index = json.load(f)
        except (OSError, ValueError) as e:
            raise SafetensorsError(f"{idx}: not a readable JSON file ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise SafetensorsError(f'{idx}: has no "weight_map" object of tensor name -> shard file')
        files = sorted(set(weight_map.values()))
        missing = [fn for fn in files if not os.path.exists(os.path.join(directory, fn))]
        if missing:
            raise SafetensorsError(
                f"{directory}: shard(s) listed in model.safetensors.index.json are missing: {missing}"
            )
        return [os.path.join(directory, fn) for fn in files]
    files = sorted(fn for fn in os.listdir(directory) if fn.endswith(".safetensors"))
    if not files:
        raise SafetensorsError(
            f"{directory}: no *.safetensors files found (PyTorch .bin checkpoints are not supported)"
        )
    return [os.path.join(directory, fn) for fn in files]


def iter_tensors(files: list[str], errors: list[str]) -> Iterator[tuple[str, SafetensorsFile]]:
    """Yield (key, file) over all files; unreadable files are appended to ``errors`` and skipped."""
    for path in files:
        try:
            f = SafetensorsFile(path)
        except SafetensorsError as e:
            errors.append(str(e))
            continue
        for k in f.keys():
            yield k, f
