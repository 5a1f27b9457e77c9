"""Smoke tests of the benchmarks whose figures the documentation shows: the cross-validation on 40 real photos, the
scale rehearsal, the cell selection and the gallery search at small sizes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from geoswc.core.config import CellConfig
from geoswc.core.sphere import haversine_km
from geoswc.data.records import read_coordinates
from geoswc.evaluation.evaluate import PREDICTION_COLUMNS
from geoswc.geo.cells import build_cells

from .conftest import DEV_IMAGES, MP16, ROOT, dev_rows, load_script, write_csv


def _load(name: str):
    return load_script("benchmarks", name)


def _load_cv():
    return _load("cross_validation")


@pytest.mark.shared_data
@pytest.mark.slow
def test_scale_rehearsal_measures_every_step(tmp_path, capsys):
    sr = _load("scale_rehearsal")
    out = tmp_path / "scale.json"
    assert (
        sr.main(
            [
                "--sizes",
                "3000,6000",
                "--out",
                str(out),
                "--steps",
                "2",
                "--queries",
                "5",
                "--dim",
                "64",
                "--coords",
                str(MP16),
                "--work",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert [s["n"] for s in result["sizes"]] == [3000, 6000]
    for size in result["sizes"]:
        assert set(size["steps"]) == set(sr.STEPS)
        for m in size["steps"].values():
            assert m["wall_s"] > 0 and m["anon_peak_mb"] > 50 and m["peak_rss_mb"] >= m["anon_peak_mb"]
        assert size["steps"]["index"]["gallery"] == size["n"] and size["steps"]["cells"]["cells"] > 100
    assert set(result["growth"]) == set(sr.STEPS)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("rehearsal-")]  # scratch removed


@pytest.mark.shared_data
def test_cell_selection_benchmark(tmp_path, capsys):
    cs = _load("cell_selection")
    out = tmp_path / "cs.json"
    assert (
        cs.main(["--out", str(out), "--cells", "2000", "--photos", "10", "--exact-photos", "3", "--coords", str(MP16)])
        == 0
    )
    result = json.loads(out.read_text())
    assert result["cells"] == 2000 and result["ms_per_photo_median"] > 0
    assert 0 < result["chosen_mass_over_exact_min"] <= 1 and 0 <= result["mass_outside_candidates_median"] < 1


@pytest.mark.shared_data
@pytest.mark.slow
def test_cell_thresholds_benchmark(tmp_path, capsys):
    """The paper recipe's threshold table: the cells a threshold keeps on the MP-16 sample and on its half."""
    out = tmp_path / "ct.json"
    assert _load("cell_thresholds").main(["--out", str(out), "--max", "128", "256", "--coords", str(MP16)]) == 0
    r = json.loads(out.read_text())
    assert [row["full"]["max_per_cell"] for row in r["rows"]] == [128, 256]
    assert r["rows"][0]["full"]["cells"] > r["rows"][1]["full"]["cells"] > 0
    assert all(0.5 < row["full"]["points_kept"] <= 1 and 0 < row["full"]["mean_over_max"] < 1 for row in r["rows"])
    assert r["max_for_30k_cells_on_mp16"] == pytest.approx(r["cells_per_photo_over_max"] * 4_720_000 / 30_000)
    assert "max_per_cell ~" in capsys.readouterr().out


@pytest.mark.shared_data
@pytest.mark.slow
def test_cross_validation_quick_run(tmp_path, capsys):
    cv = _load_cv()
    rows = dev_rows(40, step=53)
    csv_path = write_csv(tmp_path / "dev.csv", rows)
    out = tmp_path / "cv.json"
    changes = {
        "cells": {"cells": {"max_per_cell": 5000, "min_per_cell": 200}},
        "features": {"views": 1},
        "train": {"search": {"select_km": 2000}},
    }
    assert (
        cv.main(
            [
                "--out",
                str(out),
                "--data.csv",
                str(csv_path),
                "--data.images",
                str(DEV_IMAGES),
                "--cache",
                str(tmp_path / "cache"),
                "--quick",
                "true",
                "--changes",
                json.dumps(changes),
                "--also",
                "[{select_km: 0}]",
                "--predictions",
                str(tmp_path / "oof"),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["n"] == 40 and result["folds"] == 2 and result["views"] == 1 and result["cells"] > 10
    assert result["recipe"]["train"]["search"]["select_km"] == 2000 and result["search"]["select_km"] == 2000
    assert list(result["methods"]) == [
        "swc",
        "swc select_km=0",
        "classification",
        "retrieval",
        "raw 1-NN",
        "cell prior",
    ]
    for r in result["methods"].values():
        assert r["n"] == 40 and all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
        assert list(r["accuracy"].values()) == sorted(r["accuracy"].values())  # monotone in the threshold
    assert "| cell prior |" in (tmp_path / "cv.md").read_text() and "| swc |" in capsys.readouterr().out
    # the out-of-fold swc predictions, as `geoswc evaluate` writes them, in the photo list's order
    with open(tmp_path / "oof" / "predictions.csv", encoding="utf-8") as f:
        preds = list(csv.DictReader(f))
    assert list(preds[0]) == PREDICTION_COLUMNS and [p["image"] for p in preds] == [r["image"] for r in rows]
    err = np.array([float(p["error_km"]) for p in preds])
    assert abs(np.mean(err <= 2500) - result["methods"]["swc"]["accuracy"]["2500"]) < 1e-9
    cal = result["calibration"]  # the out-of-fold calibration report, in geoswc evaluate's blocks
    assert cal["n"] == 40 and set(cal["calibration"]) == {"ece", "brier"}
    assert set(cal["calibration"]["ece"]) == {"1", "25", "200", "750", "2500"}
    assert all(0 <= v <= 1 for b in cal["calibration"].values() for v in b.values())
    assert cal["selective"]["coverage"] == [0.1, 0.25, 0.5, 0.75, 1.0]
    swc_acc = result["methods"]["swc"]["accuracy"]
    for k in ("25", "750", "2500"):  # at full coverage, selective accuracy is the plain accuracy
        assert cal["selective"]["accuracy"][k][-1] == pytest.approx(swc_acc[k])
        assert cal["selective_density"]["accuracy"][k][-1] == pytest.approx(swc_acc[k])
    assert "| ece |" in (tmp_path / "cv.md").read_text()

    # The prior row is the constant guess: recompute its median error from the cells alone.
    la, lo, _ = read_coordinates(MP16)
    cells = build_cells(la, lo, CellConfig(5000, 200))
    c = cv.cell_prior(cells, 2000.0)
    lat = np.array([float(r["lat"]) for r in rows])
    lon = np.array([float(r["lon"]) for r in rows])
    err = haversine_km(lat, lon, cells.lat[c], cells.lon[c])
    assert abs(result["methods"]["cell prior"]["median_km"] - float(np.median(err))) < 1e-6
    assert cv.cell_prior(cells, 0.0) == int(np.argmax(cells.count))


@pytest.mark.shared_data
@pytest.mark.slow
def test_gallery_search_benchmark(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # it imports its sibling scale_rehearsal
    gs = _load("gallery_search")
    out = tmp_path / "gs.json"
    assert (
        gs.main(
            [
                "--out",
                str(out),
                "--sizes",
                "4000",
                "--codes",
                "flat,pq",
                "--pq-bytes",
                "16",
                "--dim",
                "64",
                "--distributions",
                "synthetic",
                "--queries",
                "20",
                "--coords",
                str(MP16),
                "--threads",
                "1",
                "--workdir",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["threads"] == 1 and result["query_threads"] >= 1  # the build's count as given; the queries' resolved
    runs = {r["codes"]: r for r in result["runs"]}
    assert set(runs) == {"flat", "pq"} and runs["pq"]["code_bytes"] == 16 and runs["flat"]["code_bytes"] == 128
    assert runs["flat"]["recall_at_10"] == 1.0 and runs["pq"]["recall_at_10"] >= 0.9
    for r in runs.values():
        assert r["entries"] == 4000 and r["cells"] > 1000 and r["per_query_ms"] > 0 and r["queries"] == 20
        assert r["warm_ms_per_query"] > 0 and r["warm_cpu_ms_per_query"] >= 0 and isinstance(r["cold"], bool)
    assert runs["pq"]["disk_bytes_per_entry"] > runs["flat"]["disk_bytes_per_entry"] + 16  # codes beside vectors
    assert "| 4,000 | synthetic | pq 16 B" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("geoswc-gallery-bench-")]  # scratch removed


def test_gpu_check_says_in_one_line_that_there_is_no_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # (as here) also where one is
    assert _load("gpu_check").main(["--out", str(tmp_path / "x.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA GPU" in out and not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_gpu_check_runs_its_whole_path_on_a_cpu(tmp_path, capsys):
    """The GPU check's code path on tiny inputs: shards, extraction and fine-tuning as one process and under
    torchrun (2 CPU processes), and a randomly initialised CLIP tower's extraction."""
    out = tmp_path / "gpu.json"
    argv = ["--out", str(out), "--device", "cpu", "--photos", "48", "--size", "80", "--backbone", "efficientnet-lite0"]
    argv += ["--image-size", "64", "--precision", "fp32", "--batch-size", "16", "--train-batch", "8", "--steps", "4"]
    argv += ["--epochs", "2", "--workers", "1", "--clip", "clip-vit-b32"]
    assert _load("gpu_check").main(argv) == 0
    r = json.loads(out.read_text())
    for key, procs in (("one_process", 1), ("torchrun", 2)):
        ex, tr = r[key]["extract"], r[key]["train"]
        assert ex["processes"] == tr["processes"] == procs and ex["images_per_s"] > 0, r[key]
        assert tr["steps"] == 4 and len(tr["losses"]) == 2 and np.isfinite(tr["losses"]).all(), tr
        assert tr["images_per_s"] > 0 and isinstance(tr["loss_fell"], bool) and tr["peak_gpu_gib"] is None
    assert r["clip_extract"]["backbone"] == "clip-vit-b32" and r["clip_extract"]["images_per_s"] > 0
    assert "torchrun: extraction" in capsys.readouterr().out


@pytest.mark.slow
def test_locate_profile_accounts_for_every_stage(tmp_path, capsys):
    """The locate benchmark's geoswc half on three photos: the end-to-end and backbone-only rates, and a
    per-stage profile of the same path whose backbone time is what the backbone alone takes."""
    from PIL import Image

    from geoswc.prediction.geolocator import Geolocator

    bench = _load("locate_throughput")
    photos = [ROOT / "examples" / "kauai.png"]
    for i in range(2):
        photos.append(tmp_path / f"p{i}.jpg")
        Image.new("RGB", (320 + 40 * i, 240), (30 * i, 120, 200)).save(photos[-1])
    geo = Geolocator.load()
    assert bench.geoswc_run(geo, photos, 2) > 0 and bench.backbone_only(geo, photos, 2) > 0
    prof = bench.profile_run(geo, photos, 2)
    stages = prof["stages"]
    assert {"decode", "backbone", "heads", "search", "calibrate", "place", "output", "wait"} <= set(stages)
    assert all(v["ms_per_photo"] > 0 and v["share_of_wall"] > 0 for v in stages.values()), stages
    assert stages["backbone"]["thread"] == "backbone" and stages["search"]["thread"] == "caller"
    # the stages of the caller's thread cannot take longer than the run itself
    caller = sum(v["share_of_wall"] for v in stages.values() if v["thread"] == "caller")
    assert caller <= 1.05, stages
    bench.print_profile(prof)
    assert "| backbone | backbone |" in capsys.readouterr().out
    big = bench.decode_cost(photos[0], 1200, 448, repeats=1)
    assert big["megapixels"] > 1 and big["full_ms"] > 0 and big["draft_ms"] > 0
