"""The pipeline steps, one typed function each: exactly what the ``geoswc`` commands run, callable from Python.

Each function does the whole step (read and check its inputs, compute, write its artifact) and returns
what it made; its parameters are the command's options (a dataclass parameter is a group of
``--name.field`` flags). A one-line summary of the result goes to the ``geoswc.workflow`` logger, which
the command prints on standard output.

    >>> from geoswc import workflow
    >>> workflow.cells(Path("coords.csv"), Path("work/cells.csv"), CellConfig(max_per_cell=1000))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geoswc.core import artifact_folders, atomic_files, distributed, json_records, threads
from geoswc.core.config import (
    METHODS,
    NO_SEARCH_CHANGES,
    CellConfig,
    GalleryCodes,
    HeadConfig,
    Method,
    ModelConfig,
    RunConfig,
    SearchChanges,
    SearchConfig,
    TrainConfig,
    check_search_changes,
    to_dict,
)
from geoswc.core.errors import ArtifactError, InputError, SettingError, building
from geoswc.data.records import (
    LoadReport,
    Record,
    find_photos,
    load_records,
    no_usable_photo,
    read_coordinates,
    read_photo_csv,
)
from geoswc.data.shards import photo_shards, write_shards
from geoswc.data.sources import Photos
from geoswc.data.splits import write_author_split
from geoswc.evaluation.benchmark_sets import BENCHMARKS, Benchmark, BenchmarkName
from geoswc.evaluation.compare import read_system, write_comparison
from geoswc.evaluation.crossfit import out_of_fold_signals, report_markdown
from geoswc.evaluation.evaluate import (
    benchmark_counts,
    format_metrics,
    labelled_signals,
    locate_records,
    missing_csv,
    write_evaluation,
)
from geoswc.gallery.files import load_gallery
from geoswc.gallery.search import Gallery
from geoswc.gallery.thumbnails import ThumbnailSettings, check_side
from geoswc.geo.cells import CellTable, build_cells, coarse_partition
from geoswc.models import compat, registry
from geoswc.models.backbone import BackboneChoice
from geoswc.models.geomodel import GeoModel
from geoswc.models.registry import BackboneSpec
from geoswc.prediction.calibration import (
    CALIBRATION_FILE,
    Abstention,
    Calibrator,
    LocalizableRule,
    fit_calibrator,
)
from geoswc.prediction.geolocator import Geolocator, resolve_model_dir
from geoswc.prediction.output import write_predictions
from geoswc.prediction.results import OutputFormat, Result, output_format
from geoswc.service.binding import check_bindable, is_loopback
from geoswc.service.settings import NO_SERVICE_CHANGES, ServiceChanges, ServiceSettings
from geoswc.training.features import Extraction, Extractor, FeatureSet, extract_and_save
from geoswc.training.finetune import finetune
from geoswc.training.indexing import GalleryPhotos, build_index
from geoswc.training.train import train_heads

log = logging.getLogger(__name__)

MAX_VIEWS = 64
"""Most views per photo a feature cache holds."""


# -- inputs ---------------------------------------------------------------------------------------------


def _geotagged(data: Photos) -> list[Record]:
    """The photos of ``data`` with their positions: a CSV's rows, or a folder's GPS-EXIF photos."""
    if data.files or data.shards or not (data.csv or data.images):
        raise InputError(
            "give geotagged photos: --data.csv FILE (image,lat,lon[,author] or a published layout) with "
            "--data.images DIR, or --data.images DIR alone (photos with GPS EXIF)"
            + (", or --data.shards" if not data.shards else "")
        )
    records, report = load_records(data.csv, data.images, data.columns)
    if not records:
        raise InputError(
            no_usable_photo(data.csv, data.images, report) if data.csv else f"{data.images} holds no usable photo"
        )
    return records


def _load_geolocator(
    model: Path | None, index: Path | None, search: SearchChanges, run: RunConfig, abstain: Abstention = Abstention()
) -> Geolocator:
    _set_threads(run)
    device = "cpu" if run.device == "auto" and run.runtime == "onnx" else distributed.resolve_device(run.device)
    geo = Geolocator.load(model, index, search=search, device=device, runtime=run.runtime)
    if geo.calibrator is None and (abstain.leave_out or abstain.within_km is not None or abstain.p is not None):
        raise SettingError(
            "abstaining needs a model with a calibrator (fit one with `geoswc calibrate`)",
            Abstention,
            "leave_out" if abstain.leave_out else "within_km" if abstain.within_km else "p",
        )
    return geo.with_settings(rule=abstain.rule(geo.rule))


def _set_threads(run: RunConfig, pipelined: bool = True) -> None:
    """Every step that computes starts here: torch's, onnxruntime's, FAISS's and BLAS's thread count from ``run``
    (``pipelined``: the step decodes photos and runs a network in threads of their own)."""
    n = threads.set_threads(run.threads, run.workers, pipelined)
    log.debug("%d compute thread(s), %d decoding worker(s)", n, run.workers)


@contextmanager
def _engine(run: RunConfig) -> Iterator[distributed.Engine]:
    """The step's engine on ``run``'s device and precision (under torchrun: its process group) for its length."""
    _set_threads(run)
    eng = distributed.start(run.device, run.precision)
    try:
        yield eng
        eng.barrier()  # every rank done before any leaves the group (a step that failed skips this)
        if eng.device.type == "cuda" and eng.is_main:
            log.info("peak GPU memory %.2f GiB (rank 0)", eng.peak_memory_gib())
    finally:
        distributed.stop()


# -- the steps -----------------------------------------------------------------------------------------


def cells(coords: Path, out: Path, cells: CellConfig = CellConfig(), columns: str | None = None) -> CellTable:
    """Build an adaptive S2 cell partition from coordinates.

    Args:
        coords: CSV with ``lat`` and ``lon`` columns (or a benchmark's published layout, any case); bad rows are
            reported and skipped.
        out: the cell table CSV to write (its thresholds go into a ``.json`` beside it).
        cells: the partition's thresholds.
        columns: the coordinate columns of another layout: ``lat=COL,lon=COL``.
    """
    _claim_cell_table(Path(out))
    lat, lon, _ = read_coordinates(coords, columns)
    with building(f"cells from {len(lat):,} coordinates"):
        table = build_cells(lat, lon, cells, progress=True)
    table.save(out)
    log.info("%d cells from %d coordinates -> %s (fingerprint %s)", len(table), len(lat), out, table.fingerprint)
    if hint := coarse_partition(len(table), len(lat), cells):
        log.warning("%s", hint)
    return table


def _claim_cell_table(out: Path) -> None:
    """A cell table is a ``.csv`` (its thresholds go in the ``.json`` beside it), never inside a model folder."""
    if out.is_dir():
        raise InputError(f"cannot write the cell table {out}: it is a directory; give a file name")
    if out.suffix.lower() != ".csv":
        raise InputError(f"name the cell table {out} with .csv (its thresholds go into {out.with_suffix('.json')})")
    kind = artifact_folders.artifact_kind(out.parent)
    if kind is not None:
        raise InputError(f"{out.parent} holds a geoswc {kind}; write the cell table elsewhere")


def features(
    out: Path,
    data: Photos = Photos(),
    backbone: BackboneChoice = BackboneChoice(),
    model: Path | None = None,
    views: int = 1,
    seed: int = 0,
    run: RunConfig = RunConfig(),
) -> FeatureSet | None:
    """Extract and cache backbone features of geotagged photos (under torchrun: split over the processes).

    Args:
        out: the feature cache folder to write.
        data: the geotagged photos: a CSV and its image folder, a folder of GPS-EXIF photos, or shards.
        backbone: the registry backbone to extract with.
        model: extract with this model's (possibly fine-tuned) backbone instead.
        views: views per photo: 1 plain + (views - 1) augmented.
        seed: seed of the augmented views.
        run: batch size, decoding processes, device and precision.

    Returns:
        The feature set (None on torchrun ranks other than 0).
    """
    if not 1 <= views <= MAX_VIEWS:
        raise SettingError(f"views must be in 1..{MAX_VIEWS}, got {views}", None, "views")
    if not 0 <= seed < 2**63:
        raise SettingError(f"seed must be in 0..2**63-1, got {seed}", None, "seed")
    artifact_folders.claim_output_folder(out, "feature cache")
    records = None if data.shards else _geotagged(data)
    with _engine(run) as eng:
        if model is not None:
            m = GeoModel.load(model)
            ex = Extractor(m.backbone, m.config.backbone, m.backbone_fingerprint)  # type: ignore[arg-type]
        else:
            ex = Extractor.from_config(backbone.resolve())
        ex.backbone.to(eng.device)
        how = Extraction(views, seed, run.batch_size, run.workers)
        fs, report = extract_and_save(out, ex, records=records, shards=data.shards, how=how)
    if fs is not None:
        log.info(
            "features of %d photos (%d view(s), %d-d) -> %s%s",
            len(fs),
            fs.views,
            fs.features.shape[2],
            out,
            f"; {len(report.skipped)} skipped" if report.skipped else "",
        )
    return fs


def train(
    features: Path,
    cells: Path,
    out: Path,
    train: TrainConfig = TrainConfig(),
    heads: HeadConfig = HeadConfig(),
    search: SearchConfig = SearchConfig(),
    data: Photos = Photos(),
    run: RunConfig = RunConfig(),
    provenance: dict[str, Any] | None = None,
) -> GeoModel:
    """Train the MvMF classifier and the retrieval module on cached features (and, with ``train.finetune``, the
    backbone end to end on photos). Re-running a killed command resumes from its last checkpoint.

    Args:
        features: the feature cache (``geoswc features``).
        cells: the cell table (``geoswc cells``).
        out: the model folder to write (checkpoints go inside).
        train: optimisation settings.
        heads: the heads' sizes.
        search: the search settings saved with the model (the defaults of ``locate`` and ``evaluate``).
        data: the photos ``train.finetune`` trains on (a CSV and its folder, or shards).
        run: decoding processes, device and precision of fine-tuning.
        provenance: free-form record of how the model was built (a recipe and its data digests), saved in it.
    """
    artifact_folders.claim_folder(out, "model")
    with _engine(run) as eng:
        log.info("verifying and loading the feature cache %s", features)  # its checksum reads it once: minutes at MP-16
        feats, table = FeatureSet.load(features), CellTable.load(cells)
        config = ModelConfig(
            backbone=feats.backbone,
            heads=heads,
            train=train,
            search=search,
            cells=table.config,
            recipe=provenance or {},
        )
        model = GeoModel.create(config, table, with_backbone=train.finetune)
        history = _fit(model, feats, data, Path(out), run)
    if not eng.is_main:
        return model
    fp = model.to("cpu").save(out)
    losses = ", ".join(f"{k} {v[-1]:.3f}" for k, v in history.items() if v and k != "mvmf_val")
    if history.get("mvmf_val"):
        best = int(min(range(len(history["mvmf_val"])), key=history["mvmf_val"].__getitem__))
        losses += f"; MvMF head of epoch {best}, held-out NLL {history['mvmf_val'][best]:.3f}"
    log.info("model %s -> %s (%d cells; final losses %s)", fp, out, len(table), losses)
    if train.finetune:
        log.info("the backbone was fine-tuned: re-embed the gallery with `geoswc index --model %s --data.csv ...`", out)
    _check_calibrator(Path(out), fp)
    return model


def _check_calibrator(folder: Path, fingerprint: str) -> None:
    """Warn when a model folder keeps the calibrator of an earlier model (loading the model will refuse it)."""
    path = folder / CALIBRATION_FILE
    try:
        stale = path.exists() and json_records.read_json(path, "calibrator").get("model") != fingerprint
    except ArtifactError:
        stale = True
    if stale:
        log.warning(
            "%s was fitted for an earlier model in %s: refit it with `geoswc calibrate --model %s ...`",
            path,
            folder,
            folder,
        )


def _fit(model: GeoModel, feats: FeatureSet, data: Photos, out: Path, run: RunConfig) -> dict[str, list[float]]:
    """The heads on the features, then (``finetune``) the whole model on the photos."""
    cfg = model.config.train
    if cfg.finetune and not data.given:
        raise InputError("train.finetune trains on photos: give --data.csv and --data.images, or --data.shards")
    history = train_heads(model, feats, cfg, checkpoint_dir=out / "checkpoint")
    if cfg.finetune:
        ckpt = out / "checkpoint-finetune"
        world = distributed.world_size()
        photos = data.shards or photo_shards(_geotagged(data), parts=world)
        history |= finetune(model, photos, cfg, ckpt, run)
    return history


def index(
    model: Path | None = None,
    out: Path | None = None,
    features: Path | None = None,
    data: Photos = Photos(),
    codes: GalleryCodes = GalleryCodes(),
    thumbnails: int = 0,
    run: RunConfig = RunConfig(),
) -> Gallery:
    """Embed a background gallery with a model and index it by the model's cells.

    Args:
        model: the model folder (default, or ``default``: the embedded model, whose index goes to ``--out``).
        out: the index folder to write (default: ``MODEL/index``; required for the embedded model, which lives in
            the installed package: then locate with ``--index OUT``); an index already there stays as it was
            until the new one is complete, then the new one replaces it whole.
        features: a feature cache made with the model's backbone (the gallery's photos); else ``data``.
        data: geotagged photos to embed (a CSV and its folder, a GPS-EXIF folder, or shards).
        codes: how FAISS codes the embeddings (``flat``: exact; ``pq``: ~``pq_bytes`` a photo in memory).
        thumbnails: store a small JPEG of each photo in the index, this many pixels on its longest side (32..512;
            128 is a good size; 0: none), to show the retrieved photos as the evidence of an estimate. Only for
            photos you may show. It reads the photos: ``--data.csv`` with ``--data.images``, a GPS-EXIF folder,
            or ``--features`` with ``--data.images`` (the cache's image ids under it); not shards.
        run: batch size and decoding processes of the extraction (and of the thumbnails).
    """
    thumbs = _thumbnail_settings(thumbnails, features, data)
    _set_threads(run, pipelined=features is None or thumbnails > 0)  # from a feature cache: coding only
    embedded, model = model is None or str(model) == "default", resolve_model_dir(model)
    if embedded and out is None:
        raise InputError(
            "give --out DIR for an index of the embedded model (its folder is inside the installed package)"
        )
    m = GeoModel.load(model, with_backbone=features is None)
    out = Path(out) if out is not None else Path(model) / "index"
    artifact_folders.claim_output_folder(out, "gallery index", inside=model)  # e.g. MODEL/index, the model's own
    if features is None and not data.given:
        raise InputError(
            "give the gallery: --features (a feature cache made with the model's backbone), or photos "
            "to embed (--data.csv with --data.images, a GPS-EXIF folder --data.images, or --data.shards)"
        )
    fs = FeatureSet.load(features) if features is not None else None
    if fs is not None:
        compat.check(m, features=fs, where=str(features))
        photos = GalleryPhotos(features=fs, images=Path(data.images) if data.images else None)
    else:
        photos = GalleryPhotos(records=None if data.shards else _geotagged(data), shards=data.shards or None)
    build_index(m, out, photos, codes, thumbs, Extraction(batch_size=run.batch_size, workers=run.workers))
    gallery = load_gallery(out)
    compat.check(m, gallery=gallery)
    held = int((gallery.cell_sizes() > 0).sum())
    outside = int((gallery.cell < 0).sum())
    log.info(
        "gallery of %d photos -> %s; %d of %d cells hold photos%s%s",
        len(gallery),
        out,
        held,
        len(m.cells),
        f", {outside} photos fall in no cell" if outside else "",
        f"; {gallery.thumbnails.count} thumbnails" if gallery.thumbnails is not None else "",
    )
    return gallery


def _thumbnail_settings(thumbnails: int, features: Path | None, data: Photos) -> ThumbnailSettings | None:
    """The settings of ``index --thumbnails`` (None: 0, none), after checking that the photos can be read."""
    if not check_side(thumbnails):
        return None
    if data.shards:
        raise SettingError(
            "thumbnails read the photos from an image folder, and shards are not supported: give "
            "--data.csv with --data.images, a GPS-EXIF folder --data.images, or --features with "
            "--data.images",
            None,
            "thumbnails",
        )
    if features is not None and not data.images:
        raise SettingError(
            "thumbnails with --features read the photos by the cache's image ids: give --data.images "
            "DIR, the folder they are in",
            None,
            "thumbnails",
        )
    return ThumbnailSettings(thumbnails)


def evaluate(
    data: Photos,
    out: Path,
    model: Path | None = None,
    index: Path | None = None,
    methods: Sequence[Method] = ("swc",),
    exclude_same_author: bool = False,
    search: SearchChanges = NO_SEARCH_CHANGES,
    benchmark: BenchmarkName | None = None,
    run: RunConfig = RunConfig(),
) -> dict[str, Any]:
    """Evaluate on geotagged photos: accuracy at 1/25/200/750/2500 km and the median error, written as
    ``metrics.json``, ``predictions.csv``, ``missing.csv``, ``accuracy.png`` and ``run.json``.

    Args:
        data: the benchmark: a CSV (``image,lat,lon[,author]`` or its published layout) and its image folder
            (default: the CSV's).
        out: the output folder.
        model: the model folder (default: the embedded model).
        index: the gallery index folder (default: ``MODEL/index``).
        methods: ``swc``, ``classification``, ``retrieval``; the first is the ``metrics.json`` contract's.
        exclude_same_author: never retrieve gallery photos by the query's author.
        search: search settings to change from the model's, e.g. ``{k: 5}``.
        benchmark: the benchmark the CSV is (``im2gps3k``, ``yfcc4k``, ``yfcc26k``, ``im2gps``, ``osv5m-test``):
            its size as published, the photos evaluated and those missing go into ``metrics.json``.
        run: batch size, decoding processes, device and backbone runtime.
    """
    check_search_changes(search)
    if not methods:
        raise SettingError(f"give at least one method: {', '.join(METHODS)}", None, "methods")
    if data.csv is None or data.files or data.shards:
        raise InputError(
            "evaluate reads a benchmark CSV: give --data.csv FILE (image,lat,lon[,author]) and --data.images DIR"
        )
    artifact_folders.claim_output_folder(out, "evaluation")  # a bad output folder fails now, not after the inference
    records, report = read_photo_csv(data.csv, data.images, columns=data.columns)
    bench = BENCHMARKS[benchmark] if benchmark else None
    if not records:
        _nothing_to_evaluate(Path(out), data.csv, report, bench)
    geo = _load_geolocator(model, index, search, run)
    results, decode = locate_records(geo, records, methods, exclude_same_author, run.batch_size, run.workers)
    counts, gap = benchmark_counts(bench, report.total, len(results[0].names), str(data.csv)) if bench else (None, "")
    metrics = write_evaluation(
        out,
        geo,
        results,
        report.skipped + decode.skipped,
        {
            "title": Path(data.csv).name,
            "csv": str(data.csv),
            "images": str(data.images) if data.images else None,
            "columns": data.columns,
            "benchmark": benchmark,
            "exclude_same_author": exclude_same_author,
        },
        counts,
        gap,
    )
    log.info(
        "%s\n-> %s, predictions.csv, missing.csv, breakdown.csv, accuracy.png, reliability.png, selective.png, "
        "errors_map.png",
        format_metrics(metrics),
        Path(out) / "metrics.json",
    )
    return metrics


def _nothing_to_evaluate(out: Path, csv: Path, report: LoadReport, bench: Benchmark | None) -> None:
    """Refuse an evaluation over no photo: name every missing one in ``out/missing.csv`` when ``out`` is a new or
    empty folder (what an earlier run wrote stays as it was) and say how many a named benchmark expected."""
    counts, gap = benchmark_counts(bench, report.total, 0, str(csv)) if bench else ({}, "")
    named = ""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        atomic_files.ensure_dir(out)
        atomic_files.write_text(out / "missing.csv", missing_csv(report.skipped, gap))
        named = f"; every missing photo is named in {out / 'missing.csv'}"
    expected = (
        f" ({bench.name}: {counts['expected']} photos expected as published, 0 evaluated, {counts['missing']} missing)"
        if bench
        else ""
    )
    raise InputError(f"no photo of {csv} can be evaluated{expected}{named}: {report.summary(first=3)}")


def calibrate(
    model: Path,
    features: Path | None = None,
    folds: int = 5,
    report: Path | None = None,
    data: Photos = Photos(),
    index: Path | None = None,
    exclude_same_author: bool = False,
    rule: LocalizableRule = LocalizableRule(),
    run: RunConfig = RunConfig(),
) -> Calibrator:
    """Fit a model's calibrator (``MODEL/calibration.json``): the probabilities ``within_km`` each prediction
    carries, learnt on photos of photographers the model did not train on, and the rule that says which
    predictions are localizable. The model's weights and fingerprint do not change.

    Args:
        model: the model folder; the calibrator is written into it.
        features: out-of-fold: the model's training features (``geoswc features``); the heads are retrained with
            the model's settings on ``folds`` author-disjoint folds and each fold is located by the heads that did
            not see its photographers.
        folds: the number of author-disjoint folds of ``features``.
        report: with ``features``, write here how well such a calibrator does on photographers it did not see
            (each fold calibrated on the other folds' predictions): ``calibration.json`` with ``geoswc evaluate``'s
            calibration and selective blocks (and its table, ``calibration.md``), ``reliability.png`` and
            ``selective.png``.
        data: or a labelled set the model did not train on (``--data.csv`` and ``--data.images``), located with the
            model itself and its gallery.
        index: the gallery index folder of ``data`` (default: ``MODEL/index``).
        exclude_same_author: with ``data``: never retrieve gallery photos by the query's author.
        rule: the localizable rule saved with the calibrator.
        run: batch size, decoding processes and device.
    """
    if report is not None and features is None:
        raise SettingError("report needs --features (the out-of-fold calibration)", None, "report")
    if report is not None:
        artifact_folders.claim_folder(report, "calibration report")
    if (features is None) == (not data.given):
        raise InputError(
            ("give the photos to calibrate on, one of: " if features is None else "give one of, not both: ")
            + "--features (the model's training features, out of fold) or --data.csv with --data.images "
            "(a labelled set the model did not train on)"
        )
    _set_threads(run)
    m = GeoModel.load(model, with_backbone=features is None)
    if features is not None:
        per_method, fitted = _out_of_fold_signals(m, features, folds, report)
    else:
        per_method, fitted = _labelled_signals(m, data, Path(index or Path(model) / "index"), exclude_same_author, run)
    cal = fit_calibrator(m.fingerprint, per_method, rule, to_dict(m.config.search), fitted)
    cal.save(Path(model) / CALIBRATION_FILE)
    for line in cal.constant_thresholds():
        log.warning("calibrator %s: its probability for that threshold is a constant; calibrate on more photos", line)
    log.info(
        "calibrator %s for model %s (%s, %d photos; localizable: %s) -> %s",
        cal.fingerprint,
        m.fingerprint,
        fitted["how"],
        fitted["n"],
        rule.describe(),
        Path(model) / CALIBRATION_FILE,
    )
    return cal


def _out_of_fold_signals(
    m: GeoModel, features: Path, folds: int, report: Path | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    fs = FeatureSet.load(features)
    compat.check(m, features=fs, where=str(features))
    per_method, fitted = out_of_fold_signals(
        fs, m, folds, atomic_files.ensure_dir(report) if report is not None else None
    )
    cross = fitted["cross_fitted"]
    if report is not None:
        atomic_files.write_report(
            report / "calibration.json",
            {"model": m.fingerprint, "features": str(features), **cross},
            report_markdown(cross),
        )
    ece = "  ".join(
        f"{k} km {v:.3f}" if v is not None else f"{k} km n/a" for k, v in cross["calibration"]["ece"].items()
    )
    log.info("cross-fitted (each fold calibrated on the others), expected calibration error: %s", ece)
    return per_method, fitted


def _labelled_signals(
    m: GeoModel, data: Photos, index: Path, exclude_same_author: bool, run: RunConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    if data.csv is None or data.files or data.shards:
        raise InputError(
            "calibrate reads a labelled CSV: give --data.csv FILE (image,lat,lon[,author]) and --data.images DIR"
        )
    records, report = read_photo_csv(data.csv, data.images, columns=data.columns)
    if not records:
        raise InputError(no_usable_photo(data.csv, data.images, report))
    gallery = load_gallery(index) if (index / "index.json").is_file() else None
    geo = Geolocator(m, gallery, device=distributed.resolve_device(run.device))  # no calibrator: it is being fitted
    per_method, n = labelled_signals(geo, records, exclude_same_author, run.batch_size, run.workers)
    return per_method, {"how": f"labelled set {Path(data.csv).name}", "n": n}


@dataclass(frozen=True)
class LocateSummary:
    """How a batch went: photos located, and photos that could not be (each reported on the way)."""

    located: int
    failed: int
    left_out: int = 0
    """Located but left out of the output as not localizable (``--abstain.leave_out``)."""

    @property
    def exit_status(self) -> int:
        """The command's exit status: 1 when some photo failed."""
        return 1 if self.failed else 0


def locate(
    data: Photos = Photos(),
    model: Path | None = None,
    index: Path | None = None,
    method: Method = "swc",
    search: SearchChanges = NO_SEARCH_CHANGES,
    abstain: Abstention = Abstention(),
    output: Path | None = None,
    format: OutputFormat | None = None,
    run: RunConfig = RunConfig(),
) -> LocateSummary:
    """Estimate where photos were taken; a photo that cannot be read is reported and the rest are finished.

    Args:
        data: the photos: files or folders, a CSV naming them (with its image folder), or shards.
        model: the model folder (default: the embedded model).
        index: the gallery index folder (default: ``MODEL/index``).
        method: ``swc`` (search within the chosen cell), ``classification`` or ``retrieval``.
        search: search settings to change from the model's, e.g. ``{k: 5}``.
        abstain: which photos are localizable (default: the rule saved with the model's calibrator), and whether
            the output leaves the others out; every prediction is marked ``localizable`` either way.
        output: write the results to this file (atomically; not inside a model, index or other geoswc artifact
            folder); default: standard output.
        format: ``text``, ``jsonl``, ``csv`` or ``geojson`` (default: from the output's extension, else text).
        run: batch size, decoding processes, device and backbone runtime.
    """
    check_search_changes(search)
    if output is not None:
        artifact_folders.claim_output(output)  # a bad output path fails now, before the model is loaded
    fmt = output_format(output, format)
    source = _photo_source(data, _load_geolocator(model, index, search, run, abstain), method, run)
    progress = output is not None or (fmt == "text" and (source.count is None or source.count > 8))
    w = write_predictions(
        source.results(progress), output, fmt, abstain.leave_out, lambda f: log.warning("error: %s", f.error)
    )
    failed = w.failed + source.skipped  # rows of a list that name no usable photo fail too
    left = f", {w.left_out} not localizable left out" if w.left_out else ""
    if output is not None and (w.located or w.left_out):
        log.info(
            "%s located%s%s -> %s (%s)", _photos(w.located), left, f", {failed} failed" if failed else "", output, fmt
        )
    elif failed:
        log.warning("%d of %d photos could not be located", failed, failed + w.located + w.left_out)
    if output is None and w.left_out:
        log.warning("%s not localizable and left out", _photos(w.left_out, "was", "were"))
    return LocateSummary(w.located, failed, w.left_out)


def _photos(n: int, singular: str = "", plural: str = "") -> str:
    """``n`` photo(s), with the verb that agrees: ``1 photo``, ``3 photos``, ``1 photo was``."""
    return f"{n} photo{'' if n == 1 else 's'}" + (f" {singular if n == 1 else plural}" if singular else "")


@dataclass(frozen=True)
class _PhotoSource:
    """The photos a ``locate`` reads: their results (with or without a progress bar), how many there are
    (None: not known ahead, shards), and how many rows of a list were skipped before locating."""

    results: Callable[[bool], Iterator[Result]]
    count: int | None
    skipped: int = 0


def _photo_source(data: Photos, geo: Any, method: Method, run: RunConfig) -> _PhotoSource:
    kw: dict[str, Any] = dict(method=method, batch_size=run.batch_size, num_workers=run.workers)
    if data.shards:
        return _PhotoSource(lambda progress: geo.locate_shards(data.shards, progress=progress, **kw), None)
    if data.csv:
        records, report = read_photo_csv(data.csv, data.images, positions=False, columns=data.columns)
        if not records:
            raise InputError(no_usable_photo(data.csv, data.images, report))
        return _PhotoSource(
            lambda progress: geo.locate_batch(
                [r.path for r in records], progress=progress, names=[r.image for r in records], **kw
            ),
            len(records),
            len(report.skipped),
        )
    given = data.files or ([data.images] if data.images else [])
    if not given:
        raise InputError("give photo files or folders, --data.csv FILE (with --data.images DIR) or --data.shards")
    photos: list[Path] = []
    for item in map(Path, given):
        found = find_photos(item) if item.is_dir() else [item]
        if not found:
            raise InputError(f"no photos found in {item}; give image files or folders holding them")
        photos += found
    return _PhotoSource(lambda progress: geo.locate_batch(photos, progress=progress, **kw), len(photos))


def shards(
    data: Photos, out: Path, samples_per_shard: int = 1000, verify: bool = True, run: RunConfig = RunConfig()
) -> list[Path]:
    """Pack geotagged photos into WebDataset tar shards (each photo as stored, plus a ``.json`` of its position).

    Args:
        data: a CSV (``image,lat,lon[,author]`` or a published layout) and its image folder, or a folder of
            GPS-EXIF photos.
        out: the folder for ``shard-%06d.tar`` and ``shards.json``.
        samples_per_shard: photos per shard.
        verify: decode every photo first and skip those that fail.
        run: reading processes (``workers``).
    """
    if not 1 <= samples_per_shard <= 2**31:
        raise SettingError(f"samples_per_shard must be in 1..2**31, got {samples_per_shard}", None, "samples_per_shard")
    artifact_folders.claim_folder(out, "shard set")  # a bad output folder fails now, before the photos are read
    paths, report = write_shards(
        _geotagged(data),
        out,
        samples_per_shard,
        verify=verify,
        num_workers=run.workers,
        source=str(data.csv or data.images),
    )
    log.info(
        "%d photos in %d shards -> %s%s",
        report.kept,
        len(paths),
        out,
        f"; {len(report.skipped)} skipped" if report.skipped else "",
    )
    return paths


def compare(
    out: Path, runs: Sequence[Path] = (), names: Sequence[str] = (), resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Compare systems photo for photo: accuracy at 1/25/200/750/2500 km and the median error over the photos they
    all share, each system's difference from the first with a 95 % paired-bootstrap interval, and how many photos
    each lacks; printed, and written as ``compare.json``, ``compare.md``, ``compare.png`` and ``errors_maps.png``.

    Args:
        out: the folder to write the comparison into.
        runs: geoswc evaluation folders (their ``predictions.csv``) or per-photo prediction files (geoswc's, or
            GeoEstimation's as published, summary block included); the first is the reference.
        names: the systems' names, in order (default: each file or folder name without its extension).
        resamples: bootstrap resamples of the shared photos.
        seed: the bootstrap's seed.
    """
    if len(runs) < 2:
        raise InputError("give at least two evaluation folders or prediction files to compare")
    if names and len(names) != len(runs):
        raise SettingError(f"names must name each of the {len(runs)} systems, got {len(names)}", None, "names")
    if not 100 <= resamples <= 100_000:
        raise SettingError(f"resamples must be in 100..100000, got {resamples}", None, "resamples")
    if not 0 <= seed < 2**63:
        raise SettingError(f"seed must be in 0..2**63-1, got {seed}", None, "seed")
    artifact_folders.claim_output_folder(out, "comparison")
    systems = [read_system(Path(r), names[i] if names else None) for i, r in enumerate(runs)]
    taken = [s.name for s in systems]
    if len(set(taken)) < len(taken):
        raise SettingError(f"two systems are named alike ({', '.join(taken)}); name them with --names", None, "names")
    result, text = write_comparison(Path(out), systems, resamples, seed)
    log.info("%s\n-> %s, compare.md, compare.png, errors_maps.png", text, Path(out) / "compare.json")
    return result


def backbones() -> list[BackboneSpec]:
    """List the backbones: family, feature width, input size and resize policy, parameters, pooled output, and
    where their weights come from (CLIP, DINOv2 and SigLIP need ``pip install 'geoswc[hf]'``)."""
    log.info(
        "%-20s %-17s %6s %6s %-11s %8s  %-38s %s",
        "name",
        "family",
        "dim",
        "px",
        "resize",
        "params",
        "pooled output",
        "weights",
    )
    for _, spec in registry.REGISTRY.items():
        pooled = registry.BUILDERS[spec.family].pooled
        log.info(
            "%-20s %-17s %4d-d %3d px %-11s %7.1fM  %-38s %s",
            spec.name,
            spec.family,
            spec.feature_dim,
            spec.image_size,
            spec.resize,
            spec.params_m,
            pooled,
            spec.source,
        )
    return list(registry.REGISTRY.values())


def serve(
    model: Path | None = None,
    index: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    service: ServiceChanges = NO_SERVICE_CHANGES,
    run: RunConfig = RunConfig(),
) -> None:
    """Run the web service (``POST /api/locate``, ``GET /api/health``, OpenAPI at ``/docs``) and its map page
    at ``/``, until interrupted. Limits come from ``GEOSWC_*`` environment variables, then ``service``.

    Args:
        model: the model folder (default: the embedded model).
        index: the gallery index folder (default: ``MODEL/index``).
        host: interface to bind; keep localhost unless behind a proxy (set a token otherwise).
        port: TCP port (0 picks a free one).
        service: limits and options to change, e.g. ``{max_queue: 1}`` (see :class:`ServiceSettings`).
        run: device and backbone runtime.
    """
    from geoswc.service.app import run_server  # lazy: FastAPI costs ~0.3 s, needed only by serve

    if not 0 <= port <= 65535:
        raise SettingError(f"port must be in 0..65535, got {port}", None, "port")
    settings = ServiceSettings.from_env(**service)
    check_bindable(host, port)  # before loading the model: a busy port is one line, at once
    geo = _load_geolocator(model, index, NO_SEARCH_CHANGES, run)  # run_server applies the limits of settings
    if not is_loopback(host) and not settings.token:
        log.warning("serving on %s without a token: anyone who can reach it can use it (set GEOSWC_TOKEN)", host)
    log.info(
        "serving model %s (gallery of %d photos) on http://%s:%d",
        geo.fingerprint,
        len(geo.gallery) if geo.gallery is not None else 0,
        host,
        port,
    )
    run_server(geo, settings, host, port)


@dataclass(frozen=True)
class SplitSummary:
    """An author-disjoint split: photos and photographers on each side."""

    train_photos: int
    test_photos: int
    train_authors: int
    test_authors: int


def split(data: Photos, out: Path, test: float = 0.25, seed: int = 0) -> SplitSummary:
    """Split a CSV of photos into ``OUT/train.csv`` and ``OUT/test.csv`` with no photographer on both sides, so that
    an evaluation never sees the photographers a model learnt from (their photos of one place are near duplicates).

    Args:
        data: the CSV (``--data.csv``, any layout ``--data.columns`` maps; ``--data.images`` to skip rows whose
            photo is missing).
        out: the folder to write ``train.csv`` and ``test.csv`` into (``image,lat,lon,author``).
        test: the share of photographers drawn for the test side (a photo without an author counts as its own).
        seed: the draw's seed.
    """
    if not (isinstance(test, float | int) and 0 < test < 1):
        raise SettingError(f"test must be a share of the photographers in (0, 1), got {test}", None, "test")
    if data.csv is None:
        raise InputError("give the photos to split: --data.csv FILE (image,lat,lon,author)")
    records, report = read_photo_csv(data.csv, data.images, check_images=data.images is not None, columns=data.columns)
    if not records:
        raise InputError(no_usable_photo(data.csv, data.images, report))
    if not any(r.author for r in records):
        log.warning("%s has no author column: every photo counts as a photographer of its own", data.csv)
    train_side, test_side = write_author_split(records, Path(out), test, seed)
    s = SplitSummary(
        len(train_side), len(test_side), *(len({r.author or r.image for r in x}) for x in (train_side, test_side))
    )
    log.info(
        "%d photos -> %s (%d photos, %d photographers) and test.csv (%d photos, %d photographers); none on both",
        len(records),
        Path(out) / "train.csv",
        s.train_photos,
        s.train_authors,
        s.test_photos,
        s.test_authors,
    )
    return s


COMMANDS = {
    "locate": locate,
    "cells": cells,
    "features": features,
    "train": train,
    "index": index,
    "calibrate": calibrate,
    "evaluate": evaluate,
    "compare": compare,
    "shards": shards,
    "split": split,
    "backbones": backbones,
    "serve": serve,
}
"""The ``geoswc`` commands, in the order ``--help`` lists them."""
