"""The column layouts of photo lists: which column of a CSV holds the image, the latitude, the longitude and the
author, in the layouts benchmarks are published in, or as ``--data.columns`` maps them.

Known layouts (headers matched case-insensitively):

- geoswc: ``image,lat,lon[,author]``;
- Im2GPS3k and MP-16 as published with GeoEstimation: ``IMG_ID,AUTHOR,LAT,LON,...`` (``IMG_ID`` may be a
  relative path);
- YFCC4k: ``...,name,...,OwnerNSID,...,lon,lat,...`` (``OwnerNSID`` is the author);
- YFCC26k: ``name,AUTHOR,lat,lon,...``;
- OSV-5M: ``id,latitude,longitude,...``: the image is ``<id>.jpg``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

from geoswc.core.errors import InputError

ROLES = ("image", "lat", "lon", "author")
"""What a photo list's columns hold."""

ALIASES: dict[str, tuple[str, ...]] = {
    "image": ("image", "img_id", "name", "id"),
    "lat": ("lat", "latitude"),
    "lon": ("lon", "long", "lng", "longitude"),
    "author": ("author", "ownernsid"),
}
"""Header names (lower case) each role is found under, the first present one winning."""

BARE_ID_COLUMN = "id"
"""An image column of this name holds bare ids (OSV-5M): the image file is ``<id>.jpg``."""

SHOWN_HEADER_CHARS = 300


def parse_columns(text: str | None) -> dict[str, str]:
    """``image=COL,lat=COL,lon=COL,author=COL`` (any subset) as ``{role: column}``, column names lower-cased.

    Raises:
        ValueError: not that form, an unknown role, a role given twice, an empty column name, or one column
            given for two roles; the one-line message names the part at fault.
    """
    if text is None or not text.strip():
        return {}
    example = "e.g. image=IMG_ID,lat=LAT,lon=LON,author=AUTHOR"
    out: dict[str, str] = {}
    for part in text.split(","):
        role, eq, column = part.partition("=")
        role, column = role.strip().lower(), column.strip().lower()
        if not eq:
            raise ValueError(f"{part.strip()!r} is not ROLE=COLUMN with ROLE one of {', '.join(ROLES)} ({example})")
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} in {part.strip()!r}: the roles are {', '.join(ROLES)} ({example})")
        if not column:
            raise ValueError(f"{part.strip()!r} names no column for {role}: give {role}=COLUMN ({example})")
        if role in out:
            raise ValueError(f"{role} is mapped twice (to {out[role]!r} and {column!r}): map each role once")
        other = next((r for r, c in out.items() if c == column), None)
        if other is not None:
            raise ValueError(
                f"column {column!r} is mapped to two roles, {other} and {role}: a column holds one role; "
                f"map each to its own column ({example})"
            )
        out[role] = column
    return out


@dataclass(frozen=True)
class Layout:
    """Where each role's column is in a header (``-1``: absent), and whether images are bare ids."""

    index: dict[str, int]
    bare_ids: bool = False

    def has(self, role: str) -> bool:
        return self.index.get(role, -1) >= 0

    def get(self, row: list[str], role: str) -> str | None:
        """The cell of ``role`` in ``row`` (None when the header lacks it or the row is short)."""
        i = self.index.get(role, -1)
        return row[i] if 0 <= i < len(row) else None

    def image(self, row: list[str]) -> str:
        """The image name of a row ("" when empty): a bare id becomes ``<id>.jpg``."""
        name = (self.get(row, "image") or "").strip()
        return f"{name}.jpg" if name and self.bare_ids and not PurePath(name).suffix else name


def shown_header(header: list[str]) -> str:
    """A header as a one-line CSV, cut to :data:`SHOWN_HEADER_CHARS`."""
    text = ",".join(header)
    return text if len(text) <= SHOWN_HEADER_CHARS else text[:SHOWN_HEADER_CHARS] + "…"


def resolve_layout(
    header: list[str],
    source: str,
    need: tuple[str, ...],
    columns: dict[str, str] | None = None,
    flag: str = "--data.columns",
) -> Layout:
    """The layout of a CSV whose ``header`` (as written) is given: ``columns`` first, then the aliases (a column
    ``columns`` maps to a role is never another role's).

    Args:
        header: the header row.
        source: the file, for messages.
        need: the roles the reader cannot do without.
        columns: ``{role: column}`` from ``--data.columns`` (lower case).
        flag: the flag that maps columns, for messages.

    Raises:
        InputError: a mapped column the header lacks, or a needed role found under no known name; the one
            line shows the header and how to map it.
    """
    lower = [h.strip().lower() for h in header]
    first = {name: i for i, name in reversed(list(enumerate(lower)))}
    columns = columns or {}
    index: dict[str, int] = {}
    for role, column in columns.items():
        if column not in first:
            raise InputError(
                f"CSV {source} has no column {column!r} ({flag} maps {role} to it); its header is: "
                f"{shown_header(header)}"
            )
        index[role] = first[column]
    taken = set(index.values())  # a mapped column holds its role only: another role's names skip it
    for role in ROLES:
        if role not in index:
            index[role] = next((first[a] for a in ALIASES[role] if a in first and first[a] not in taken), -1)
    lacking = [r for r in need if index[r] < 0]
    if lacking:
        raise InputError(
            f"CSV {source} lacks column(s) {', '.join(lacking)}: its header is {shown_header(header)}. Known layouts: "
            "image,lat,lon[,author]; IMG_ID,AUTHOR,LAT,LON (GeoEstimation); name,OwnerNSID,lon,lat (YFCC4k); "
            f"name,AUTHOR,lat,lon (YFCC26k); id,latitude,longitude (OSV-5M). Map yours with {flag} "
            + ",".join(f"{r}=COLUMN" for r in ROLES[:3])
            + "[,author=COLUMN]"
        )
    image = index["image"]
    return Layout(index, bare_ids=image >= 0 and lower[image] == BARE_ID_COLUMN)
