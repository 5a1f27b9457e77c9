"""Where photos come from: files or folders, a CSV in any published layout, a folder of GPS-EXIF photos, or
WebDataset shards (:class:`Photos`, the ``--data.*`` flags of the ``geoswc`` command)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from geoswc.core.config import check_field
from geoswc.data.layouts import parse_columns


def names_remote(location: str) -> bool:
    """Whether ``location`` is a URL or a ``pipe:`` command rather than a local path: geoswc opens neither."""
    return "://" in location or location.startswith("pipe:")


@dataclass(frozen=True)
class Photos:
    """Photos to read: files or folders, a CSV naming them (``image,lat,lon[,author]`` or a benchmark's published
    layout; positions are needed to train, index and evaluate) with the folder its names are relative to, a
    folder of photos whose GPS EXIF gives their positions, or WebDataset shards."""

    files: list[Path] = field(default_factory=list)
    """Photo files or folders (the positional arguments of ``geoswc locate``)."""
    csv: Path | None = None
    """CSV naming the photos (relative to ``images``, else to the CSV's folder): ``image,lat,lon[,author]``, or
    Im2GPS3k/MP-16's ``IMG_ID,AUTHOR,LAT,LON``, YFCC4k's ``name,OwnerNSID,lon,lat``, YFCC26k's
    ``name,AUTHOR,lat,lon``, OSV-5M's ``id,latitude,longitude`` (headers in any case)."""
    columns: str | None = None
    """The CSV's columns when its layout is none of those: ``image=COL,lat=COL,lon=COL,author=COL`` (any subset;
    the others are found by their usual names)."""
    images: Path | None = None
    """Folder the CSV's names are relative to; without a CSV, a folder of photos with GPS EXIF."""
    shards: str | None = None
    """WebDataset shards: a folder, a glob (``'shards/shard-*.tar'``) or braces (``shard-{000000..000009}.tar``)."""

    def __post_init__(self) -> None:
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
            check_field(self, "columns", False, str(e))
        check_field(
            self,
            "shards",
            not (self.shards and names_remote(self.shards)),
            "must be local files: geoswc never runs commands or downloads shards; copy them to a local folder first",
        )

    @property
    def given(self) -> bool:
        return bool(self.files or self.csv or self.images or self.shards)
