"""Rebuild the embedded default model from ../shared/data with recipes/default.yaml.

It runs the steps a user runs on their own data (cells, features, train, index) through the same workflow
functions as the ``geoswc`` commands, each with its recipe section, fits the model's calibrator out of fold
(``geoswc calibrate --features ... --folds 5``: a file beside the model that leaves its weights and fingerprint
as they are), then copies the model folder (without checkpoints) into src/geoswc/assets/default/.

    python scripts/build_default_model.py [--shared ../shared/data] [--work work/default-model]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

from geoswc import workflow
from geoswc.core.errors import GeoswcError
from geoswc.core.tensor_files import sha256_file
from geoswc.recipes import Recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "default.yaml"
ASSET = ROOT / "src" / "geoswc" / "assets" / "default"
CALIBRATION_FOLDS = 5
"""Author-disjoint folds of the out-of-fold calibration (as the cross-validation benchmark)."""


def folder_sha256(folder: Path) -> str:
    """Digest of a folder's files: names and contents, in name order."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode())
        h.update(bytes.fromhex(sha256_file(p)))
    return h.hexdigest()


def check_data(shared: Path, data: dict) -> list[str]:
    """Mismatches between ../shared/data and the digests the recipe records."""
    bad = [str(shared / rel) for key, rel in data["files"].items() if sha256_file(shared / rel) != data["sha256"][key]]
    if folder_sha256(shared / data["images"]) != data["sha256"]["images"]:
        bad.append(str(shared / data["images"]))
    return bad


def features_match(folder: Path, wanted: dict) -> bool:
    """Whether a feature cache already holds what the features step (its keyword arguments) would extract."""
    if not (folder / "features.json").is_file():
        return False
    meta = json.loads((folder / "features.json").read_text())
    have = meta["backbone"]
    want = wanted["backbone"].resolve()
    return (
        have["name"] == want.name
        and have["preprocess"]["image_size"] == want.preprocess.image_size
        and have["preprocess"]["resize"] == want.preprocess.resize
        and meta["views"] == wanted["views"]
        and meta.get("seed", 0) == wanted["seed"]
    )


def build(recipe: Recipe, shared: Path, work: Path) -> None:
    """The four steps, each from its recipe section plus this machine's paths."""
    data = recipe.content["data"]
    photos = {"csv": str(shared / data["files"]["train_csv"]), "images": str(shared / data["images"])}
    workflow.cells(**recipe.arguments("cells", coords=shared / data["files"]["cell_coords"], out=work / "cells.csv"))
    features = recipe.arguments("features", data=photos, out=work / "features", run={"workers": 1})
    if features_match(work / "features", features):
        logging.info("reusing the matching feature cache in %s", work / "features")
    else:
        workflow.features(**features)
    train = recipe.arguments("train", features=work / "features", cells=work / "cells.csv", out=work / "model")
    workflow.train(**{**train, "provenance": {**recipe.content, "digest": recipe.digest}})  # recorded as it is
    workflow.index(**recipe.arguments("index", model=work / "model", features=work / "features"))
    workflow.calibrate(work / "model", features=work / "features", folds=CALIBRATION_FOLDS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=ROOT / "work" / "default-model")
    p.add_argument(
        "--install",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="copy the result into src/geoswc/assets/default",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    recipe = Recipe.load(RECIPE)
    bad = check_data(args.shared, recipe.content["data"])
    if bad:
        print(f"error: {', '.join(bad)} differ from the data the recipe names (sha256)", file=sys.stderr)
        return 2
    try:
        build(recipe, args.shared, args.work)
    except GeoswcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.install:
        if ASSET.exists():
            shutil.rmtree(ASSET)
        shutil.copytree(args.work / "model", ASSET, ignore=shutil.ignore_patterns("checkpoint*"))
        print(f"installed -> {ASSET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
