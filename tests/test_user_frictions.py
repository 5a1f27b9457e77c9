"""What a new user stumbled on, each fixed where it happens: a calibrator threshold that no photo met is named
(its probability is a constant); the cost of an extraction is said once it is known."""

from __future__ import annotations

import numpy as np

from geoswc.prediction.calibration import SIGNALS, Calibrator, MethodCalibration


def test_a_threshold_no_photo_met_is_named():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, len(SIGNALS)))
    err = rng.uniform(30, 3000, 60)  # none within 1 or 25 km, some within 200, 750 and 2500
    cal = Calibrator("m", {"swc": MethodCalibration.fit(x, err)})
    lines = cal.constant_thresholds()
    assert lines == ["swc: none of the 60 photos lay within 1 km", "swc: none of the 60 photos lay within 25 km"]
    err[:5] = 0.5  # now some photos lie within every threshold
    assert Calibrator("m", {"swc": MethodCalibration.fit(x, err)}).constant_thresholds() == []


def test_the_embedded_model_can_be_named_default(tmp_path, capsys):
    import csv

    from geoswc import Geolocator
    from geoswc.cli import main
    from geoswc.gallery.files import load_gallery

    from .conftest import jpeg_bytes

    assert Geolocator.load("default").fingerprint == Geolocator.load().fingerprint
    (tmp_path / "img").mkdir()
    rows = [("a.jpg", 45.43, 12.33), ("b.jpg", 48.86, 2.35), ("c.jpg", 40.71, -74.0)]
    for i, (name, _, _) in enumerate(rows):
        (tmp_path / "img" / name).write_bytes(jpeg_bytes((64 + 8 * i, 48), color=(40 * i, 120, 200)))
    with open(tmp_path / "g.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "lat", "lon"), *rows])
    args = [
        "index",
        "--model",
        "default",
        "--data.csv",
        str(tmp_path / "g.csv"),
        "--data.images",
        str(tmp_path / "img"),
    ]
    assert main(args) == 2 and "give --out DIR for an index of the embedded model" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "index")]) == 0
    assert len(load_gallery(tmp_path / "index")) == 3


def test_evaluate_without_a_method_is_refused_before_any_work(tmp_path):
    import pytest

    from geoswc import workflow
    from geoswc.core.errors import SettingError
    from geoswc.data.sources import Photos

    data = Photos(csv=tmp_path / "x.csv", images=tmp_path)
    with pytest.raises(SettingError, match="give at least one method: swc, classification, retrieval"):
        workflow.evaluate(data, out=tmp_path / "e", methods=())
    assert not (tmp_path / "e").exists()


def test_split_keeps_every_photographer_on_one_side(tmp_path, capsys):
    import csv
    import math

    from geoswc.cli import main

    rows = [(f"p{i}.jpg", 10.0 + i % 7, 20.0 - i % 5, f"u{i % 13}" if i % 4 else "") for i in range(120)]
    with open(tmp_path / "all.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "lat", "lon", "author"), *rows])
    assert main(["split", "--data.csv", str(tmp_path / "all.csv"), "--out", str(tmp_path / "s"), "--test", "0.25"]) == 0
    sides = {}
    for name in ("train", "test"):
        with open(tmp_path / "s" / f"{name}.csv", encoding="utf-8") as f:
            sides[name] = list(csv.DictReader(f))
    authors = {k: {r["author"] for r in v if r["author"]} for k, v in sides.items()}
    assert not authors["train"] & authors["test"]  # no photographer on both sides
    assert sorted(r["image"] for v in sides.values() for r in v) == sorted(r[0] for r in rows)  # every photo once
    people = {k: {r["author"] or r["image"] for r in v} for k, v in sides.items()}  # a photo alone: its own
    assert len(people["test"]) == math.ceil(0.25 * (len(people["train"]) + len(people["test"])))
    assert main(["split", "--data.csv", str(tmp_path / "all.csv"), "--out", str(tmp_path / "t"), "--test", "1.5"]) == 2
    assert "--test" in capsys.readouterr().err
