"""The JSON records of artifacts: strict parsing (finite numbers within 64 bits), seals (a checksum over the
canonical fields) and the one reader every artifact's record goes through."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from geoswc.core.errors import ArtifactError

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
