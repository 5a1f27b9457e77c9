"""Where photos come from: files or folders, a CSV in any published layout, a folder of GPS-EXIF photos, or
WebDataset shards (:class:`Photos`, the ``--data.*`` flags of the ``geoswc`` command)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from geoswc.core.config import check_field
from geoswc.core.errors import SettingError
from geoswc.data.images import IMAGE_EXTENSIONS
from geoswc.data.layouts import parse_columns

LIST_COMMENT = "#"
"""A line of a photo list starting with this (after spaces) is a comment."""

STDIN = "-"
"""The photo list name that reads standard input."""


def names_remote(location: str) -> bool:
    """Whether ``location`` is a URL or a ``pipe:`` command rather than a local path: geoswc opens neither."""
    return "://" in location or location.startswith("pipe:")


def is_folder(path: Path) -> bool:
    """Whether ``path`` is an existing folder (a name the file system refuses, e.g. too long, is not one)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def list_names(lines: Iterable[str], source: str) -> list[Path]:
    """The photo files named by the lines of a photo list, one a line, in order.

    Blank lines and comment lines (starting with ``#``) are skipped, and spaces around a name are removed; a
    relative name is relative to the current folder, as on the command line. A name that is an existing folder
    is refused: a list names photo files (folders go on the command line, where they are searched).

    Raises:
        ValueError: a line names a folder (the message names the line), or no line names a photo.
    """
    out: list[Path] = []
    for n, line in enumerate(lines, start=1):
        name = line.strip()
        if not name or name.startswith(LIST_COMMENT):
            continue
        path = Path(name)
        if is_folder(path):
            raise ValueError(
                f"{source} line {n} names a folder ({name}): a photo list names photo files, one a line; "
                "give folders as arguments (geoswc locate FOLDER), where they are searched"
            )
        out.append(path)
    if not out:
        raise ValueError(f"{source} names no photo (blank lines and lines starting with '#' are skipped)")
    return out


def read_photo_list(path: Path) -> list[Path]:
    """The photo files a list file names (``-``: standard input), read by :func:`list_names`.

    Raises:
        ValueError: the file cannot be read, is not UTF-8 text, or is refused by :func:`list_names`.
    """
    try:
        if str(path) == STDIN:
            return list_names(sys.stdin, "the photo list on standard input")
        with open(path, encoding="utf-8-sig") as f:
            return list_names(f, f"photo list {path}")
    except FileNotFoundError:
        raise ValueError(
            f"{path} not found: give photo files or folders, or a text file naming photos one a line"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a photo list (UTF-8 text naming photos one a line)") from None
    except OSError as e:
        raise ValueError(f"cannot read the photo list {path}: {e.strerror or e}") from None


def photo_files(files: list[Path] | Path | str) -> list[Path]:
    """The photo files or folders ``files`` stands for: a list as given; one path that is a folder or has a photo's
    ending (:data:`~geoswc.data.images.IMAGE_EXTENSIONS`) as itself; any other single path, a photo list (one name
    a line, read by :func:`read_photo_list`; ``-``: standard input).

    Raises:
        ValueError: an empty name (it would mean the current folder), or a photo list that is refused.
    """
    empty = "an empty photo name was given (it would mean every photo under the current folder)"
    if isinstance(files, (str, os.PathLike)):
        if not str(files).strip():
            raise ValueError(empty)
        one = Path(files)
        if str(files) != STDIN and (is_folder(one) or one.suffix.lower() in IMAGE_EXTENSIONS):
            return [one]
        return read_photo_list(one)
    if any(not str(f).strip() for f in files):
        raise ValueError(empty)
    return [Path(f) for f in files]


@dataclass(frozen=True)
class Photos:
    """Photos to read: files or folders, a CSV naming them (``image,lat,lon[,author]`` or a benchmark's published
    layout; positions are needed to train, index and evaluate) with the folder its names are relative to, a
    folder of photos whose GPS EXIF gives their positions, or WebDataset shards."""

    files: list[Path] | Path = field(default_factory=list)
    """Photo files or folders (the positional arguments of ``geoswc locate``), or a text file naming photo files
    one a line (``-``: standard input): blank lines and lines starting with ``#`` are skipped, relative names are
    relative to the current folder, and a line naming a folder is refused. Always a list once made."""
    csv: Path | None = None
    """CSV naming the photos (relative to ``images``, else to the CSV's folder): ``image,lat,lon[,author]``, or
    Im2GPS3k/MP-16's ``IMG_ID,AUTHOR,LAT,LON``, YFCC4k's ``name,OwnerNSID,lon,lat``, YFCC26k's
    ``name,AUTHOR,lat,lon``, OSV-5M's ``id,latitude,longitude`` (headers in any case)."""
    columns: str | None = None
    """The CSV's columns when its layout is none of those: ``image=COL,lat=COL,lon=COL,author=COL`` (any subset;
    the others are found by their usual names; one column for one role)."""
    images: Path | None = None
    """Folder the CSV's names are relative to; without a CSV, a folder of photos with GPS EXIF."""
    shards: str | None = None
    """WebDataset shards: a folder, a glob (``'shards/shard-*.tar'``) or braces (``shard-{000000..000009}.tar``)."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "files", photo_files(self.files))  # frozen: the list it stands for, once
        except ValueError as e:
            raise SettingError(str(e), type(self), "files") from None
        given = [name for name, v in (("files", self.files), ("csv", self.csv), ("shards", self.shards)) if v]
        check_field(self, "shards", len(given) <= 1, f"goes alone: give one of files, csv or shards, not {given}")
        check_field(
            self,
            "images",
            not (self.images and (self.files or self.shards)),
            "goes with a CSV, or alone (a folder of GPS-EXIF photos)",
        )
        check_field(self, "columns", not (self.columns and not self.csv), "goes with a CSV (--data.csv)")
        try:
            parse_columns(self.columns)
        except ValueError as e:
            raise SettingError(str(e), type(self), "columns") from None
        check_field(
            self,
            "shards",
            not (self.shards and names_remote(self.shards)),
            "must be local files: geoswc never runs commands or downloads shards; copy them to a local folder first",
        )

    @property
    def given(self) -> bool:
        return bool(self.files or self.csv or self.images or self.shards)
