"""Which backbone for this photo collection? Author-disjoint cross-validated accuracy of several backbones.

For each backbone, the photos' features are extracted (once, cached by the recipe's ``features`` settings) and
benchmarks/cross_validation.py's folds are run on them: the heads are trained on the other photographers'
photos, which also form the gallery, and each fold's photos are located by SwC, classification and retrieval
(plus the untrained raw 1-NN and the pixel-blind cell prior). Everything but the backbone comes from the recipe
(default: recipes/default.yaml, one view per photo).

Run:  python benchmarks/backbone_comparison.py --out benchmarks/results/backbone_comparison.json \
          --backbones '[{name: efficientnet-lite0}, {name: efficientnet-lite2}]'
A backbone whose weights come from a local folder: ``{name: clip-vit-l14, weights: /path/to/clip-vit-large-patch14}``.
It prints a Markdown table and writes it (``.md``) beside the JSON; ``--help`` lists the options.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geoswc.core import atomic_files
from geoswc.data.sources import Photos
from geoswc.models.backbone import BackboneChoice

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
import cross_validation as cv  # noqa: E402
from provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
log = logging.getLogger("backbone_comparison")
METHODS = ("swc", "classification", "retrieval", "raw 1-NN", "cell prior")


@dataclass(frozen=True)
class BackboneComparison:
    """Author-disjoint cross-validation of one recipe with each of several backbones."""

    out: Path
    """The JSON results file (a ``.md`` table is written beside it)."""
    backbones: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"name": "efficientnet-lite0"},
            {"name": "efficientnet-lite1"},
            {"name": "efficientnet-lite2"},
        ]
    )
    """The backbones to compare, each a :class:`geoswc.options.BackboneChoice` as a mapping (``name``, ``weights``,
    ``image_size``, ``resize``; unset: the backbone's own). Plain mappings: the geoswc CLI's parser settings (no
    class paths) may be in force in the same process."""
    recipe: Path = ROOT / "recipes" / "default.yaml"
    """The recipe whose ``cells``, ``features`` (all but the backbone) and ``train`` sections are used."""
    views: int = 1
    """Views per photo of the training features (1: the plain view; the default recipe's 5 takes 5x longer)."""
    changes: dict[str, dict] = field(default_factory=dict)
    """Other changes to the recipe's sections, e.g. ``{train: {train: {rrm_epochs: 5}}}``."""
    data: Photos = field(
        default_factory=lambda: Photos(
            csv=SHARED / "im2gps3k-dev" / "im2gps3k-dev.csv", images=SHARED / "im2gps3k-dev" / "images"
        )
    )
    """The labelled photos (a CSV ``image,lat,lon,author`` and its image folder)."""
    cell_coords: Path = SHARED / "priors" / "mp16-coordinates-100k.csv"
    """The coordinates the cells are built from."""
    cache: Path = ROOT / "work" / "cv-features"
    """Where cells and extracted features are kept between runs."""
    folds: int = 5
    quick: bool = False
    """2 folds, 2 epochs of each head: a smoke run."""


def backbone_section(choice: BackboneChoice) -> dict[str, Any]:
    """The recipe's ``features.backbone`` group for ``choice``, whole: an unset size or resize policy is the
    backbone's own, not the recipe's (SigLIP squashes, EfficientNet-Lite2 reads 260 px)."""
    pre = choice.resolve().preprocess
    return {**dataclasses.asdict(choice), "image_size": pre.image_size, "resize": pre.resize}


def run(opts: BackboneComparison, argv: list[str]) -> dict[str, Any]:
    results = []
    for choice in (BackboneChoice(**b) for b in opts.backbones):
        t0 = time.time()
        log.info("backbone %s", choice.name)
        cv_opts = cv.CrossValidation(
            out=opts.out,
            recipe=opts.recipe,
            data=opts.data,
            cell_coords=opts.cell_coords,
            cache=opts.cache,
            folds=opts.folds,
            quick=opts.quick,
            changes={
                **opts.changes,
                "features": {
                    **opts.changes.get("features", {}),
                    "backbone": backbone_section(choice),
                    "views": opts.views,
                },
            },
        )
        r = cv.run(cv_opts, [])
        r["choice"] = backbone_section(choice)
        r["seconds"] = round(time.time() - t0, 1)
        results.append(r)
    return {
        "dataset": str(opts.data.csv),
        "folds": results[0]["folds"] if results else opts.folds,
        "views": opts.views,
        "train": results[0]["train"] if results else {},
        "results": results,
        "command": shlex.join(["python", "benchmarks/backbone_comparison.py", *argv]),
        "provenance": provenance(shlex.join(["python", "benchmarks/backbone_comparison.py", *argv])),
    }


def markdown_table(result: dict[str, Any]) -> str:
    """One row per backbone and method: accuracy (%) at each threshold and the median error."""
    first = result["results"][0]
    keys = list(first["methods"]["swc"]["accuracy"])
    train = first["train"]
    lines = [
        f"Author-disjoint {result['folds']}-fold cross-validation, {first['n']} photos, {first['cells']} "
        f"cells, {result['views']} view(s) per photo, {train['epochs']} MvMF + {train['rrm_epochs']} RRM epochs",
        "",
        "| backbone | px | method | " + " | ".join(f"{k} km" for k in keys) + " | median km |",
        "|---|---:|---|" + "---:|" * (len(keys) + 1),
    ]
    for r in result["results"]:
        for m in METHODS:
            row = r["methods"][m]
            lines.append(
                f"| {r['backbone']} | {r['image_size']} | {m} | "
                + " | ".join(f"{100 * row['accuracy'][k]:.1f}" for k in keys)
                + f" | {row['median_km']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import auto_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    opts: BackboneComparison = auto_cli(BackboneComparison, args=argv, as_positional=False, return_instance=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    result = run(opts, argv)
    table = markdown_table(result)
    print(table)
    atomic_files.write_report(opts.out, result, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
