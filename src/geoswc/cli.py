"""The ``geoswc`` command: thin wrappers over the library (results on stdout, logs on stderr)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import __version__, storage
from .errors import GeoswcError

log = logging.getLogger("geoswc")


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under dataclass fields (``x: int = 1`` then ``\"\"\"doc\"\"\"``)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for a, b in zip(body, body[1:], strict=False):
        if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _add_fields(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = (), from_model: bool = False) -> None:
    """One ``--flag`` per scalar field of a config dataclass, defaulting to None (= keep the config's)."""
    docs = _field_docs(cls)
    group = parser.add_argument_group(
        f"{cls.__name__} (unset flags keep the model's saved settings; 'default' is the library default)"
        if from_model else f"{cls.__name__} (defaults as shown)")
    default = cls()
    for f in dataclasses.fields(cls):
        if f.name in skip or f.type not in ("int", "float", "bool", "str"):
            continue
        flag = "--" + f.name.replace("_", "-")
        dv = getattr(default, f.name)
        help_ = f"{docs.get(f.name, '')} (default: {dv})".strip()
        if f.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            group.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type], default=None,
                               help=help_, metavar=f.name.upper())


def _from_args(cls: type, args: argparse.Namespace, base: Any = None) -> Any:
    from .config import replace

    base = base if base is not None else cls()
    try:
        return replace(base, **{f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)})
    except (TypeError, ValueError) as e:  # a config's own validation: name the flag, not the field
        from .errors import InputError

        msg = str(e)
        for f in dataclasses.fields(cls):
            msg = re.sub(rf"\b{f.name}\b", "--" + f.name.replace("_", "-"), msg)
        raise InputError(f"invalid option: {msg}") from None


def _search_config(args: argparse.Namespace, base: Any = None) -> Any:
    from .config import SearchConfig

    return _from_args(SearchConfig, args, base)


# -- subcommands --------------------------------------------------------------------------------------


def _expand_photos(items: Sequence[str]) -> list[Path]:
    from .data import IMAGE_SUFFIXES

    out: list[Path] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                log.warning("%s: no photos found in this folder", p)
            out += found
        else:
            out.append(p)
    return out


def cmd_locate(args: argparse.Namespace) -> int:
    from .api import Geolocator, LocateFailure
    from .errors import InputError

    given = [name for name, v in (("photos", args.photos), ("--csv", args.csv), ("--shards", args.shards)) if v]
    if len(given) != 1:
        raise InputError("give photo files or folders, --csv FILE (with --images DIR) or --shards DIR|GLOB"
                         + (f", not {' and '.join(given)} together" if given else ""))
    if args.images is not None and args.csv is None:
        raise InputError("--images goes with --csv (photos and folders are given as arguments)")
    geo = Geolocator.load(args.model, args.index, runtime=getattr(args, "runtime", "torch"))
    geo.search = _search_config(args, geo.search)
    to_file = args.output is not None or args.format is not None
    kw: dict[str, Any] = dict(method=args.method, with_place=not args.no_place, batch_size=args.batch_size,
                              num_workers=args.workers)
    if args.shards:
        results = geo.locate_shards(args.shards, progress=to_file or not args.json, **kw)
    elif args.csv:
        from .data import read_photo_list

        records, _ = read_photo_list(args.csv, args.images)
        if not records:
            raise InputError(f"{args.csv} names no photo that exists")
        results = geo.locate_batch([r.path for r in records], names=[r.image for r in records],
                                   progress=to_file or (len(records) > 8 and not args.json), **kw)
    else:
        photos = _expand_photos(args.photos)
        if not photos:
            raise InputError(f"no photos found in {', '.join(args.photos)}; give image files or folders holding them")
        results = geo.locate_batch(photos, progress=to_file or (len(photos) > 8 and not args.json), **kw)
    if to_file:
        return _write_results(results, args.output, args.format)
    failures = total = 0
    for r in results:
        total += 1
        if isinstance(r, LocateFailure):
            failures += 1
            msg = f"error: {r.error}"
            print(json.dumps({"image": r.image, "error": r.error, "kind": r.kind}) if args.json else msg,
                  file=sys.stdout if args.json else sys.stderr)
            continue
        print(json.dumps(r.to_dict()) if args.json else format_prediction(r), flush=True)
    if failures:
        log.warning("%d of %d photos could not be located", failures, total)
    return 1 if failures else 0


def _write_results(results: Iterator[Any], output: Path | None, fmt: str | None) -> int:
    """Stream results to ``output`` (atomically; stdout when None) as JSONL, CSV or GeoJSON."""
    from tqdm.auto import tqdm

    from .api import LocateFailure, PredictionWriter, output_format

    fmt = output_format(output, fmt)

    def reported(rs: Iterator[Any]) -> Iterator[Any]:
        for r in rs:
            if isinstance(r, LocateFailure):
                tqdm.write(f"error: {r.error}", file=sys.stderr)
            yield r

    if output is None:
        with PredictionWriter(sys.stdout, fmt) as w:
            for r in reported(results):
                w.write(r)
    else:
        with storage.atomic_writer(output, "w") as f, PredictionWriter(f, fmt) as w:  # type: ignore[arg-type]
            for r in reported(results):
                w.write(r)
        print(f"{w.located} photos located" + (f", {w.failed} failed" if w.failed else "") + f" -> {output} ({fmt})")
    if w.failed:
        log.warning("%d of %d photos could not be located", w.failed, w.failed + w.located)
    return 1 if w.failed else 0


def format_prediction(p: Any) -> str:
    """Human-readable block for one prediction."""
    lines = [p.image, f"  estimate    {p.lat:.5f}, {p.lon:.5f}   ({p.method}; confidence {p.confidence:.2f})"]
    if p.place is not None:
        d = p.place.distance_km
        lines.append(f"  near        {p.place.label()} ({d:.1f} km away)" if d < 10 else
                     f"  near        {p.place.label()} ({d:.0f} km away)")
    lines.append(f"  cell        {p.cell} ({100 * p.cell_probability:.1f} %, searched)")
    if p.fallback:
        lines.append("  note        the cell holds no gallery photo: the cell's centroid is the estimate")
    elif p.neighbors:
        in_cluster = sum(n.cluster == p.cluster for n in p.neighbors)
        lines.append(f"  evidence    {in_cluster} of {len(p.neighbors)} nearest gallery photos agree "
                     f"(best similarity {p.neighbors[0].similarity:.2f})")
    lines.append("  top cells   " + "\n              ".join(
        f"{i + 1}. {c.token:<16} {100 * c.probability:5.1f} %  ({c.lat:.3f}, {c.lon:.3f})"
        for i, c in enumerate(p.top_cells)))
    if p.exif is not None:
        lines.append(f"  GPS EXIF    {p.exif.lat:.5f}, {p.exif.lon:.5f}   "
                     f"(estimate is {p.exif.distance_km:.1f} km off)")
    return "\n".join(lines)


def _csv_rows(text: str, path: Path) -> Iterator[list[str]]:
    """CSV rows; a malformed CSV (e.g. a field over the csv module's size limit) is an InputError."""
    import csv

    from .errors import InputError

    reader = csv.reader(text.splitlines())
    try:
        yield from reader
    except csv.Error as e:
        raise InputError(f"CSV {path} is malformed near line {reader.line_num}: {e}") from None


def _read_coords(path: Path) -> tuple[Any, Any, Any]:
    """lat/lon columns of a CSV (header names case-insensitive); bad rows are reported and skipped."""
    import numpy as np

    from .data import LoadReport, _parse_coord, _read_text
    from .errors import InputError

    text = _read_text(path)
    reader = _csv_rows(text, path)
    header = [h.strip().lower() for h in next(reader, [])]
    if "lat" not in header or "lon" not in header:
        raise InputError(f"{path} needs 'lat' and 'lon' columns (any case); its header is {header}")
    il, io_ = header.index("lat"), header.index("lon")
    report = LoadReport(str(path))
    lat, lon = [], []
    for n, row in enumerate(reader, start=2):
        report.total += 1
        try:
            a = _parse_coord(row[il] if il < len(row) else None, "lat", 90)
            b = _parse_coord(row[io_] if io_ < len(row) else None, "lon", 180)
        except ValueError as e:
            report.skip(f"line {n}", str(e))
            continue
        lat.append(a)
        lon.append(b)
    report.log()
    if not lat:
        raise InputError(f"{path} holds no usable coordinates: {report.summary()}")
    return np.array(lat), np.array(lon), report


def cmd_cells(args: argparse.Namespace) -> int:
    from .cells import build_cells
    from .config import CellConfig

    lat, lon, _ = _read_coords(args.coords)
    cfg = _from_args(CellConfig, args)
    table = build_cells(lat, lon, cfg, progress=True)
    table.save(args.out)
    print(f"{len(table)} cells from {len(lat)} coordinates -> {args.out} (fingerprint {table.fingerprint})")
    return 0


def _backbone_for(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """The extractor for `features`/`index`: a model's backbone, or a registry one."""
    import dataclasses as dc

    from .backbone import backbone_fingerprint, create_backbone, default_config

    if getattr(args, "model", None):
        from .model import GeoModel

        model = GeoModel.load(args.model)
        return model.backbone, model.config.backbone, model.backbone_fingerprint
    cfg = default_config(args.backbone, args.image_size, args.resize)
    if args.weights:
        cfg = dc.replace(cfg, weights=args.weights)
    bb, cfg = create_backbone(cfg)
    return bb, cfg, backbone_fingerprint(cfg)


def cmd_features(args: argparse.Namespace) -> int:
    from . import distributed
    from .data import load_records
    from .errors import InputError
    from .features import extract_and_save

    if args.shards and (args.csv or args.images):
        raise InputError("give --shards, or --csv/--images, not both")
    ctx = distributed.init_distributed(args.device)
    try:
        records = None if args.shards else load_records(args.csv, args.images)[0]
        bb, cfg, fp = _backbone_for(args)
        fs, report = extract_and_save(args.out, bb.to(ctx.device), cfg, records=records, shards=args.shards,
                                      views=args.views, batch_size=args.batch_size, num_workers=args.workers,
                                      seed=args.seed, fingerprint=fp, precision=args.precision)
    finally:
        distributed.shutdown()
    if fs is not None:
        print(f"features of {len(fs)} photos ({fs.views} view(s), {fs.features.shape[2]}-d) -> {args.out}"
              + (f"; {len(report.skipped)} skipped" if report.skipped else ""))
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from .data import load_records
    from .shards import write_shards

    records, _ = load_records(args.csv, args.images)
    paths, report = write_shards(records, args.out, args.samples_per_shard, verify=args.verify,
                                 num_workers=args.workers, source=str(args.csv or args.images))
    print(f"{report.kept} photos in {len(paths)} shards -> {args.out}"
          + (f"; {len(report.skipped)} skipped" if report.skipped else ""))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from . import distributed

    ctx = distributed.init_distributed(args.device)
    try:
        return _train(args, ctx)
    finally:
        distributed.shutdown()


def _train(args: argparse.Namespace, ctx: Any) -> int:
    from .cells import CellTable
    from .config import HeadConfig, ModelConfig, TrainConfig
    from .data import load_records
    from .errors import InputError, ModelMismatchError
    from .features import FeatureSet
    from .model import GeoModel
    from .train import finetune, finetune_shards, train_heads

    feats = FeatureSet.load(args.features)
    cells = CellTable.load(args.cells)
    train_cfg = _from_args(TrainConfig, args)
    cfg = ModelConfig(backbone=feats.backbone, heads=_from_args(HeadConfig, args), train=train_cfg,
                      search=_search_config(args), cells=cells.config,
                      recipe=args.recipe or {})
    model = GeoModel.create(cfg, cells, with_backbone=train_cfg.finetune)
    if model.backbone is not None:
        model.compute_fingerprints()
        if model.backbone_fingerprint != feats.backbone_fingerprint:
            raise ModelMismatchError("the features were extracted with another backbone than the one configured")
    out = storage.ensure_dir(args.out, create=False)
    history = train_heads(model, feats, train_cfg, checkpoint_dir=out / "checkpoint")
    if train_cfg.finetune:
        if args.shards:
            history |= finetune_shards(model, args.shards, train_cfg, checkpoint_dir=out / "checkpoint-finetune",
                                       num_workers=args.workers, precision=args.precision)
        else:
            if not (args.csv or args.images):
                raise InputError("--finetune trains on images: give --csv and --images, or --shards")
            records, _ = load_records(args.csv, args.images)
            history |= finetune(model, records, train_cfg, checkpoint_dir=out / "checkpoint-finetune",
                                num_workers=args.workers, precision=args.precision)
    if not ctx.is_main:
        return 0
    fp = model.to("cpu").save(out)
    losses = ", ".join(f"{k} {v[-1]:.3f}" for k, v in history.items() if v and k != "mvmf_val")
    if history.get("mvmf_val"):
        best = int(min(range(len(history["mvmf_val"])), key=history["mvmf_val"].__getitem__))
        losses += f"; MvMF head of epoch {best}, held-out NLL {history['mvmf_val'][best]:.3f}"
    print(f"model {fp} -> {out} ({len(cells)} cells; final losses {losses})")
    if train_cfg.finetune:
        print("the backbone was fine-tuned: re-extract gallery features with `geoswc index --model "
              f"{out} --csv ... --images ...`")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from .data import load_records
    from .errors import InputError, ModelMismatchError
    from .features import FeatureSet, extract_features
    from .index import Gallery, write_gallery
    from .model import GeoModel

    model = GeoModel.load(args.model, with_backbone=args.features is None)
    storage.ensure_dir(args.out if args.out else Path(args.model) / "index", create=False)
    model.compute_fingerprints()
    if args.features is not None:
        fs = FeatureSet.load(args.features)
        if fs.backbone_fingerprint != model.backbone_fingerprint:
            raise ModelMismatchError(
                f"the features in {args.features} come from backbone {fs.backbone_fingerprint}, the model's is "
                f"{model.backbone_fingerprint}; extract them with `geoswc features --model {args.model}`")
    else:
        if not (args.csv or args.images):
            raise InputError("give --features, or --csv/--images to embed photos")
        records, _ = load_records(args.csv, args.images)
        fs, _ = extract_features(model.backbone, model.config.backbone, records, batch_size=args.batch_size,
                                 num_workers=args.workers, fingerprint=model.backbone_fingerprint)
    out = Path(args.out) if args.out else Path(args.model) / "index"
    step = 1 << 16  # embedded and written chunk by chunk: the gallery is never whole in memory
    write_gallery(model, ((fs.features[i:i + step, 0], fs.lat[i:i + step], fs.lon[i:i + step],
                           fs.names[i:i + step], fs.authors[i:i + step]) for i in range(0, len(fs), step)), out)
    gallery = Gallery.load(out, model.fingerprint)
    sizes = gallery.cell_sizes()
    print(f"gallery of {len(gallery)} photos -> {out}; {int((sizes > 0).sum())} of {len(sizes)} cells hold photos"
          + (f", {int((gallery.cell < 0).sum())} photos fall in no cell" if (gallery.cell < 0).any() else ""))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .api import Geolocator
    from .evaluate import evaluate, format_metrics

    geo = Geolocator.load(args.model, args.index, runtime=getattr(args, "runtime", "torch"))
    geo.search = _search_config(args, geo.search)
    methods = [m for group in args.method for m in group.split(",") if m] or ["swc"]
    metrics = evaluate(args.csv, args.images, args.out, geo, methods, args.exclude_same_author,
                       batch_size=args.batch_size, num_workers=args.workers)
    print(format_metrics(metrics))
    print(f"-> {Path(args.out) / 'metrics.json'}, predictions.csv, accuracy.png")
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from .backbone import REGISTRY

    for name, spec in REGISTRY.items():
        src = "offline (wheel)" if spec.offline else "downloaded on first use"
        print(f"{name:<20} {spec.feature_dim:>5}-d  {spec.image_size} px  weights: {src}")
    return 0


# -- parser -------------------------------------------------------------------------------------------


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v

    return parse


def _json_object(text: str) -> dict[str, Any]:
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return v


def build_parser() -> argparse.ArgumentParser:
    from .backbone import list_backbones
    from .config import CellConfig, HeadConfig, SearchConfig, TrainConfig

    p = argparse.ArgumentParser(prog="geoswc", description="Where on Earth was this photo taken? "
                                "Search-within-Cell geolocation (Kordopatis-Zilos et al., ICMR 2021).")
    p.add_argument("--version", action="version", version=f"geoswc {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=fn)
        return sp

    def model_args(sp: argparse.ArgumentParser, index: bool = True) -> None:
        sp.add_argument("--model", type=Path, default=None, help="model folder (default: the embedded model)")
        if index:
            sp.add_argument("--index", type=Path, default=None, help="gallery index folder (default: MODEL/index)")

    def data_args(sp: argparse.ArgumentParser, required: bool = False) -> None:
        sp.add_argument("--csv", type=Path, default=None, help="CSV with image,lat,lon[,author] columns")
        sp.add_argument("--images", type=Path, default=None, required=required,
                        help="image folder (CSV paths are relative to it; without --csv, GPS EXIF gives positions)")

    def run_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--batch-size", type=_int_at_least(1), default=16)
        sp.add_argument("--workers", type=_int_at_least(0), default=0,
                        help="decoding processes (0: in the main process)")

    def runtime_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                        help="backbone runtime: torch (eager) or onnx (exported once, several times faster on CPU; "
                        "needs pip install 'geoswc[fast]')")

    def dist_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when a GPU is present), cpu, cuda")
        sp.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="backbone autocast on GPUs (auto: bf16 where supported, else fp16); CPUs use fp32")

    sp = add("locate", cmd_locate, "Estimate where photos were taken.")
    sp.add_argument("photos", nargs="*", help="photo files or folders")
    sp.add_argument("--csv", type=Path, default=None, help="locate the photos this CSV's 'image' column names")
    sp.add_argument("--images", type=Path, default=None, help="folder the --csv names are relative to")
    sp.add_argument("--shards", default=None, help="locate the photos of WebDataset shards (folder, glob or braces)")
    sp.add_argument("--output", type=Path, default=None,
                    help="write the results to this file (.jsonl, .csv or .geojson) with a progress bar")
    sp.add_argument("--format", default=None, choices=["jsonl", "csv", "geojson"],
                    help="output format (default: from the --output extension; without --output: to stdout)")
    model_args(sp)
    sp.add_argument("--method", default="swc", choices=["swc", "classification", "retrieval"])
    sp.add_argument("--json", action="store_true", help="one JSON object per photo")
    sp.add_argument("--no-place", action="store_true", help="skip the nearest-place lookup")
    run_args(sp)
    runtime_arg(sp)
    _add_fields(sp, SearchConfig, from_model=True)

    sp = add("cells", cmd_cells, "Build an adaptive S2 cell partition from coordinates.")
    sp.add_argument("--coords", type=Path, required=True, help="CSV with lat and lon columns (any case)")
    sp.add_argument("--out", type=Path, required=True, help="cell table CSV to write")
    _add_fields(sp, CellConfig)

    sp = add("shards", cmd_shards, "Pack geotagged photos into WebDataset tar shards (image + .json per photo).")
    data_args(sp)
    sp.add_argument("--out", type=Path, required=True, help="folder for shard-%%06d.tar and shards.json")
    sp.add_argument("--samples-per-shard", type=_int_at_least(1), default=1000, help="photos per shard")
    sp.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="decode every photo first and skip those that fail (default: on)")
    sp.add_argument("--workers", type=_int_at_least(0), default=0, help="reading processes")

    sp = add("features", cmd_features, "Extract and cache backbone features of geotagged photos "
             "(under torchrun: split over the processes).")
    data_args(sp)
    sp.add_argument("--shards", default=None, help="read the photos from WebDataset shards (folder, glob or braces)")
    dist_args(sp)
    sp.add_argument("--out", type=Path, required=True, help="feature cache folder")
    sp.add_argument("--model", type=Path, default=None, help="use this model's (possibly fine-tuned) backbone")
    sp.add_argument("--backbone", default="efficientnet-lite0", choices=list_backbones())
    sp.add_argument("--weights", default=None, help="local backbone weights file (default: the registry's)")
    sp.add_argument("--image-size", type=int, default=None, help="input size (default: the backbone's)")
    sp.add_argument("--resize", default="center_crop", choices=["center_crop", "squash"])
    sp.add_argument("--views", type=_int_at_least(1), default=1, help="views per photo: 1 plain + (views-1) augmented")
    sp.add_argument("--seed", type=int, default=0)
    run_args(sp)

    sp = add("train", cmd_train, "Train the MvMF classifier and the retrieval module.")
    sp.add_argument("--features", type=Path, required=True, help="feature cache from `geoswc features`")
    sp.add_argument("--cells", type=Path, required=True, help="cell table from `geoswc cells`")
    sp.add_argument("--out", type=Path, required=True, help="model folder to write (checkpoints go inside)")
    sp.add_argument("--recipe", type=_json_object, default=None, help=argparse.SUPPRESS)
    data_args(sp)
    sp.add_argument("--shards", default=None, help="--finetune streaming from WebDataset shards")
    sp.add_argument("--workers", type=_int_at_least(0), default=0, help="decoding processes for --finetune")
    dist_args(sp)
    _add_fields(sp, TrainConfig)
    _add_fields(sp, HeadConfig)
    _add_fields(sp, SearchConfig)

    sp = add("index", cmd_index, "Embed a background gallery and index it by cell.")
    sp.add_argument("--model", type=Path, required=True, help="model folder")
    sp.add_argument("--features", type=Path, default=None, help="feature cache made with the model's backbone")
    data_args(sp)
    sp.add_argument("--out", type=Path, default=None, help="index folder (default: MODEL/index)")
    run_args(sp)

    sp = add("evaluate", cmd_evaluate, "Evaluate on a benchmark CSV: metrics.json, predictions.csv, accuracy.png.")
    sp.add_argument("--csv", type=Path, required=True, help="CSV with image,lat,lon[,author]")
    sp.add_argument("--images", type=Path, default=None, help="image folder (default: the CSV's folder)")
    sp.add_argument("--out", type=Path, required=True, help="output folder")
    model_args(sp)
    sp.add_argument("--method", action="append", default=[],
                    help="swc, classification or retrieval; repeat or comma-separate for several (default swc)")
    sp.add_argument("--exclude-same-author", action="store_true",
                    help="never retrieve gallery photos by the query's author")
    run_args(sp)
    runtime_arg(sp)
    _add_fields(sp, SearchConfig, from_model=True)

    add("backbones", cmd_backbones, "List the available backbones.")
    try:
        from .service.cli import add_serve_parser
    except ImportError:
        pass
    else:
        add_serve_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command not in ("backbones",):
        logging.getLogger("geoswc").setLevel(min(level, logging.INFO) if args.command != "locate" else level)
    if os.environ.get("RANK", "0") != "0":  # torchrun: only rank 0 talks, unless something goes wrong
        logging.getLogger("geoswc").setLevel(max(level, logging.WARNING))
    try:
        return int(args.func(args))
    except GeoswcError as e:
        print(f"geoswc {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that is a directory, a full disk, no permission: name it, no traceback
        print(f"geoswc {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"geoswc {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug of ours: one clear line, the traceback on request
        if args.verbose >= 2:
            traceback.print_exc(file=sys.stderr)
        print(f"geoswc {args.command}: internal error ({type(e).__name__}: {e}). This is a bug in geoswc; "
              "please report it with the output of the same command run with -vv", file=sys.stderr)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
