"""Rebuild the embedded default model from ../shared/data, following recipes/default.json.

It runs the same four commands a user runs on their own data (cells, features, train, index), then
copies the model folder (without checkpoints) into src/geoswc/assets/default/.

    python scripts/build_default_model.py [--shared ../shared/data] [--work work/default-model]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

from geoswc.cli import main as geoswc
from geoswc.config import canonical_json, digest
from geoswc.storage import sha256_file

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "default.json"
ASSET = ROOT / "src" / "geoswc" / "assets" / "default"


def recipe_digest(recipe: dict) -> str:
    return digest(canonical_json(recipe))


def folder_sha256(folder: Path) -> str:
    """Digest of a folder's files: names and contents, in name order."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode())
        h.update(bytes.fromhex(sha256_file(p)))
    return h.hexdigest()


def check_data(shared: Path, data: dict) -> list[str]:
    """Mismatches between ../shared/data and the digests the recipe records."""
    bad = []
    for key, rel in data["files"].items():
        if sha256_file(shared / rel) != data["sha256"][key]:
            bad.append(str(shared / rel))
    if folder_sha256(shared / data["images"]) != data["sha256"]["images"]:
        bad.append(str(shared / data["images"]))
    return bad


def features_match(folder: Path, recipe: dict) -> bool:
    """Whether a feature cache already holds what the recipe's features step would extract."""
    if not (folder / "features.json").is_file():
        return False
    meta = json.loads((folder / "features.json").read_text())
    want = recipe["backbone"]
    pre = meta["backbone"]["preprocess"]
    return (meta["backbone"]["name"] == want["backbone"] and pre["image_size"] == want["image_size"]
            and pre["resize"] == want["resize"] and meta["views"] == recipe["features"]["views"]
            and meta.get("seed", 0) == recipe["features"]["seed"])


def flags(options: dict) -> list[str]:
    out: list[str] = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        else:
            out += [flag, str(v)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=ROOT / "work" / "default-model")
    p.add_argument("--install", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the result into src/geoswc/assets/default")
    args = p.parse_args(argv)
    recipe = json.loads(RECIPE.read_text())
    data = recipe["data"]
    bad = check_data(args.shared, data)
    if bad:
        print(f"error: {', '.join(bad)} differ from the data the recipe names (sha256)", file=sys.stderr)
        return 2
    w = args.work
    csv, images = args.shared / data["files"]["train_csv"], args.shared / data["images"]
    steps = [
        ["cells", "--coords", str(args.shared / data["files"]["cell_coords"]), "--out", str(w / "cells.csv"),
         *flags(recipe["cells"])],
        ["features", "--csv", str(csv), "--images", str(images), "--out", str(w / "features"),
         *flags(recipe["backbone"]), *flags(recipe["features"]), "--workers", "1"],
        ["train", "--features", str(w / "features"), "--cells", str(w / "cells.csv"), "--out", str(w / "model"),
         *flags(recipe["train"]), *flags(recipe["heads"]), *flags(recipe["search"]),
         "--recipe", canonical_json({**recipe, "digest": recipe_digest(recipe)})],
        ["index", "--model", str(w / "model"), "--features", str(w / "features")],
    ]
    if features_match(w / "features", recipe):
        print(f"reusing the matching feature cache in {w / 'features'}")
        steps.pop(1)
    for step in steps:
        print("+ geoswc", " ".join(s if len(s) < 80 else s[:60] + "…" for s in step), flush=True)
        rc = geoswc(step)
        if rc:
            return rc
    if args.install:
        if ASSET.exists():
            shutil.rmtree(ASSET)
        shutil.copytree(w / "model", ASSET, ignore=shutil.ignore_patterns("checkpoint*"))
        print(f"installed -> {ASSET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
