"""safetensors files and checksums: written atomically, read whole or memory-mapped, and verified by sha256,
whole or a block at a time."""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from geoswc.core import atomic_files
from geoswc.core.config import digest
from geoswc.core.errors import ArtifactError
from geoswc.core.json_records import parse_json


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
    atomic_files.write_bytes(path, data)
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
