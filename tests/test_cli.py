"""Smoke tests of every CLI command, on a tiny model built by the CLI itself (see conftest)."""

import json

import pytest

from geoswc.cli import build_parser, main

from .conftest import DEV_IMAGES, KAUAI, dev_rows, write_csv


def test_help_of_every_command(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    assert {"locate", "cells", "features", "train", "index", "evaluate", "backbones"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--max-per-cell" in out and "--eps-km" in out and "--exclude-same-author" in out


def test_backbones(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet-lite0" in out and "efficientnet-b7" in out


def test_a_bug_gives_one_line_and_status_3(monkeypatch, capsys):
    """An unexpected exception (a bug, not bad input) is named in one line, traceback only with -vv."""
    import geoswc.backbone

    class Broken(dict):
        def items(self):
            raise ZeroDivisionError("division by zero in a test")

    monkeypatch.setattr(geoswc.backbone, "REGISTRY", Broken())
    code = main(["backbones"])
    err = capsys.readouterr().err
    assert code == 3
    assert "internal error (ZeroDivisionError: division by zero in a test)" in err and "-vv" in err
    assert "Traceback" not in err
    assert main(["-vv", "backbones"]) == 3
    assert "Traceback" in capsys.readouterr().err


def test_build_commands_wrote_artifacts(tiny_workspace):
    m = tiny_workspace["model"]
    for f in ("config.json", "cells.csv", "heads.safetensors", "index/index.json", "index/index.safetensors"):
        assert (m / f).is_file(), f
    cfg = json.loads((m / "config.json").read_text())
    assert cfg["config"]["backbone"]["preprocess"]["image_size"] == 224
    assert cfg["config"]["cells_fingerprint"]
    idx = json.loads((m / "index" / "index.json").read_text())
    assert idx["model_fingerprint"] == cfg["fingerprint"]


def test_train_with_a_held_out_share(tiny_workspace, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["train", "--features", str(tiny_workspace["features"]), "--cells", str(tiny_workspace["cells"]),
                 "--out", str(out), "--epochs", "2", "--rrm-epochs", "1", "--batch-size", "16",
                 "--val-fraction", "0.3"]) == 0
    assert "MvMF head of epoch" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["config"]["train"]["val_fraction"] == 0.3
    assert main(["train", "--features", str(tiny_workspace["features"]), "--cells", str(tiny_workspace["cells"]),
                 "--out", str(tmp_path / "m2"), "--val-fraction", "1.5"]) == 2
    assert "--val-fraction must be in [0, 1)" in capsys.readouterr().err


def test_locate_text_and_json(tiny_workspace, capsys):
    photos = [str(DEV_IMAGES / r["image"]) for r in dev_rows(2)]
    assert main(["locate", *photos, "--model", str(tiny_workspace["model"])]) == 0
    out = capsys.readouterr().out
    assert "estimate" in out and "top cells" in out and "near" in out
    assert main(["locate", str(KAUAI), "--model", str(tiny_workspace["model"]), "--json", "--k", "3"]) == 0
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1
    p = json.loads(line[0])
    assert -90 <= p["lat"] <= 90 and -180 <= p["lon"] <= 180
    assert 0 <= p["confidence"] <= 1
    assert len(p["top_cells"]) == 5 and p["top_cells"][0]["probability"] >= p["top_cells"][1]["probability"]
    assert len(p["neighbors"]) <= 3
    assert p["place"]["country"]


def test_locate_reports_bad_photo_and_carries_on(tiny_workspace, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = DEV_IMAGES / dev_rows(1)[0]["image"]
    rc = main(["locate", str(bad), str(good), "--model", str(tiny_workspace["model"]), "--json", "--no-place"])
    assert rc == 1
    lines = [json.loads(s) for s in capsys.readouterr().out.strip().splitlines()]
    assert lines[0]["image"].endswith("broken.jpg") and "error" in lines[0]
    assert "lat" in lines[1]


def test_evaluate_writes_contract(tiny_workspace, tmp_path, capsys):
    rows = dev_rows(12, step=101)
    csv_path = write_csv(tmp_path / "bench.csv", rows + [{"image": "missing.jpg", "lat": "1", "lon": "2"}])
    out = tmp_path / "eval"
    rc = main(["evaluate", "--csv", str(csv_path), "--images", str(DEV_IMAGES), "--out", str(out),
               "--model", str(tiny_workspace["model"]), "--method", "swc,classification", "--method", "retrieval",
               "--exclude-same-author"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 12 and m["missing"] == 1 and m["method"] == "swc"
    assert set(m["accuracy"]) == {"1", "25", "200", "750", "2500"}
    assert all(0.0 <= v <= 1.0 for v in m["accuracy"].values())
    assert list(m["accuracy"].values()) == sorted(m["accuracy"].values())
    assert m["model"] == json.loads((tiny_workspace["model"] / "config.json").read_text())["fingerprint"]
    assert set(m["methods"]) == {"swc", "classification", "retrieval"}
    header = (out / "predictions.csv").read_text().splitlines()[0]
    assert header == "image,true_lat,true_lon,pred_lat,pred_lon,error_km,cell,confidence"
    assert len((out / "predictions.csv").read_text().splitlines()) == 13
    assert (out / "predictions_retrieval.csv").is_file()
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "swc" in capsys.readouterr().out


def test_index_refuses_features_of_another_backbone(tiny_workspace, tmp_path, capsys):
    feats = tmp_path / "feats"
    rows = dev_rows(4)
    csv_path = write_csv(tmp_path / "few.csv", rows)
    assert main(["features", "--csv", str(csv_path), "--images", str(DEV_IMAGES), "--out", str(feats),
                 "--image-size", "192"]) == 0
    capsys.readouterr()
    rc = main(["index", "--model", str(tiny_workspace["model"]), "--features", str(feats),
               "--out", str(tmp_path / "i")])
    assert rc == 2
    assert "come from backbone" in capsys.readouterr().err


def test_locate_refuses_index_of_another_model(tiny_workspace, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["train", "--features", str(tiny_workspace["features"]), "--cells", str(tiny_workspace["cells"]),
                 "--out", str(other), "--epochs", "1", "--seed", "7"]) == 0
    capsys.readouterr()
    rc = main(["locate", str(KAUAI), "--model", str(other), "--index", str(tiny_workspace["model"] / "index")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "was built with model" in err and "geoswc index" in err


def test_cells_command_reports_bad_rows(tmp_path, caplog):
    coords = tmp_path / "coords.csv"
    coords.write_text("LAT,LON\n48.85,2.35\n48.86,2.34\nnan,1\n95,3\n40.7,-74.0\nabc,2\n40.71,-74.01\n")
    assert main(["cells", "--coords", str(coords), "--out", str(tmp_path / "c.csv"), "--max-per-cell", "2",
                 "--min-per-cell", "1"]) == 0
    assert "3 skipped" in caplog.text and "lat 95.0 is outside" in caplog.text
    assert (tmp_path / "c.csv").read_text().startswith("token,level,lat,lon,count,spread_km")
