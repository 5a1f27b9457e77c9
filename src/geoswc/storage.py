"""Atomic, checksummed files: a kill mid-write never leaves a half-written file that reads as good."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import ArtifactError, InputError


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temp file beside ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory; give a file name")
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def ensure_dir(folder: str | Path, create: bool = True) -> Path:
    """Create ``folder`` (and its parents) for output; a path that is a file is an InputError, not a traceback.

    With ``create=False``, only check (commands call it before long work, so a bad ``--out`` fails at once).
    """
    folder = Path(folder)
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                raise InputError(f"cannot write into {folder}: {p} is a file, not a folder; choose another output path")
            break
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    """Read a JSON object, with an error that says which artifact is broken."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} not found: {path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{what} {path} is unreadable or not JSON ({e}); rebuild it") from e
    if not isinstance(data, dict):
        raise ArtifactError(f"{what} {path} is not a JSON object; rebuild it")
    return data


def require_keys(meta: dict[str, Any], keys: tuple[str, ...], what: str, path: str | Path) -> None:
    """Refuse metadata lacking a key (a damaged key name would otherwise switch its check off)."""
    missing = [k for k in keys if k not in meta]
    if missing:
        raise ArtifactError(f"{what} {path} is damaged or of another version: it lacks {', '.join(missing)}; "
                            "rebuild it or restore the original file")


SEAL_KEY = "meta_sha256"


def seal(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` plus the sha256 of its canonical JSON, so that a change to any field of the file is detected."""
    body = json.loads(json.dumps(meta, allow_nan=False))
    return {**body, SEAL_KEY: sha256_bytes(_canonical(body))}


def check_seal(meta: dict[str, Any], known: tuple[str, ...], what: str, path: str | Path) -> None:
    """Verify a :func:`seal`. Files written before seals existed have none: then every key must be a known
    one (a damaged key name, the seal's included, shows up as an unknown key)."""
    if SEAL_KEY in meta:
        body = {k: v for k, v in meta.items() if k != SEAL_KEY}
        if sha256_bytes(_canonical(body)) != meta[SEAL_KEY]:
            raise ArtifactError(f"{what} {path} is damaged or was changed (its fields do not match their "
                                "checksum); rebuild it or restore the original file")
        return
    unknown = sorted(set(meta) - set(known))
    if unknown:
        raise ArtifactError(f"{what} {path} is damaged or of another version: unknown field(s) {unknown}; "
                            "rebuild it or restore the original file")


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor | np.ndarray]) -> str:
    """Write tensors as safetensors, atomically. Returns the file's sha256."""
    tt = {
        k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.contiguous())
        for k, v in tensors.items()
    }
    data = save(tt)
    write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


_NP_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
              "U8": np.uint8, "BF16": None}


def map_tensor(path: str | Path, name: str, what: str, sha256: str | None = None) -> torch.Tensor:
    """One tensor of a safetensors file, memory-mapped (pages are read when used), after checking the file's
    sha256 when one is recorded. Copy-on-write: writing to it never changes the file.

    Raises:
        ArtifactError: missing or damaged file, or no such tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} not found: {path} is missing")
    if sha256 and sha256_file(path) != sha256:
        raise ArtifactError(f"{what} {path} is damaged or was changed (sha256 differs from the metadata beside it); "
                            "rebuild it or restore the original file")
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n < 1 << 24 else None
        info = header[name] if isinstance(header, dict) else None
        dtype = _NP_DTYPES.get(info["dtype"]) if isinstance(info, dict) else None
        if dtype is None:
            raise ValueError(f"no {name!r} tensor of a supported dtype")
        start, stop = (int(v) for v in info["data_offsets"])
        shape = tuple(int(v) for v in info["shape"])
        if stop - start != int(np.prod(shape)) * np.dtype(dtype).itemsize or 8 + n + stop > path.stat().st_size:
            raise ValueError("tensor size and file size disagree")
        if not shape or 0 in shape:
            return torch.zeros(shape, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype)
        arr = np.memmap(path, dtype=dtype, mode="c", offset=8 + n + start, shape=shape)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{what} {path} is not a valid safetensors file ({e}); rebuild it") from e
    return torch.from_numpy(arr)


def load_tensors(path: str | Path, what: str, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file (no code runs), checking its sha256 when one is recorded."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} not found: {path} is missing")
    if sha256:
        actual = sha256_file(path)
        if actual != sha256:
            raise ArtifactError(
                f"{what} {path} is damaged or was changed: its sha256 is {actual[:12]}…, the metadata "
                f"beside it records {sha256[:12]}…; rebuild it or restore the original file"
            )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{what} {path} is not a valid safetensors file ({e}); rebuild it") from e
