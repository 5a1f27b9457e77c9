"""Typed configuration. Every saved artifact stores the resolved config it was made with, as JSON.

Configs are frozen: a changed setting is a new object (``dataclasses.replace``), never an edit in place.
"""

from __future__ import annotations

import hashlib
import json
import math
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal, TypedDict, TypeVar

from geoswc.core.errors import ArtifactError, SettingError
from geoswc.core.sphere import HALF_EARTH_KM

T = TypeVar("T")

Method = Literal["swc", "classification", "retrieval"]
"""How a photo is located: search within the chosen cell (the paper), the chosen cell's centroid, or
the clustering of the top-k neighbours of the whole gallery."""
METHODS: tuple[str, ...] = typing.get_args(Method)

LATER: types.MappingProxyType[str, Any] = types.MappingProxyType({"omit_default": True})
"""``field(default=..., metadata=LATER)``: a field added after format 1. :func:`to_dict` leaves it out while it
holds its default, so that configs which do not use it serialise, and digest, exactly as before it existed."""


def check_field(obj: Any, name: str, ok: bool, rule: str) -> None:
    """Raise :class:`SettingError` naming ``obj``'s field ``name`` unless ``ok``."""
    if not ok:
        raise SettingError(f"{name} {rule}, got {getattr(obj, name)!r}", type(obj), name)


def check_ints(obj: Any) -> None:
    """Every number field of ``obj`` holds a number of its type (:func:`check_numbers`) and every whole-number
    field fits in 64 bits, as NumPy, PyTorch and the files need."""
    check_numbers(obj)
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, int) and not isinstance(v, bool):
            check_field(obj, f.name, -(2**63) <= v < 2**63, "must fit in 64 bits")


def check_numbers(obj: Any) -> None:
    """Every ``int`` field of ``obj`` holds a whole number and every ``float`` field a number (never a bool, a
    string or, for an ``int``, a fraction): a value handed over in Python is refused before it is used."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        v, hint = getattr(obj, f.name), hints.get(f.name)
        if hint is int and (isinstance(v, bool) or not isinstance(v, int)):
            check_field(obj, f.name, False, "must be a whole number")
        if hint is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            check_field(obj, f.name, False, "must be a number")


def _finite(v: float, low: float = 0.0, strict: bool = False) -> bool:
    return math.isfinite(v) and (v > low if strict else v >= low)


def check_distance(obj: Any, name: str, strict: bool = False) -> None:
    """Raise :class:`SettingError` unless ``obj``'s field ``name`` is a distance in km, ``>= 0`` (``> 0`` when
    ``strict``) and at most half the Earth's circumference: no distance setting needs more."""
    v = getattr(obj, name)
    check_field(
        obj,
        name,
        _finite(v, strict=strict) and v <= HALF_EARTH_KM,
        f"must be a number {'>' if strict else '>='} 0 and at most {HALF_EARTH_KM:.0f} km (half the Earth's "
        "circumference)",
    )


@dataclass(frozen=True)
class CellConfig:
    """Adaptive S2 partition (PlaNet): split the fullest cell while it holds more than ``max_per_cell``
    points, then drop cells holding fewer than ``min_per_cell``."""

    max_per_cell: int = 1000
    """A cell with more points than this is split into its four children."""
    min_per_cell: int = 50
    """Cells with fewer points than this are dropped."""
    max_level: int = 20
    """Cells are never split below this S2 level (level 20 is about 10 m across)."""

    def __post_init__(self) -> None:
        check_ints(self)
        check_field(self, "min_per_cell", self.min_per_cell >= 1, "must be >= 1")
        check_field(
            self,
            "max_per_cell",
            self.max_per_cell >= self.min_per_cell,
            f"must be >= min_per_cell ({self.min_per_cell})",
        )
        check_field(self, "max_level", 0 <= self.max_level <= 30, "must be in 0..30 (S2 levels)")


@dataclass(frozen=True)
class Preprocess:
    """How a decoded RGB image becomes the backbone's input tensor."""

    image_size: int = 224
    """Side of the square input, in pixels."""
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: Literal["center_crop", "squash"] = "center_crop"
    """``center_crop``: shorter side to ``image_size``, then the central square; ``squash``: the whole
    image resized to a square (keeps everything, distorts the aspect ratio)."""
    crop_fraction: float = field(default=1.0, metadata=LATER)
    """Share of the resized image's side kept by the evaluation crop (timm's ``crop_pct``): the image is first
    resized to ``round(image_size / crop_fraction)`` (the shorter side, or the whole square for ``squash``),
    then the central ``image_size`` square is kept. 1.0: no margin cut away."""
    interpolation: Literal["bicubic", "bilinear"] = field(default="bicubic", metadata=LATER)
    """The PIL resampling of the resizes, at evaluation and in the training augmentation."""

    def __post_init__(self) -> None:
        check_field(self, "resize", self.resize in ("center_crop", "squash"), "must be 'center_crop' or 'squash'")
        check_field(self, "image_size", 32 <= self.image_size <= 1024, "must be in 32..1024")
        check_field(
            self,
            "crop_fraction",
            _is_number(self.crop_fraction) and 0.5 <= self.crop_fraction <= 1.0,
            "must be a number in [0.5, 1]",
        )
        check_field(
            self, "interpolation", self.interpolation in ("bicubic", "bilinear"), "must be 'bicubic' or 'bilinear'"
        )


@dataclass(frozen=True)
class BackboneConfig:
    """Which feature extractor, with which weights and preprocessing (resolved: digest and width known)."""

    name: str = "efficientnet-lite0"
    weights: str = "default"
    """``default``: the registry's ImageNet weights (from a wheel, or downloaded for B0-B7);
    ``none``: random init; otherwise a local ``.pth``/``.safetensors`` state dict."""
    weights_sha256: str = ""
    """Digest of the initial weights file, filled in when the backbone is created."""
    feature_dim: int = 0
    """Width of the pooled features, filled in from the registry."""
    preprocess: Preprocess = field(default_factory=Preprocess)


@dataclass(frozen=True)
class HeadConfig:
    """Sizes of the MvMF classifier and the Residual Retrieval Module."""

    mvmf_hidden: int = 0
    """0: mixture weights are a linear function of the features (as in the paper); >0: one hidden layer of this
    width, at most 16384 (its weights take ``width x (features + cells)`` floats)."""
    mvmf_dropout: float = 0.2
    """Dropout on the features before the MvMF layer, during training."""
    rrm_hidden: int = 0
    """Width of the RRM's inner layer, at most 16384 (its weights take ``2 x width x features`` floats); 0 means
    the feature width."""

    def __post_init__(self) -> None:
        check_ints(self)
        for name in ("mvmf_hidden", "rrm_hidden"):  # bounded before any layer of that size is allocated
            check_field(self, name, 0 <= getattr(self, name) <= 16_384, "must be in 0..16384")
        check_field(self, "mvmf_dropout", 0 <= self.mvmf_dropout < 1, "must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of the heads (and, with ``finetune``, of the backbone)."""

    epochs: int = 10
    """Passes over the training photos of the MvMF phase."""
    rrm_epochs: int = 30
    """Passes over the training photos of the RRM phase."""
    val_fraction: float = 0.0
    """Share of the photographers held out of the MvMF phase to choose its epoch: the head kept is the one
    (untrained included) with the lowest negative log-likelihood on their photos. 0: no hold-out, the
    head of the last epoch is kept."""
    batch_size: int = 128
    """Photos per optimisation step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW, linear warm-up then cosine decay)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    seed: int = 0
    """Seed of every random choice (shuffling, pairs, dropout): equal seeds, equal models."""
    positive_km: float = 25.0
    """Contrastive positives: two photos taken within this distance (km), or two views of one photo."""
    temperature: float = 0.07
    """InfoNCE temperature."""
    same_author_positives: bool = False
    """Whether two photos of one author count as positives. Off by default: the retrieval module should
    learn places, not photographers (same-author pairs are ignored, neither positive nor negative)."""
    finetune: bool = False
    """Also train the backbone end to end (slow on CPU)."""
    finetune_epochs: int = 3
    """Epochs of end-to-end fine-tuning."""
    finetune_lr: float = 1e-4
    """Peak learning rate of the backbone while fine-tuning (the heads get 10x)."""
    finetune_blocks: int = 0
    """0: fine-tune the whole backbone; N: only its last N blocks and the layers after them (the stem and the
    earlier blocks stay frozen): cheaper, and safer for large pretrained backbones such as CLIP ViT-L/14."""
    checkpoint_every: int = 1
    """Save a checkpoint every this many epochs (fine-tuning)."""
    max_steps: int = 0
    """0: every epoch sees all the photos. >0: an epoch stops after this many steps (smoke runs, scale rehearsals)."""

    def steps(self, per_epoch: int) -> int:
        """The optimisation steps of an epoch that would take ``per_epoch``, with :attr:`max_steps` applied."""
        return min(per_epoch, self.max_steps) if self.max_steps > 0 else per_epoch

    def __post_init__(self) -> None:
        check_ints(self)
        for name in ("epochs", "rrm_epochs", "finetune_epochs", "finetune_blocks", "max_steps"):
            check_field(self, name, getattr(self, name) >= 0, "must be >= 0")
        for name in ("batch_size", "checkpoint_every"):
            check_field(self, name, getattr(self, name) >= 1, "must be >= 1")
        check_field(self, "batch_size", self.batch_size <= 2**20, "must be at most 2**20")
        check_field(self, "val_fraction", 0.0 <= self.val_fraction < 1.0, "must be in [0, 1)")
        for name in ("lr", "finetune_lr", "temperature"):
            check_field(self, name, _finite(getattr(self, name), strict=True), "must be a positive number")
        check_field(self, "weight_decay", _finite(self.weight_decay), "must be a number >= 0")
        check_distance(self, "positive_km")
        check_field(self, "seed", 0 <= self.seed < 2**63, "must be in 0..2**63-1")


@dataclass(frozen=True)
class SearchConfig:
    """Search within cell: the paper's defaults."""

    k: int = 10
    """Gallery neighbours retrieved inside the chosen cell."""
    eps_km: float = 1.0
    """DBSCAN radius (haversine), km."""
    min_samples: int = 1
    """DBSCAN core-point threshold (1: every neighbour starts a cluster)."""
    r_km: float = 25.0
    """Prediction density radius: confidence is the probability mass of cells within r_km."""
    top_cells: int = 5
    """How many of the most probable cells a prediction lists."""
    select_km: float = 0.0
    """0: search the most probable cell (the paper). >0: search the cell with the most probability mass
    within select_km of its centroid, the Bayes-optimal choice for accuracy at that radius when the
    classifier's probability is spread over many small cells."""
    search_km: float = 0.0
    """0: retrieve from the chosen cell only (the paper). >0: also from the cells whose centroids lie within
    search_km of the chosen cell's (its neighbours)."""

    def __post_init__(self) -> None:
        check_ints(self)
        check_field(self, "k", 1 <= self.k <= 10_000, "must be in 1..10000")
        check_distance(self, "eps_km", strict=True)
        check_field(
            self,
            "min_samples",
            1 <= self.min_samples <= self.k,
            f"must be in 1..k ({self.k}): DBSCAN would call every neighbour noise",
        )
        for name in ("r_km", "select_km", "search_km"):
            check_distance(self, name)
        check_field(self, "top_cells", 1 <= self.top_cells <= 10_000, "must be in 1..10000")


CodeKind = Literal["flat", "sq8", "pq", "opq"]


@dataclass(frozen=True)
class GalleryCodes:
    """How a gallery index codes its embeddings for FAISS (saved with the index).

    ``flat`` keeps the float16 vectors (exact; 2 bytes a dimension in memory), ``sq8`` one byte a dimension,
    ``pq`` ``pq_bytes`` a vector, ``opq`` the same after a learned rotation. The coded kinds re-score a short
    list exactly from the float16 vectors, which stay on disk (memory-mapped).
    """

    kind: CodeKind = "flat"
    pq_bytes: int = 128
    """Bytes of a ``pq``/``opq`` code (sub-vectors of 256 centroids each); must divide the embedding width."""
    rerank: int = 100
    """Candidates of a coded search re-scored exactly."""
    train_rows: int = 65_536
    """Rows sampled from the gallery to train the quantiser (held in memory as float32 while it trains), at most
    1048576: FAISS's k-means and OPQ use 65,536 at most. ``opq`` needs at least as many as the embeddings have
    dimensions."""
    seed: int = 0
    """Seed of the training sample and of the quantiser's k-means."""

    def __post_init__(self) -> None:
        check_ints(self)
        check_field(self, "kind", self.kind in typing.get_args(CodeKind), f"must be one of {typing.get_args(CodeKind)}")
        check_field(self, "pq_bytes", 1 <= self.pq_bytes <= 4096, "must be in 1..4096")
        check_field(self, "rerank", 1 <= self.rerank <= 100_000, "must be in 1..100000")
        check_field(self, "train_rows", 256 <= self.train_rows <= 1_048_576, "must be in 256..1048576")
        check_field(self, "seed", 0 <= self.seed < 2**31, "must be in 0..2**31-1")


SearchChanges = TypedDict("SearchChanges", typing.get_type_hints(SearchConfig), total=False)  # type: ignore[misc]
"""Some fields of :class:`SearchConfig` to change (``{"k": 5}``); the others keep a model's saved values."""
NO_SEARCH_CHANGES: SearchChanges = {}
"""The default of a ``search`` parameter: keep the model's settings (never mutated)."""


def check_search_changes(changes: SearchChanges) -> SearchChanges:
    """``changes``, each value checked by :class:`SearchConfig`'s rules before any model is loaded (the rule
    that ties two fields, ``min_samples <= k``, is checked when they meet a model's values).

    Raises:
        SettingError: naming the field.
    """
    for name, value in changes.items():
        replace(SearchConfig(k=10_000) if name == "min_samples" else SearchConfig(), **{name: value})
    return changes


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a trained model's modules and interpret its outputs."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    cells: CellConfig | None = None
    """Thresholds the cell table was built with (``None`` when the table came without them)."""
    cells_fingerprint: str = ""
    num_cells: int = 0
    backbone_finetuned: bool = False
    recipe: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance: the recipe and data digests the model was built from."""


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a JSON-ready dict (tuples become lists), recursing into nested dataclasses.

    A field marked :data:`LATER` (added after format 1) is left out while it equals its default: configs that
    do not use it serialise, and digest, exactly as before; :func:`from_dict` restores the default."""
    return json.loads(json.dumps(_plain(obj)))


def _plain(obj: Any) -> Any:
    """``obj`` with its dataclasses as dicts (less their :data:`LATER` fields at the default), as ``asdict``."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: _plain(getattr(obj, f.name)) for f in fields(obj) if not _at_later_default(f, getattr(obj, f.name))
        }
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _at_later_default(f: Field[Any], value: Any) -> bool:
    """Whether field ``f`` is marked :data:`LATER` and ``value`` is its default."""
    if not f.metadata.get("omit_default"):
        return False
    default = f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default
    return default is not MISSING and bool(value == default)


def non_default(obj: Any) -> dict[str, Any]:
    """The fields of a flat config dataclass that differ from their defaults, JSON-ready.

    Digests of this (training checkpoints' run keys) stay valid when a later version adds a field
    whose default keeps the old behaviour."""
    default = to_dict(type(obj)())
    return {k: v for k, v in to_dict(obj).items() if k not in default or v != default[k]}


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from a dict, recursing into nested dataclasses.

    Raises:
        ArtifactError: on unknown keys or wrong types, naming the key.
    """
    if not isinstance(data, dict):
        raise ArtifactError(f"expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - known
    if unknown:
        raise ArtifactError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {name: _coerce(hints[name], value, f"{cls.__name__}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"invalid {cls.__name__}: {e}") from e


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` read from JSON as type ``tp``, or an :class:`ArtifactError` naming ``where``: a saved config is
    checked field by field, never trusted to hold the types it claims."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if is_dataclass(tp):
        return from_dict(tp, value)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(tp, args, value, where)
    if origin is tuple:
        return _coerce_number_tuple(args, value, where)
    if origin is Literal:
        return _coerce_literal(args, value, where)
    if origin is dict or tp is dict:
        return _coerce_object(value, where)
    return _coerce_scalar(tp, value, where)


def _coerce_union(tp: Any, args: tuple[Any, ...], value: Any, where: str) -> Any:
    """``value`` as the first member of union ``tp`` (with members ``args``) that accepts it; None for Optional."""
    if value is None and type(None) in args:
        return None
    for arg in (a for a in args if a is not type(None)):
        try:
            return _coerce(arg, value, where)
        except ArtifactError:
            continue
    raise ArtifactError(f"{where}: {value!r} is none of {tp}")


def _coerce_number_tuple(args: tuple[Any, ...], value: Any, where: str) -> tuple[float, ...]:
    """A JSON list of ``len(args)`` numbers as a tuple of floats."""
    if not (isinstance(value, list) and len(value) == len(args) and all(_is_number(v) for v in value)):
        raise ArtifactError(f"{where}: expected a list of {len(args)} numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _coerce_literal(args: tuple[Any, ...], value: Any, where: str) -> Any:
    """``value`` when it is one of the Literal's ``args``."""
    if value not in args:
        raise ArtifactError(f"{where}: expected one of {list(args)}, got {value!r}")
    return value


def _coerce_object(value: Any, where: str) -> dict[str, Any]:
    """``value`` when it is a JSON object."""
    if not isinstance(value, dict):
        raise ArtifactError(f"{where}: expected an object, got {value!r}")
    return value


def _coerce_scalar(tp: Any, value: Any, where: str) -> Any:
    """``value`` as a float for ``float`` (ints widen); an int (not a bool), str or bool checked; else as is."""
    if tp is float:
        if not _is_number(value):
            raise ArtifactError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ArtifactError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def canonical_json(data: Any) -> str:
    """Deterministic JSON used for digests."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def digest(*parts: str | bytes, length: int = 16) -> str:
    """Short sha256 hex digest of the concatenated parts."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()[:length]


Precision = Literal["auto", "fp32", "bf16", "fp16"]
Runtime = Literal["torch", "onnx"]
MAX_WORKERS = 1024
"""More ``workers`` than this is refused; more than the machine's cores is capped
(see :func:`geoswc.data.records.loader`)."""


@dataclass(frozen=True)
class RunConfig:
    """How a command runs: batch size, decoding processes, compute threads, device and mixed precision."""

    batch_size: int = 16
    """Photos per inference or extraction batch (training batches are ``train.batch_size``)."""
    workers: int = 0
    """Decoding processes (0: decode in the main process)."""
    device: str = "auto"
    """``auto`` (``cuda:LOCAL_RANK`` when a GPU is present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    precision: Precision = "auto"
    """Lightning Fabric's precision: ``fp32`` (``32-true``), ``bf16`` (``bf16-mixed``, also on a CPU), ``fp16``
    (``16-mixed``, GPUs only); ``auto``: bf16 on GPUs that have it, else fp16; fp32 on a CPU."""
    runtime: Runtime = "torch"
    """Backbone runtime for locating: ``torch`` (eager) or ``onnx`` (exported once, several times faster on a
    CPU; needs ``pip install 'geoswc[fast]'``)."""
    threads: int = 0
    """Compute threads of torch, onnxruntime, FAISS and NumPy's BLAS in each process (0: its share of the usable
    cores, under torchrun split among the node's processes, less one per decoding worker; one where that leaves two
    cores or fewer for a step that decodes photos, where a second thread measured slower)."""

    def __post_init__(self) -> None:
        check_ints(self)
        check_field(self, "batch_size", 1 <= self.batch_size <= 65536, "must be in 1..65536")
        check_field(self, "workers", 0 <= self.workers <= MAX_WORKERS, f"must be in 0..{MAX_WORKERS}")
        check_field(self, "threads", 0 <= self.threads <= MAX_WORKERS, f"must be in 0..{MAX_WORKERS}")
        check_field(
            self,
            "device",
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "must be auto, cpu, cuda or cuda:N",
        )
