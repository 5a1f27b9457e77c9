"""The photo lists of artifacts (``items.csv`` of feature caches and gallery indexes), read in place.

A list of millions of photos is kept as its file's bytes (memory-mapped) and one offset a row, and each row is
parsed when it is asked for: 8 bytes a photo in memory, not two Python strings.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator, Sequence
from typing import overload

import numpy as np
from numpy.typing import NDArray

SCAN_BYTES = 16 << 20
"""Bytes scanned at a time when rows are found."""


class ItemColumn(Sequence[str]):
    """One column (0: image id, 1: author, ...) of CSV rows held as bytes: row ``i`` is
    ``data[offsets[i]:offsets[i + 1]]``, ``offsets (N + 1,)``."""

    def __init__(self, data: NDArray[np.uint8], offsets: NDArray[np.int64], column: int) -> None:
        self._data, self._offsets, self._column = data, offsets, column

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i) + (len(self) if int(i) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(i)
        fields = row_fields(bytes(self._data[self._offsets[i] : self._offsets[i + 1]]))
        return fields[self._column] if self._column < len(fields) else ""

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        """Equal to any sequence of the same strings (a list, like the one it stands for)."""
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, like a list


_NEEDS_QUOTES = re.compile('[,"\n\r]').search


def item_line(texts: Sequence[str], numbers: Sequence[float] = ()) -> bytes:
    """One CSV row: the text fields (quoted where a field holds ``,``, ``"``, a newline or a carriage return,
    which Python's CSV writer leaves bare), then the numbers as Python writes them (exactly read back)."""
    quoted = ['"' + t.replace('"', '""') + '"' if _NEEDS_QUOTES(t) else t for t in texts]
    return (",".join([*quoted, *(repr(float(x)) for x in numbers)]) + "\n").encode("utf-8")


def row_fields(line: bytes) -> list[str]:
    """The fields of one CSV row (quoted only where a field needs it: the common case stays fast)."""
    text = line.decode("utf-8")
    return next(csv.reader(io.StringIO(text, newline=""))) if '"' in text else text.rstrip("\r\n").split(",")


def row_offsets(data: NDArray[np.uint8], start: int = 0) -> NDArray[np.int64]:
    """Where each CSV row of ``data[start:]`` begins, and the end: ``(N + 1,)`` byte offsets into ``data``.

    A newline inside a quoted field does not end a row (an even number of quotes before it does). The bytes are
    scanned ``SCAN_BYTES`` at a time, so the scan holds about 8 bytes a row beyond the data's own pages.
    """
    ends: list[NDArray[np.int64]] = []
    odd = 0  # quotes seen so far, modulo 2
    for a in range(start, len(data), SCAN_BYTES):
        block = np.asarray(data[a : a + SCAN_BYTES])
        newlines = np.flatnonzero(block == 10)
        quotes = block == 34
        if odd or quotes.any():
            parity = (np.cumsum(quotes, dtype=np.uint8)[newlines] + odd) & 1  # uint8 wraps mod 256: parity holds
            newlines = newlines[parity == 0]
            odd = (odd + int(quotes.sum())) & 1
        ends.append(a + 1 + newlines.astype(np.int64))
    last = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    if len(data) > start and (not len(last) or last[-1] != len(data)):
        last = np.append(last, len(data))  # a last row without its newline
    return np.concatenate([[start], last]).astype(np.int64)


def float_columns(
    data: NDArray[np.uint8], offsets: NDArray[np.int64], count: int, rows_at_a_time: int = 65_536
) -> NDArray[np.float64]:
    """The last ``count`` fields of each row parsed as numbers ``(N, count)`` (unquoted numbers at the end of
    each row, as the library writes them)."""
    out = np.empty((len(offsets) - 1, count), np.float64)
    for s in range(0, len(out), rows_at_a_time):
        e = min(len(out), s + rows_at_a_time)
        block, pos = bytes(data[offsets[s] : offsets[e]]), (offsets[s : e + 1] - offsets[s]).tolist()
        out[s:e] = [[float(x) for x in block[pos[j] : pos[j + 1]].rsplit(b",", count)[1:]] for j in range(e - s)]
    return out
