"""The ``geoswc`` command: generated help, config files and recipes, the exit-code contract, and every command
on a tiny model built by the CLI itself (see conftest)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

import geoswc
from geoswc.cli import main
from geoswc.gallery.files import load_gallery
from geoswc.models.geomodel import GeoModel
from geoswc.recipes import Recipe
from geoswc.workflow import COMMANDS

from .conftest import DEV_IMAGES, KAUAI, ROOT, dev_rows, write_csv

RECIPE = ROOT / "recipes" / "default.yaml"


@pytest.mark.slow
def test_help_lists_every_command_and_each_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    assert all(name in top for name in COMMANDS)
    helps = {}
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        helps[name] = " ".join(capsys.readouterr().out.split())  # help text is wrapped
    # flags come from the functions' parameters and the config dataclasses' fields, with their docstrings as help
    assert "--cells.max_per_cell" in helps["cells"] and "split into its four children" in helps["cells"]
    assert "--search.eps_km" in helps["train"] and "DBSCAN radius" in helps["train"]
    assert "--train.val_fraction" in helps["train"] and "--exclude_same_author" in helps["evaluate"]
    assert "--run.workers" in helps["locate"] and "PHOTO" in helps["locate"]
    assert all(
        "--run.threads" in helps[c] and "share of the usable cores" in helps[c] for c in ("locate", "index", "train")
    )


def test_print_config_is_complete_and_reads_back(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--train.epochs", "3", "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert {"features", "cells", "out", "train", "heads", "search", "data", "run", "provenance"} <= set(cfg)
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["lr"] == 0.001 and cfg["search"]["k"] == 10
    cfg |= {"features": "f", "cells": "c.csv", "out": "o"}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit):  # a config file, then a flag over it
        main(["train", "-c", str(tmp_path / "train.yaml"), "--train.lr", "0.5", "--print_config"])
    again = yaml.safe_load(capsys.readouterr().out)
    assert again["train"] == {**cfg["train"], "lr": 0.5} and again["out"] == "o"


def test_a_recipe_gives_each_command_its_section(capsys):
    recipe = Recipe.load(RECIPE)
    with pytest.raises(SystemExit):
        main(["train", "-c", str(RECIPE), "--train.epochs", "1", "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["search"]["select_km"] == recipe.content["train"]["search"]["select_km"] == 2000.0
    assert cfg["train"]["epochs"] == 1 and cfg["train"]["rrm_epochs"] == 30  # the flag wins over the recipe
    with pytest.raises(SystemExit):
        main(["cells", "-c", str(RECIPE), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["cells"]["max_per_cell"] == 2000
    args = recipe.arguments("features", data={"csv": "x.csv", "images": "imgs"}, out="feats")
    assert args["views"] == 5 and args["backbone"].name == "efficientnet-lite0" and str(args["data"].csv) == "x.csv"


def test_a_recipe_never_names_code_to_run(tmp_path):
    """Config files are data: a value shaped like a class to build is kept as data, never imported or run."""
    marker = tmp_path / "ran"
    evil = {"class_path": "os.system", "init_args": {"command": f"touch {marker}"}}
    args = Recipe.load(RECIPE).arguments("train", features="f", cells="c", out="o", provenance={"x": evil})
    assert args["provenance"] == {"x": evil} and not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--features", "f", "--cells", "c", "--out", "o", "--train.epochs", "-1"], "--train.epochs"),
        (["train", "--features", "f", "--cells", "c", "--out", "o", "--train.lr", "inf"], "--train.lr"),
        (["locate", str(KAUAI), "--search.k", "0"], "--search.k"),
        (["locate", str(KAUAI), "--search.eps_km", ".nan"], "--search.eps_km"),
        (["locate", str(KAUAI), "--search.eps_km", "nan"], "--search"),
        (["locate", str(KAUAI), "--search.no_such_setting", "1"], "no_such_setting"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--service.max_upload_mb", "-1"], "--service.max_upload_mb"),
        (["locate", str(KAUAI), "--run.batch_size", "abc"], "run.batch_size"),
        (["locate", str(KAUAI), "--no_such_flag", "1"], "--no_such_flag"),
        (["features", "--out", "o", "--views", "0"], "--views"),
        (
            ["cells", "--coords", "c.csv", "--out", "o.csv", "--cells.max_per_cell", "3", "--cells.min_per_cell", "5"],
            "--cells.max_per_cell",
        ),
        (["train", "-c", "/nonexistent/recipe.yaml"], "recipe.yaml"),
    ],
)
def test_bad_flags_give_one_line_naming_the_flag_and_status_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err


def test_backbones(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet-lite0" in out and "efficientnet-b7" in out


def test_a_bug_gives_one_line_and_status_3(monkeypatch, capsys):
    """An unexpected exception (a bug, not bad input) is named in one line, traceback only with -vv."""
    import geoswc.models.registry

    class Broken(dict):
        def items(self):
            raise ZeroDivisionError("division by zero in a test")

    monkeypatch.setattr(geoswc.models.registry, "REGISTRY", Broken())
    code = main(["backbones"])
    err = capsys.readouterr().err
    assert code == 3
    assert "internal error (ZeroDivisionError: division by zero in a test)" in err and "-vv" in err
    assert "Traceback" not in err
    assert main(["-vv", "backbones"]) == 3
    assert "Traceback" in capsys.readouterr().err


def test_running_out_of_memory_is_named_not_called_a_bug(monkeypatch, capsys):
    import geoswc.models.registry

    class Huge(dict):
        def items(self):
            raise MemoryError("Unable to allocate 12.8 GiB for an array with shape (1000000, 3400)")

    monkeypatch.setattr(geoswc.models.registry, "REGISTRY", Huge())
    assert main(["backbones"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("geoswc backbones: error: out of memory (Unable to allocate 12.8 GiB") and "\n" not in err


@pytest.mark.slow
def test_the_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "geoswc", "--version"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning"},
    )
    assert out.stdout.strip() == f"geoswc {geoswc.__version__}"


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
    assert (
        main(
            [
                "train",
                "--features",
                str(tiny_workspace["features"]),
                "--cells",
                str(tiny_workspace["cells"]),
                "--out",
                str(out),
                "--train.epochs",
                "2",
                "--train.rrm_epochs",
                "1",
                "--train.batch_size",
                "16",
                "--train.val_fraction",
                "0.3",
            ]
        )
        == 0
    )
    assert "MvMF head of epoch" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["config"]["train"]["val_fraction"] == 0.3
    assert (
        main(
            [
                "train",
                "--features",
                str(tiny_workspace["features"]),
                "--cells",
                str(tiny_workspace["cells"]),
                "--out",
                str(tmp_path / "m2"),
                "--train.val_fraction",
                "1.5",
            ]
        )
        == 2
    )
    assert "--train.val_fraction: val_fraction must be in [0, 1)" in capsys.readouterr().err


def test_train_from_the_recipe(tiny_workspace, tmp_path):
    """`geoswc train -c recipes/default.yaml` trains with the recipe's settings (flags still win)."""
    out = tmp_path / "m"
    assert (
        main(
            [
                "train",
                "-c",
                str(RECIPE),
                "--features",
                str(tiny_workspace["features"]),
                "--cells",
                str(tiny_workspace["cells"]),
                "--out",
                str(out),
                "--train.epochs",
                "1",
                "--train.rrm_epochs",
                "1",
            ]
        )
        == 0
    )
    cfg = json.loads((out / "config.json").read_text())["config"]
    section = Recipe.load(RECIPE).section("train")
    assert cfg["train"]["epochs"] == 1 and cfg["train"]["batch_size"] == section["train"]["batch_size"]
    assert cfg["search"] == {**cfg["search"], **section["search"]} and cfg["heads"]["mvmf_dropout"] == 0.2


def test_locate_text_and_json(tiny_workspace, capsys):
    photos = [str(DEV_IMAGES / r["image"]) for r in dev_rows(2)]
    assert main(["locate", *photos, "--model", str(tiny_workspace["model"])]) == 0
    out = capsys.readouterr().out
    assert out.count("estimate") == 2 and "top cells" in out and "near" in out
    assert (
        main(["locate", str(KAUAI), "--model", str(tiny_workspace["model"]), "--format", "jsonl", "--search.k", "3"])
        == 0
    )
    (line,) = capsys.readouterr().out.strip().splitlines()
    p = json.loads(line)
    assert -90 <= p["lat"] <= 90 and -180 <= p["lon"] <= 180
    assert 0 <= p["confidence"] <= 1
    assert len(p["top_cells"]) == 5 and p["top_cells"][0]["probability"] >= p["top_cells"][1]["probability"]
    # search within the chosen cell (search_km 0): the k = 3 asked for, or all the gallery holds in that cell
    gallery = load_gallery(tiny_workspace["model"] / "index")
    model = GeoModel.load(tiny_workspace["model"], with_backbone=False)
    assert model.config.search.search_km == 0
    cells = model.cells
    in_cell = int(np.sum(gallery.cell == cells.tokens.index(p["cell"])))
    assert len(p["neighbors"]) == min(3, in_cell) and p["fallback"] == (in_cell == 0)
    assert p["place"]["country"]


def test_locate_reports_bad_photo_and_carries_on(tiny_workspace, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = DEV_IMAGES / dev_rows(1)[0]["image"]
    rc = main(["locate", str(bad), str(good), "--model", str(tiny_workspace["model"]), "--format", "jsonl"])
    assert rc == 1
    lines = [json.loads(s) for s in capsys.readouterr().out.strip().splitlines()]
    assert lines[0]["image"].endswith("broken.jpg") and "error" in lines[0]
    assert "lat" in lines[1]


@pytest.mark.slow
def test_evaluate_writes_contract(tiny_workspace, tmp_path, capsys):
    rows = dev_rows(12, step=101)
    csv_path = write_csv(tmp_path / "bench.csv", rows + [{"image": "missing.jpg", "lat": "1", "lon": "2"}])
    out = tmp_path / "eval"
    rc = main(
        [
            "evaluate",
            "--data.csv",
            str(csv_path),
            "--data.images",
            str(DEV_IMAGES),
            "--out",
            str(out),
            "--model",
            str(tiny_workspace["model"]),
            "--methods",
            "[swc, classification, retrieval]",
            "--exclude_same_author",
            "true",
        ]
    )
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 12 and m["missing"] == 1 and m["method"] == "swc"
    assert set(m["accuracy"]) == {"1", "25", "200", "750", "2500"}
    assert all(0.0 <= v <= 1.0 for v in m["accuracy"].values())
    assert list(m["accuracy"].values()) == sorted(m["accuracy"].values())
    assert m["model"] == json.loads((tiny_workspace["model"] / "config.json").read_text())["fingerprint"]
    assert set(m["methods"]) == {"swc", "classification", "retrieval"}
    header = (out / "predictions.csv").read_text().splitlines()[0]
    assert header == (
        "image,true_lat,true_lon,pred_lat,pred_lon,error_km,cell,confidence,within_1_km,within_25_km,"
        "within_200_km,within_750_km,within_2500_km,localizable"
    )
    assert m["calibration"] is None  # the tiny model has no calibrator: no reliability diagram either
    assert m["selective"]["coverage"] == [0.1, 0.25, 0.5, 0.75, 1.0] and not (out / "reliability.png").exists()
    assert (out / "selective.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "predictions.csv").read_text().splitlines()) == 13
    assert (out / "predictions_retrieval.csv").is_file()
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "swc" in capsys.readouterr().out


def test_index_refuses_features_of_another_backbone(tiny_workspace, tmp_path, capsys):
    feats = tmp_path / "feats"
    rows = dev_rows(4)
    csv_path = write_csv(tmp_path / "few.csv", rows)
    assert (
        main(
            [
                "features",
                "--data.csv",
                str(csv_path),
                "--data.images",
                str(DEV_IMAGES),
                "--out",
                str(feats),
                "--backbone.image_size",
                "192",
            ]
        )
        == 0
    )
    capsys.readouterr()
    rc = main(
        ["index", "--model", str(tiny_workspace["model"]), "--features", str(feats), "--out", str(tmp_path / "i")]
    )
    assert rc == 2
    assert "come from backbone" in capsys.readouterr().err


@pytest.mark.slow
def test_locate_refuses_index_of_another_model(tiny_workspace, tmp_path, capsys):
    other = tmp_path / "other"
    assert (
        main(
            [
                "train",
                "--features",
                str(tiny_workspace["features"]),
                "--cells",
                str(tiny_workspace["cells"]),
                "--out",
                str(other),
                "--train.epochs",
                "1",
                "--train.seed",
                "7",
            ]
        )
        == 0
    )
    capsys.readouterr()
    rc = main(["locate", str(KAUAI), "--model", str(other), "--index", str(tiny_workspace["model"] / "index")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "was built with model" in err and "geoswc index" in err


def test_cells_command_reports_bad_rows(tmp_path, capsys):
    coords = tmp_path / "coords.csv"
    coords.write_text("LAT,LON\n48.85,2.35\n48.86,2.34\nnan,1\n95,3\n40.7,-74.0\nabc,2\n40.71,-74.01\n")
    assert (
        main(
            [
                "cells",
                "--coords",
                str(coords),
                "--out",
                str(tmp_path / "c.csv"),
                "--cells.max_per_cell",
                "2",
                "--cells.min_per_cell",
                "1",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "3 skipped" in err and "lat 95.0 is outside" in err and "cells from 4 coordinates" in out


def test_out_of_memory_names_what_was_being_built(monkeypatch, capsys, tmp_path):
    """A MemoryError inside a builder says what it was building (and its size) on the one error line."""
    import geoswc.workflow

    def huge(*a, **k):
        raise MemoryError("Unable to allocate 9.1 GiB for an array with shape (4723695, 256)")

    monkeypatch.setattr(geoswc.workflow, "build_cells", huge)
    coords = tmp_path / "c.csv"
    coords.write_text("lat,lon\n" + "".join(f"{i % 80}.5,{i % 170}.25\n" for i in range(300)))
    assert main(["cells", "--coords", str(coords), "--out", str(tmp_path / "cells.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the log lines
    assert err.startswith(
        "geoswc cells: error: out of memory (while building cells from 300 coordinates: Unable to allocate 9.1 GiB"
    )
