"""Atomic, checksummed files: a kill mid-write never leaves a half-written file that reads as good."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from geoswc.core.config import digest
from geoswc.core.errors import ArtifactError, InputError


def temp_prefix(name: str) -> str:
    """The start of the names of this process's temporary files or folders for ``name``; they carry the process
    id, so that :func:`remove_stale` can tell a killed run's leftovers from a running one's."""
    return f".{name}.{os.getpid()}."


def remove_stale(folder: Path, name: str) -> None:
    """Remove the temporary files and folders for ``name`` in ``folder`` that processes no longer running left."""
    for p in folder.glob(f".{glob.escape(name)}.*"):
        pid = p.name[len(name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, another user's
        return True
    return True


class Staging:
    """A staging folder inside ``folder`` (``.staging.<pid>.*``, after removing what killed runs left there), with
    ``names`` opened for writing: a writer appends to them, then builds its artifact from them atomically.

    Attributes:
        path: the folder.
        files: the open files, by name.
    """

    def __init__(self, folder: Path, *names: str) -> None:
        remove_stale(folder, "staging")
        self.path = Path(tempfile.mkdtemp(prefix=temp_prefix("staging"), dir=folder))
        self.files = {name: open(self.path / name, "wb") for name in names}  # noqa: SIM115 - closed by close()

    def close(self) -> None:
        """Close the files (the folder stays, e.g. for another process to read)."""
        for f in self.files.values():
            f.close()

    def remove(self) -> None:
        """Close the files and remove the folder."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temp file beside ``path``; on success fsync and rename it over ``path``. A ``path`` that is a
    symbolic link keeps the link: the file it points to is replaced. Temp files that killed runs left beside
    ``path`` are removed."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory; give a file name")
    ensure_dir(path.parent)
    remove_stale(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
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


ARTIFACT_RECORDS: dict[str, tuple[str, str]] = {
    "model": ("config.json", "geoswc-model/"),
    "gallery index": ("index.json", "geoswc-index/"),
    "feature cache": ("features.json", "geoswc-features/"),
    "shard set": ("shards.json", "wids-shard-index"),
    "evaluation": ("run.json", ""),
}
"""Each kind of artifact folder: its record file and the start of the format that record names."""


def artifact_kind(folder: str | Path) -> str | None:
    """The kind of geoswc artifact ``folder`` holds (None: none, or not one geoswc made)."""
    for kind, (name, fmt) in ARTIFACT_RECORDS.items():
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            meta = parse_json(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue
        if isinstance(meta, dict) and (
            str(meta.get("format") or meta.get("__kind__") or "").startswith(fmt)
            if fmt
            else "methods" in meta and "model" in meta
        ):
            return kind
    return None


def claim_folder(folder: str | Path, kind: str) -> Path:
    """Check ``folder`` before a command writes an artifact of ``kind`` into it: a folder (or a file in the way)
    holding another kind of geoswc artifact is refused, naming both, so that no command overwrites another's.

    Raises:
        InputError: ``folder`` is a file, or holds another kind of artifact.
    """
    folder = ensure_dir(folder, create=False)
    other = artifact_kind(folder)
    if other is not None and other != kind:
        raise InputError(f"{folder} holds a geoswc {other}; write the {kind} into another folder")
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


def write_report(path: str | Path, result: dict[str, Any], table: str) -> None:
    """A measurement's ``result`` as JSON at ``path`` and its Markdown ``table`` beside it (``.md``), each
    written atomically (the folder is created)."""
    path = Path(path)
    write_json(path, result)
    write_text(path.with_suffix(".md"), table + "\n")


JSON_INT_RANGE = (-(2**63), 2**63)
"""Whole numbers a geoswc JSON file may hold, ``[low, high)``: what fits in 64 bits, as every count, size and seed
geoswc writes does (each loader then checks the range of the numbers it uses)."""


class JSONNumberError(ValueError):
    """A JSON number geoswc never writes: ``NaN``, ``Infinity``, a float that overflows (``1e400``) or an integer
    beyond 64 bits (``10**400``)."""


class _Refused:
    """Stands for a refused number while a document is parsed (its place is then looked up, for the message)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` for files geoswc reads: every number finite and every whole number within 64 bits
    (:data:`JSON_INT_RANGE`).

    Raises:
        JSONNumberError: naming the first such number's key (``methods.swc.mean[0] is NaN``).
        ValueError: not JSON (``json.JSONDecodeError``).
        RecursionError: absurdly deep nesting.
    """
    refused: list[_Refused] = []

    def refuse(t: str) -> _Refused:
        refused.append(_Refused(t))
        return refused[-1]

    def finite(t: str) -> float | _Refused:
        v = float(t)
        return v if math.isfinite(v) else refuse(t)

    def whole(t: str) -> int | _Refused:
        if len(t.lstrip("-")) > 19:  # more digits than any 64-bit number (and no 4300-digit conversion)
            return refuse(t)
        v = int(t)
        return v if JSON_INT_RANGE[0] <= v < JSON_INT_RANGE[1] else refuse(t)

    data = json.loads(text, parse_constant=refuse, parse_float=finite, parse_int=whole)
    if refused:
        bad = refused[0]
        shown = bad.text if len(bad.text) <= 24 else f"{bad.text[:12]}…({len(bad.text)} characters)"
        raise JSONNumberError(f"{_key_of(data, bad) or 'the document'} is {shown}, not a finite number within 64 bits")
    return data


def _key_of(data: Any, target: _Refused) -> str:
    """Where ``target`` sits in a parsed document: ``a.b[2]`` ("" for the whole document)."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, v = stack.pop()
        if v is target:
            return where
        if isinstance(v, dict):
            stack += [(f"{where}.{k}" if where else str(k), x) for k, x in v.items()]
        elif isinstance(v, list):
            stack += [(f"{where}[{i}]", x) for i, x in enumerate(v)]
    return ""


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    """Read a JSON object (:func:`parse_json`: no NaN, infinity or out-of-range number), with an error that says
    which artifact is broken."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} not found: {path} is missing")
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except JSONNumberError as e:
        raise ArtifactError(
            f"{what} {path} is damaged or was changed: {e}; rebuild it or restore the original file"
        ) from e
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: absurd nesting
        raise ArtifactError(f"{what} {path} is unreadable or not JSON ({str(e)[:200]}); rebuild it") from e
    if not isinstance(data, dict):
        raise ArtifactError(f"{what} {path} is not a JSON object; rebuild it")
    return data


def require_keys(meta: dict[str, Any], keys: tuple[str, ...], what: str, path: str | Path) -> None:
    """Refuse metadata lacking a key (a damaged key name would otherwise switch its check off)."""
    missing = [k for k in keys if k not in meta]
    if missing:
        raise ArtifactError(
            f"{what} {path} is damaged or of another version: it lacks {', '.join(missing)}; "
            "rebuild it or restore the original file"
        )


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
            raise ArtifactError(
                f"{what} {path} is damaged or was changed (its fields do not match their "
                "checksum); rebuild it or restore the original file"
            )
        return
    unknown = sorted(set(meta) - set(known))
    if unknown:
        raise ArtifactError(
            f"{what} {path} is damaged or of another version: unknown field(s) {unknown}; "
            "rebuild it or restore the original file"
        )


def read_record(path: str | Path, what: str, fmt: str, keys: tuple[str, ...], fix: str) -> dict[str, Any]:
    """The JSON record of an artifact folder: a JSON object of format ``fmt`` holding every one of ``keys``, and
    no other field unless a seal covers them all (:func:`check_seal`).

    Args:
        what: the artifact's kind, for messages ("model", "feature cache", ...).
        fix: what to do about a record of another format ("rebuild it with `geoswc train`").

    Raises:
        ArtifactError: a missing, unreadable or damaged record, or one of another format.
    """
    path = Path(path)
    meta = read_json(path, what)
    if meta.get("format") != fmt:
        raise ArtifactError(f"{path.parent} is not a geoswc {what} (format {meta.get('format')!r}); {fix}")
    require_keys(meta, keys, what, path)
    check_seal(meta, ("format", *keys), what, path)
    return meta


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


SAFETENSORS_DTYPES: dict[str, type] = {
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I32": np.int32,
    "I64": np.int64,
    "U8": np.uint8,
    "U64": np.uint64,
}
"""safetensors dtype names of the NumPy types geoswc maps from disk."""


def safetensors_dtype(dtype: np.dtype) -> str:
    """The safetensors name of a NumPy dtype (one of :data:`SAFETENSORS_DTYPES`)."""
    return next(name for name, t in SAFETENSORS_DTYPES.items() if np.dtype(t) == dtype)


def safetensors_header(head: bytes, file_size: int) -> tuple[dict[str, Any], int]:
    """Parse the header at the start of a safetensors file: ``(tensor specs without __metadata__, offset of
    the data section)``.

    Raises:
        ValueError: a header that is not a JSON object of the right length.
    """
    n = int.from_bytes(head[:8], "little")
    if not 0 < n <= min(file_size - 8, 1 << 24) or len(head) < 8 + n:
        raise ValueError("bad safetensors header length")
    header = parse_json(head[8 : 8 + n].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n


def header_length(data: np.ndarray) -> int:
    """Length of the JSON header of a safetensors file's bytes (capped at 16 MiB: no header is larger)."""
    return min(int.from_bytes(bytes(data[:8]), "little"), 1 << 24)


def tensor_view(data: np.ndarray, spec: dict[str, Any], base: int) -> np.ndarray:
    """The array a header ``spec`` describes inside ``data`` (the file's bytes, e.g. memory-mapped).

    Raises:
        ValueError: a spec that is not a known dtype, whole non-negative offsets and sizes, or that disagrees with
            the file's size.
    """
    if not isinstance(spec, dict) or spec.get("dtype") not in SAFETENSORS_DTYPES:
        raise ValueError(f"a tensor spec of no supported dtype: {str(spec)[:100]}")
    dtype = np.dtype(SAFETENSORS_DTYPES[spec["dtype"]])
    offsets, shape = spec.get("data_offsets"), spec.get("shape")
    if not (_whole_list(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1] and _whole_list(shape)):
        raise ValueError(f"a tensor spec without whole, non-negative offsets and shape: {str(spec)[:100]}")
    start, stop = offsets
    if stop - start != math.prod(shape) * dtype.itemsize or base + stop > len(data):
        raise ValueError("tensor size and file size disagree")
    return data[base + start : base + stop].view(dtype).reshape(shape)


def _whole_list(v: Any) -> bool:
    """Whether ``v`` is a list of whole numbers ``>= 0`` (not bools)."""
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


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
        raise ArtifactError(
            f"{what} {path} is damaged or was changed (sha256 differs from the metadata beside it); "
            "rebuild it or restore the original file"
        )
    try:
        size = path.stat().st_size
        data = np.memmap(path, np.uint8, mode="c") if size else np.zeros(0, np.uint8)
        header, base = safetensors_header(bytes(data[: 8 + header_length(data)]), size)
        if not isinstance(header.get(name), dict) or header[name].get("dtype") not in SAFETENSORS_DTYPES:
            raise ValueError(f"no {name!r} tensor of a supported dtype")
        arr = tensor_view(data, header[name], base)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{what} {path} is not a valid safetensors file ({e}); rebuild it") from e
    return torch.from_numpy(arr.copy() if arr.size == 0 else arr)


def prefetch(path: str | Path, spans: Sequence[tuple[int, int]]) -> None:
    """Ask the kernel to start reading the byte spans ``[start, stop)`` of a file into the page cache, a request
    a span, and return at once (memory-mapped reads of a span then find their pages instead of faulting them in
    one read at a time). A hint only: nothing happens where the system has no ``posix_fadvise``, or for a file it
    cannot open or advise (the reads that follow report that)."""
    spans = [(a, b) for a, b in spans if b > a]
    if not spans or not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        for a, b in spans:
            os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_WILLNEED)
    except OSError:  # e.g. a file system that takes no advice
        pass
    finally:
        os.close(fd)


def read_span(path: str | Path, start: int, stop: int) -> bytes:
    """Bytes ``[start, stop)`` of a file, read (not memory-mapped: the pages stay out of this process's resident
    memory). Raises ArtifactError if the file is shorter."""
    out = bytearray()
    with open(path, "rb") as f:
        f.seek(start)
        while len(out) < stop - start:
            part = f.read(min(stop - start - len(out), 16 << 20))
            if not part:
                raise ArtifactError(
                    f"{path} is truncated (ends before byte {stop}); rebuild it or restore the original file"
                )
            out += part
    return bytes(out)


def sha256_span(path: str | Path, start: int, stop: int) -> str:
    """sha256 of bytes ``[start, stop)`` of a file, read 1 MiB at a time (a truncated file hashes what it has)."""
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    with open(path, "rb") as f:
        f.seek(start)
        left = stop - start
        while left > 0:
            got = f.readinto(memoryview(buf)[: min(left, len(buf))])
            if not got:
                break
            h.update(memoryview(buf)[:got])
            left -= got
    return h.hexdigest()


class BlockChecksums:
    """Checks blocks of a (memory-mapped) file against recorded sha256s, each block once, thread-safely, so
    a large file is verified where and when it is read.

    Args:
        path: the file, for messages.
        data: its bytes.
        block_bytes: checksum granularity.
        digests: the sha256 of each block, in order.
    """

    def __init__(self, path: Path, data: np.ndarray, block_bytes: int, digests: list[str]) -> None:
        if not (isinstance(block_bytes, int) and 0 < block_bytes <= 1 << 40) or not all(
            isinstance(d, str) for d in digests
        ):
            raise ArtifactError(
                f"the checksums recorded for {path} are damaged (block size {str(block_bytes)[:40]}); "
                "rebuild it or restore the original file"
            )
        if len(digests) != -(-len(data) // block_bytes):
            raise ArtifactError(
                f"the checksums recorded for {path} do not cover its {len(data)} bytes; "
                "rebuild it or restore the original file"
            )
        self.path, self.data, self.block_bytes, self.digests = path, data, block_bytes, digests
        self._done = np.zeros(len(digests), dtype=bool)
        self._lock = threading.Lock()

    def check(self, start: int, stop: int) -> None:
        """Verify the blocks overlapping bytes ``[start, stop)``."""
        if stop <= start:
            return
        todo = [b for b in range(start // self.block_bytes, (stop - 1) // self.block_bytes + 1) if not self._done[b]]
        if not todo:
            return
        with self._lock:
            for b in todo:
                if self._done[b]:
                    continue
                start = b * self.block_bytes
                if sha256_span(self.path, start, min(len(self.data), start + self.block_bytes)) != self.digests[b]:
                    raise ArtifactError(
                        f"{self.path} is damaged or was changed (block {b} of {len(self.digests)} "
                        "fails its checksum); rebuild it or restore the original file"
                    )
                self._done[b] = True

    def check_all(self) -> None:
        self.check(0, len(self.data))

    @property
    def verified(self) -> bool:
        """Whether every block has been verified."""
        return bool(self._done.all())


class HashingWriter:
    """Writes a file sequentially, keeping the sha256 of the whole and of every ``block_bytes`` block
    (what :class:`BlockChecksums` checks)."""

    def __init__(self, f: BinaryIO, block_bytes: int) -> None:
        self.f, self.block_bytes, self.size = f, block_bytes, 0
        self.whole, self._block = hashlib.sha256(), hashlib.sha256()
        self.blocks: list[str] = []

    def write(self, data: bytes | memoryview | np.ndarray) -> None:
        mv = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
        self.f.write(mv)
        self.whole.update(mv)
        while len(mv):
            room = self.block_bytes - self.size % self.block_bytes
            part, mv = mv[:room], mv[room:]
            self._block.update(part)
            self.size += len(part)
            if self.size % self.block_bytes == 0:
                self.blocks.append(self._block.hexdigest())
                self._block = hashlib.sha256()

    def block_digests(self) -> list[str]:
        """The blocks' sha256s, the last (partial) block included; call once, after the last write."""
        if self.size % self.block_bytes:
            self.blocks.append(self._block.hexdigest())
        return self.blocks


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


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """Digest of a state dict: names, shapes, dtypes and bytes of every tensor."""
    parts: list[bytes] = []
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        parts += [
            k.encode(),
            str(tuple(v.shape)).encode(),
            str(v.dtype).encode(),
            v.reshape(-1).view(torch.uint8).numpy().tobytes(),
        ]
    return digest(*parts)


# -- outputs for people: where they may go, and their cells (write side) --------------------------------------


def artifact_around(path: str | Path) -> tuple[Path, str] | None:
    """The nearest folder at or above ``path`` (symbolic links followed) that holds a geoswc artifact, with its
    kind (None: ``path`` lies in no artifact folder)."""
    real = Path(os.path.realpath(path))
    for folder in (real, *real.parents):
        kind = artifact_kind(folder) if folder.is_dir() else None
        if kind is not None:
            return folder, kind
    return None


def claim_output(path: str | Path) -> Path:
    """Check a file a command is about to write for its user (``locate --output``): a file inside a geoswc
    artifact folder, at any depth and through symbolic links, is refused, so that no output overwrites a model's,
    an index's or an evaluation's files or mixes with them; so is a folder.

    Raises:
        InputError: ``path`` is a folder or lies inside an artifact folder.
    """
    path = Path(path)
    real = Path(os.path.realpath(path))  # a symbolic link is written through: where it points is what counts
    if real.is_dir():
        raise InputError(f"cannot write {path}: it is a directory; give a file name")
    found = artifact_around(real.parent)
    if found is not None:
        raise InputError(f"cannot write {path}: {found[0]} holds a geoswc {found[1]}; write it outside that folder")
    ensure_dir(path.parent, create=False)
    return path


def claim_output_folder(folder: str | Path, kind: str, inside: str | Path | None = None) -> Path:
    """:func:`claim_folder` for an output folder of ``kind``, which must also lie outside every other artifact
    folder, at any depth (symbolic links followed), but ``inside`` (the one it may lie in: an index in the folder
    of the model it is built for).

    Raises:
        InputError: ``folder`` is a file, holds another kind of artifact, or lies inside an artifact folder.
    """
    folder = claim_folder(folder, kind)
    found = artifact_around(Path(os.path.realpath(folder)).parent)
    if found is not None and inside is not None and found[0] == Path(os.path.realpath(inside)):
        found = artifact_around(found[0].parent)
    if found is not None:
        raise InputError(
            f"cannot write the {kind} into {folder}: it lies inside {found[0]}, which holds a geoswc {found[1]}; "
            "write it outside that folder"
        )
    return folder


class FolderSwap:
    """A new version of the artifact folder ``target``, built in a staging folder beside it
    (``.NAME.<pid>.*.new``, after removing what killed runs left) and swapped in whole by :meth:`commit`: at every
    moment ``target`` holds the old version or the new one, complete. Entries of the old folder that are not the
    artifact's own files (``own``) or temporary files are kept (hard-linked into the new one before the swap).

    On Linux the swap is one atomic exchange of the two folders (``renameat2``); elsewhere the old folder is renamed
    aside (``.NAME.<pid>.old``) and the new one into place, and a process killed between the two renames leaves
    the old one for :func:`recover_folder` to put back.

    Attributes:
        target: the folder replaced (symbolic links resolved).
        path: the staging folder to build the new version in.
    """

    def __init__(self, target: str | Path, own: Sequence[str]) -> None:
        self.target = Path(os.path.realpath(target))
        recover_folder(self.target)
        remove_stale(self.target.parent, self.target.name)
        self.own = frozenset(own)
        self.path = Path(tempfile.mkdtemp(prefix=temp_prefix(self.target.name), suffix=".new", dir=self.target.parent))
        os.chmod(self.path, self.target.stat().st_mode & 0o7777)
        self.committed = False

    def commit(self) -> None:
        """Swap the staging folder in for ``target``, then remove the old version."""
        _keep_foreign(self.target, self.path, self.own)
        old = self.path
        if not exchange_paths(self.path, self.target):
            old = self.target.parent / f"{temp_prefix(self.target.name)}old"
            os.rename(self.target, old)
            try:
                os.rename(self.path, self.target)
            except BaseException:
                os.rename(old, self.target)
                raise
        self.committed = True
        _sync_folder(self.target.parent)
        shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        """Give the new version up (the old one stays); nothing happens after :meth:`commit`."""
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)


def swappable(folder: str | Path) -> bool:
    """Whether a :class:`FolderSwap` can replace ``folder``: a folder, not a mount point, in a folder this process
    may write (else a writer writes into it in place)."""
    real = Path(os.path.realpath(folder))
    return real.is_dir() and not os.path.ismount(real) and os.access(real.parent, os.W_OK | os.X_OK)


def recover_folder(target: str | Path) -> bool:
    """Put back an artifact folder that a process killed in the middle of a :class:`FolderSwap` left renamed aside
    (``.NAME.<pid>.old``, the process gone, ``target`` missing). Returns whether it did."""
    target = Path(os.path.realpath(target))
    if target.exists() or not target.parent.is_dir():
        return False
    for p in sorted(target.parent.glob(f".{glob.escape(target.name)}.*.old")):
        pid = p.name[len(target.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)) and p.is_dir():
            os.rename(p, target)
            return True
    return False


def exchange_paths(a: str | Path, b: str | Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``). Returns False, having changed
    nothing, where the system or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, TypeError, AttributeError):  # not Linux, or a C library without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0


def _keep_foreign(old: Path, new: Path, own: frozenset[str]) -> None:
    """Hard-link (or copy) into ``new`` the entries of ``old`` that are not the artifact's own or temporary."""
    for p in old.iterdir():
        if p.name in own or _temporary(p.name) or os.path.lexists(new / p.name):
            continue
        if p.is_symlink():
            os.symlink(os.readlink(p), new / p.name)
        elif p.is_dir():
            shutil.copytree(p, new / p.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(p, new / p.name)


def _temporary(name: str) -> bool:
    """Whether ``name`` is one of a process's temporary files or folders (:func:`temp_prefix`)."""
    parts = name.split(".")
    return name.startswith(".") and len(parts) > 3 and any(part.isdigit() for part in parts[2:-1])


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _sync_folder(folder: Path) -> None:
    """Make a folder's renames durable (where the system can sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
