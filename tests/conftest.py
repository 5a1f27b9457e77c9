"""Shared fixtures. Real photos come from ../shared/data beside the project (on developer machines and in CI).

Tests that read ../shared/data request the ``tiny_workspace`` fixture or carry the ``shared_data`` marker.
Without that folder they are not run, and one line says so; under ``CI`` a missing folder is an error.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import socket
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEV_CSV = SHARED / "im2gps3k-dev" / "im2gps3k-dev.csv"
DEV_IMAGES = SHARED / "im2gps3k-dev" / "images"
MP16 = SHARED / "priors" / "mp16-coordinates-100k.csv"
KAUAI = ROOT / "examples" / "kauai.png"

DATA_FIXTURES = {"tiny_workspace"}
"""Fixtures built from ../shared/data: a test that uses one needs the data."""
_SKIPPED = pytest.StashKey[int]()


def _missing_data() -> list[Path]:
    return [p for p in (DEV_CSV, DEV_IMAGES, MP16) if not p.exists()]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = _missing_data()
    if not missing:
        return
    needs = [it for it in items if it.get_closest_marker("shared_data") or DATA_FIXTURES & set(it.fixturenames)]
    if not needs:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(
            f"CI is set but {missing[0]} is missing: {len(needs)} tests need ../shared/data "
            "beside the project (real photos and MP-16 coordinates)"
        )
    config.hook.pytest_deselected(items=needs)
    items[:] = [it for it in items if it not in needs]
    config.stash[_SKIPPED] = len(needs)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    n = config.stash.get(_SKIPPED, 0)
    if n:
        terminalreporter.write_line(
            f"skipped {n} tests that need {SHARED} (missing): the real photos and MP-16 coordinates they run on; "
            "put the shared/ folder beside the project to run them",
            yellow=True,
        )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a server or a torch.distributed rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dev_rows(n: int | None = None, step: int = 1) -> list[dict[str, str]]:
    with open(DEV_CSV, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return rows[::step][:n]


def write_csv(path: Path, rows: list[dict[str, str]], columns=("image", "lat", "lon", "author")) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([r.get(c, "") for c in columns])
    return path


def jpeg_bytes(size=(64, 48), color=(120, 160, 200), exif: bytes | None = None, mode="RGB") -> bytes:
    rng = np.random.default_rng(0)
    a = (rng.random((size[1], size[0], 3)) * 60 + np.array(color) * 0.7).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(a).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **({"exif": exif} if exif else {}))
    return buf.getvalue()


def gps_exif_raw(lat: tuple, lon: tuple, lat_ref: bytes = b"N", lon_ref: bytes = b"E") -> bytes:
    """A raw EXIF block whose GPS IFD holds exactly these (possibly absurd) rationals ``((num, den), ...)``."""
    import piexif

    return piexif.dump(
        {
            "GPS": {
                piexif.GPSIFD.GPSLatitudeRef: lat_ref,
                piexif.GPSIFD.GPSLatitude: lat,
                piexif.GPSIFD.GPSLongitudeRef: lon_ref,
                piexif.GPSIFD.GPSLongitude: lon,
            }
        }
    )


def gps_exif(lat: float, lon: float) -> bytes:
    """A raw EXIF block holding the position ``(lat, lon)`` in degrees, minutes and milliseconds."""

    def dms(v: float):
        v = abs(v)
        d = int(v)
        m = int((v - d) * 60)
        s = round(((v - d) * 60 - m) * 60 * 1000)
        return ((d, 1), (m, 1), (s, 1000))

    return gps_exif_raw(dms(lat), dms(lon), b"N" if lat >= 0 else b"S", b"E" if lon >= 0 else b"W")


def kauai_jpeg(**kw) -> bytes:
    """The example photo as a JPEG (quality 90); ``kw`` go to Pillow's save (``exif=``, ``progressive=``)."""
    buf = io.BytesIO()
    Image.open(KAUAI).convert("RGB").save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory) -> dict[str, Path]:
    """A small model trained with the CLI on 60 real dev photos: the four build commands, end to end."""
    from geoswc.cli import main

    w = tmp_path_factory.mktemp("tiny")
    rows = dev_rows(60, step=37)
    csv_path = write_csv(w / "train.csv", rows)
    assert (
        main(
            [
                "cells",
                "--coords",
                str(MP16),
                "--out",
                str(w / "cells.csv"),
                "--cells.max_per_cell",
                "5000",
                "--cells.min_per_cell",
                "200",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "features",
                "--data.csv",
                str(csv_path),
                "--data.images",
                str(DEV_IMAGES),
                "--out",
                str(w / "features"),
                "--views",
                "2",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--features",
                str(w / "features"),
                "--cells",
                str(w / "cells.csv"),
                "--out",
                str(w / "model"),
                "--train.epochs",
                "3",
                "--train.rrm_epochs",
                "3",
                "--train.batch_size",
                "16",
            ]
        )
        == 0
    )
    assert main(["index", "--model", str(w / "model"), "--features", str(w / "features")]) == 0
    return {"dir": w, "csv": csv_path, "model": w / "model", "features": w / "features", "cells": w / "cells.csv"}


def load_script(folder: str, name: str) -> ModuleType:
    """A script of the repository (``benchmarks/NAME.py``, ``scripts/NAME.py``) as a module, registered under its
    name (dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    mod = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
