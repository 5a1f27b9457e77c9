"""Options of the commands that are not saved with artifacts: where photos come from, which backbone to
extract with, and how a command runs. Each is a frozen dataclass whose fields become ``--group.field``
flags of the ``geoswc`` command (their docstrings are the flags' help)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .config import BackboneConfig, check_field, check_ints
from .layouts import parse_columns

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Runtime = Literal["torch", "onnx"]
MAX_WORKERS = 1024
"""More ``workers`` than this is refused; more than the machine's cores is capped (see :func:`geoswc.data.loader`)."""


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
        check_field(self, "images", not (self.images and (self.files or self.shards)),
                    "goes with a CSV, or alone (a folder of GPS-EXIF photos)")
        check_field(self, "columns", not (self.columns and not self.csv), "goes with a CSV (--data.csv)")
        try:
            parse_columns(self.columns)
        except ValueError as e:
            check_field(self, "columns", False, str(e))
        check_field(self, "shards", not (self.shards and names_remote(self.shards)),
                    "must be local files: geoswc never runs commands or downloads shards; copy them to a local "
                    "folder first")

    @property
    def given(self) -> bool:
        return bool(self.files or self.csv or self.images or self.shards)


@dataclass(frozen=True)
class RunConfig:
    """How a command runs: batch size, decoding processes, device and mixed precision."""

    batch_size: int = 16
    """Photos per inference or extraction batch (training batches are ``train.batch_size``)."""
    workers: int = 0
    """Decoding processes (0: decode in the main process)."""
    device: str = "auto"
    """``auto`` (``cuda:LOCAL_RANK`` when a GPU is present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    precision: Precision = "auto"
    """Backbone autocast on GPUs (``auto``: bf16 where supported, else fp16); CPUs always run fp32."""
    runtime: Runtime = "torch"
    """Backbone runtime for locating: ``torch`` (eager) or ``onnx`` (exported once, several times faster on a
    CPU; needs ``pip install 'geoswc[fast]'``)."""

    def __post_init__(self) -> None:
        check_ints(self)
        check_field(self, "batch_size", 1 <= self.batch_size <= 65536, "must be in 1..65536")
        check_field(self, "workers", 0 <= self.workers <= MAX_WORKERS, f"must be in 0..{MAX_WORKERS}")
        check_field(self, "device", self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "must be auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class BackboneChoice:
    """Which registry backbone extracts features, at which input size (see ``geoswc backbones``)."""

    name: str = "efficientnet-lite0"
    """A registry name (``geoswc backbones`` lists them)."""
    weights: str = "default"
    """``default`` (the registry's pretrained weights: from a wheel, downloaded, or the Hugging Face cache),
    ``none`` (random), a local state-dict file (EfficientNets) or a folder holding a saved Hugging Face model
    (CLIP, DINOv2, SigLIP: offline use)."""
    image_size: int | None = None
    """Input side in pixels (default: the backbone's own)."""
    resize: Literal["center_crop", "squash"] | None = None
    """``center_crop`` (shorter side to the size, then the central square) or ``squash`` (whole image);
    default: the policy the backbone was trained with (``squash`` for SigLIP, else ``center_crop``)."""

    def resolve(self) -> BackboneConfig:
        """The backbone config (registry preprocessing, this size and weights); the digest and width are
        filled in when the backbone is created."""
        from dataclasses import replace

        from .backbone import default_config

        return replace(default_config(self.name, self.image_size, self.resize), weights=self.weights)
