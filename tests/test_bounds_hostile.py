"""Numbers that would crash a native library, overflow into NaN or size a huge allocation, refused before use:

1. FAISS training: the rows, dimensions and sub-quantizers each kind of codes needs are checked before FAISS sees
   them (a property test runs FAISS in a subprocess, so that a native crash is a failing exit code, not a dead
   pytest);
2. every JSON number read from an artifact is finite and within 64 bits (json_records' readers), and each loader
   checks the ranges of the numbers it uses: a calibrator or an index with NaN, Infinity or huge numbers at any
   key is an ArtifactError, sealed or not, and a calibrator's predictions are always finite probabilities;
3. config ints that size an allocation are bounded (``--heads.rrm_hidden 1000000000`` is exit 2 naming the flag);
4. ``Gallery.search`` allocates for the rows it searches, never for ``k``, and refuses a ``k`` that is no count.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from geoswc.core import json_records, tensor_files
from geoswc.core.config import GalleryCodes, HeadConfig, canonical_json, digest
from geoswc.core.errors import ArtifactError, InputError, SettingError
from geoswc.gallery.codes import MIN_TRAIN_ROWS, check_codes, check_training, rows_needed
from geoswc.gallery.files import load_gallery, save_gallery, temporary_gallery
from geoswc.gallery.search import Gallery, GalleryIdentity
from geoswc.prediction.calibration import (
    PARAM_LIMIT,
    SIGNALS,
    Calibrator,
    LocalizableRule,
    MethodCalibration,
    fit_calibrator,
)

from .test_bad_input import assert_cli_error, run_cli

ROOT = Path(__file__).resolve().parents[1]
HOSTILE_TOKENS = ["NaN", "Infinity", "-Infinity", "1e400", "-1E999", "1" + "0" * 400, str(2**64), str(-(2**63) - 1)]
"""JSON numbers geoswc never writes (Python's json module reads every one of them)."""
PLACEHOLDER = "@@hostile@@"


# -- helpers ------------------------------------------------------------------------------------------------------


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of a JSON document (inner nodes and leaves), the root excluded."""
    out: list[tuple[Any, ...]] = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        out.append((*prefix, k))
        out += _paths(v, (*prefix, k))
    return out


def _key_text(path: tuple[Any, ...]) -> str:
    """``("methods", "swc", "mean", 0)`` -> ``methods.swc.mean[0]`` (how the readers name a key)."""
    text = ""
    for p in path:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        doc = doc[p]
    doc[path[-1]] = value


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _with_token(meta: dict[str, Any], path: tuple[Any, ...], token: str, sealed: bool) -> str:
    """``meta`` as JSON text with the raw ``token`` at ``path``; ``sealed``: with a seal forged over it the way
    an attacker would (canonical JSON of what Python's json reads, NaN and all), else with the old seal left."""
    doc = json.loads(json.dumps(meta))
    _set(doc, path, PLACEHOLDER)
    if sealed and path[0] != json_records.SEAL_KEY:
        read = json.loads(json.dumps(doc).replace(json.dumps(PLACEHOLDER), token))  # what Python's json makes of it
        body = {k: v for k, v in read.items() if k != json_records.SEAL_KEY}
        canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
        doc[json_records.SEAL_KEY] = hashlib.sha256(canon.encode()).hexdigest()
    return json.dumps(doc).replace(json.dumps(PLACEHOLDER), token)


def _synthetic(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, len(SIGNALS)))
    x[:, SIGNALS.index("fallback")] = 0.0
    x[:, :4] = np.sort(x[:, :4], axis=1)
    errors = np.where(rng.random(n) < x[:, 3], rng.random(n) * 2400, 3000 + rng.random(n) * 8000)
    return x, errors


@functools.lru_cache(maxsize=1)
def _calibrator_meta() -> dict[str, Any]:
    """The JSON record of a calibrator fitted on synthetic signals (two methods)."""
    x, e = _synthetic()
    cal = fit_calibrator(
        "0123456789abcdef",
        {"swc": (x, e), "retrieval": (x[::-1], e)},
        LocalizableRule(750.0, 0.3),
        {"k": 10, "r_km": 25.0},
        {"how": "test", "n": 400},
    )
    with tempfile.TemporaryDirectory() as d:
        cal.save(Path(d) / "calibration.json")
        return json.loads((Path(d) / "calibration.json").read_text())


def _reseal_calibrator(meta: dict[str, Any]) -> str:
    """A calibrator record resealed and re-fingerprinted after an edit: only its loader's checks can refuse it."""
    body_keys = ("model", "thresholds_km", "signals", "log_signals", "methods", "rule", "search", "fitted")
    body = {k: meta[k] for k in body_keys if k in meta}
    meta = {k: v for k, v in meta.items() if k != json_records.SEAL_KEY}
    meta["fingerprint"] = digest(canonical_json(body))
    return json.dumps(json_records.seal(meta))


N_ROWS, DIM, CELLS = 300, 8, 3


def _embeddings(n: int = N_ROWS, dim: int = DIM, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _tiny_gallery(n: int = N_ROWS) -> Gallery:
    rng = np.random.default_rng(1)
    chunk = (
        _embeddings(n),
        rng.uniform(-60, 60, n),
        rng.uniform(-180, 180, n),
        rng.integers(-1, CELLS, n),
        [f"img{i}.jpg" for i in range(n)],
        [f"a{i % 7}" for i in range(n)],
    )
    return temporary_gallery([chunk], DIM, GalleryIdentity("model0000", "cells0000", CELLS))


_MADE: list[Path] = []


@functools.lru_cache(maxsize=2)
def _index_folder(kind: str) -> Path:
    """A tiny index folder of ``kind`` codes, made once for this module (a test that edits ``index.json`` puts it
    back; :func:`teardown_module` removes the folders)."""
    _MADE.append(Path(tempfile.mkdtemp(prefix="geoswc-bounds-")))
    folder = _MADE[-1] / "idx"
    codes = GalleryCodes() if kind == "flat" else GalleryCodes(kind=kind, pq_bytes=4, rerank=20)  # type: ignore[arg-type]
    save_gallery(_tiny_gallery(), folder, codes)
    return folder


# -- 1. FAISS never sees a training sample it would crash on -----------------------------------------------------

TRAIN_SCRIPT = """
import sys
import numpy as np
from geoswc.core.errors import InputError
from geoswc.gallery.codes import train_codebook

kind, rows, dim, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
x = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
try:
    book = train_codebook(kind, x, m, 0)
except InputError as e:
    print("refused:", e)
else:
    assert book.encode(x[:3]).shape == (3, book.code_size)
    print("trained")
"""


def _run_python(script: str, *args: object, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter (a native crash kills it, not pytest)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


@st.composite
def _training_case(draw: st.DrawFn) -> tuple[str, int, int, int]:
    """(kind, rows, dims, pq bytes): tiny dims with enough rows for k-means, or dims above the rows (opq's crash)."""
    kind = draw(st.sampled_from(["sq8", "pq", "opq"]))
    dim = draw(st.sampled_from([8, 16, 24, 300, 320]))
    m = draw(st.sampled_from([d for d in (1, 2, 4, 8, 12) if dim % d == 0]))
    rows = draw(
        st.integers(MIN_TRAIN_ROWS - 20, MIN_TRAIN_ROWS + 100) if dim < MIN_TRAIN_ROWS else st.integers(200, dim - 1)
    )
    return kind, rows, dim, m


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_training_case())
@example(case=("opq", 264, 1280, 128))  # `geoswc index --codes.kind opq` on a gallery of 264 photos: rc 134
@example(case=("opq", 1000, 1280, 128))  # --codes.train_rows 1000 on 1280-d embeddings: rc 139
def test_faiss_training_is_refused_or_runs_without_crashing(case: tuple[str, int, int, int]) -> None:
    kind, rows, dim, m = case
    run = _run_python(TRAIN_SCRIPT, kind, rows, dim, m)
    assert run.returncode == 0, (case, run.returncode, run.stderr[-2000:])  # -11, -6: FAISS killed the process
    refused = rows < rows_needed(kind, dim)
    assert run.stdout.startswith("refused:" if refused else "trained"), (case, run.stdout)
    if refused:
        assert f"--codes.kind {kind}" in run.stdout and str(rows) in run.stdout


INDEX_SCRIPT = """
import sys
from pathlib import Path
import numpy as np
from geoswc.core.config import GalleryCodes
from geoswc.core.errors import InputError
from geoswc.gallery.files import GalleryWriter
from geoswc.gallery.search import GalleryIdentity

folder, n, dim = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
try:
    with GalleryWriter(folder, dim, GalleryIdentity("m", "c", 2), GalleryCodes(kind="opq", pq_bytes=8)) as w:
        w.add(x, np.zeros(n), np.zeros(n), np.arange(n) % 2, [f"i{i}" for i in range(n)], [""] * n)
        w.finish()
except InputError as e:
    print("refused:", e)
"""


@pytest.mark.slow
def test_an_opq_index_of_fewer_photos_than_dimensions_is_refused_and_leaves_no_staging(tmp_path: Path) -> None:
    run = _run_python(INDEX_SCRIPT, tmp_path / "idx", 264, 1280)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    line = run.stdout.strip()
    assert line.startswith("refused:") and "--codes.kind opq" in line and "1280" in line and "264" in line, line
    assert "\n" not in line and not list((tmp_path / "idx").glob(".staging.*"))
    assert not (tmp_path / "idx" / "index.json").exists()


def test_training_checks_name_the_flags_and_numbers() -> None:
    with pytest.raises(InputError) as e:
        check_training("opq", 1280, 128, 264, gallery_rows=264)
    msg = str(e.value)
    assert "--codes.kind opq" in msg and "1280" in msg and "264" in msg and "flat" in msg and "pq" in msg
    with pytest.raises(InputError, match="--codes.train_rows to 1280"):
        check_training("opq", 1280, 128, 1000, gallery_rows=5000)  # the gallery is large enough, the sample not
    with pytest.raises(InputError, match="--codes.train_rows"):
        check_codes("opq", 1280, 128, train_rows=1000)  # known before a photo is embedded
    with pytest.raises(InputError, match=f"at least {MIN_TRAIN_ROWS}"):
        check_training("pq", 64, 8, MIN_TRAIN_ROWS - 1)
    with pytest.raises(InputError, match="--codes.pq_bytes must divide"):
        check_training("pq", 64, 7, 10_000)
    check_training("opq", 1280, 128, 1280)  # enough: no error
    check_training("flat", 1280, 0, 0)
    check_codes("opq", 1280, 128, train_rows=65_536)
    assert [rows_needed(k, 1280) for k in ("flat", "sq8", "pq", "opq")] == [0, MIN_TRAIN_ROWS, MIN_TRAIN_ROWS, 1280]


def test_a_pq_size_that_divides_nothing_is_answered_at_once_for_a_huge_width() -> None:
    start = time.perf_counter()
    with pytest.raises(InputError, match="e.g. 1[,)]"):
        check_codes("pq", 10_000_019, 128)  # a prime width: the nearest divisor of 128 is 1
    assert time.perf_counter() - start < 0.5


# -- 2. JSON numbers from artifacts -------------------------------------------------------------------------------


@pytest.mark.parametrize("token", HOSTILE_TOKENS)
def test_storage_readers_refuse_non_finite_and_huge_numbers_naming_the_key(tmp_path: Path, token: str) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"a": {"b": [1, 2.5, ' + token + "]}}")
    with pytest.raises(ArtifactError) as e:
        json_records.read_json(path, "thing")
    assert str(path) in str(e.value) and "a.b[2]" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError):
        json_records.parse_json("[" + token + "]")


@settings(max_examples=200, deadline=None)
@given(
    value=st.one_of(
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(HOSTILE_TOKENS),
    )
)
def test_parse_json_keeps_exactly_the_finite_64_bit_numbers(value: Any) -> None:
    text = value if isinstance(value, str) else json.dumps(value)
    ok = isinstance(value, int) and -(2**63) <= value < 2**63 or isinstance(value, float) and math.isfinite(value)
    if ok:
        assert json_records.parse_json(text) == value
    else:
        with pytest.raises(json_records.JSONNumberError):
            json_records.parse_json(text)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), token=st.sampled_from(HOSTILE_TOKENS), sealed=st.booleans())
def test_a_calibrator_with_a_hostile_number_at_any_key_is_an_artifact_error(
    data: st.DataObject, token: str, sealed: bool
) -> None:
    meta = _calibrator_meta()
    path_ = data.draw(st.sampled_from(_paths(meta)))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "calibration.json"
        path.write_text(_with_token(meta, path_, token, sealed))
        with pytest.raises(ArtifactError) as e:
            Calibrator.load(path)
    msg = str(e.value)
    assert str(path) in msg and _key_text(path_) in msg and "\n" not in msg


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(), token=st.sampled_from(HOSTILE_TOKENS), sealed=st.booleans(), kind=st.sampled_from(["flat", "pq"])
)
def test_an_index_with_a_hostile_number_at_any_key_is_an_artifact_error(
    data: st.DataObject, token: str, sealed: bool, kind: str
) -> None:
    folder = _index_folder(kind)
    record = folder / "index.json"
    meta = json.loads(record.read_text())
    path_ = data.draw(st.sampled_from(_paths(meta)))
    try:
        record.write_text(_with_token(meta, path_, token, sealed))
        with pytest.raises(ArtifactError) as e:
            load_gallery(folder)
    finally:
        record.write_text(json.dumps(meta))
    msg = str(e.value)
    assert str(record) in msg and _key_text(path_) in msg and "\n" not in msg


def _numeric_paths(meta: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        p
        for p in _paths(meta)
        if p[0] in ("methods", "rule", "search", "fitted")
        and isinstance(_get(meta, p), (int, float))
        and not isinstance(_get(meta, p), bool)
    ]


SIGNAL_ROWS = [
    {name: v for name in SIGNALS} for v in (0.0, 0.5, 1.0, -1.0, 1e300, -1e300, math.nan, math.inf, -math.inf)
] + [{}]


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    value=st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(-(2**63), 2**63 - 1),
        st.sampled_from([0, -1, 1e-300, 1e300, -1e300, PARAM_LIMIT * 2, 2**62]),
    ),
)
def test_a_resealed_calibrator_with_any_number_anywhere_loads_finite_or_is_refused(
    data: st.DataObject, value: float
) -> None:
    """An edited number that keeps the file sealed and fingerprinted: the loader's range checks are all that stand
    between it and the predictions, which must stay probabilities (a NaN would reach --format jsonl)."""
    meta = json.loads(json.dumps(_calibrator_meta()))
    _set(meta, data.draw(st.sampled_from(_numeric_paths(meta))), value)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "calibration.json"
        path.write_text(_reseal_calibrator(meta))
        try:
            cal = Calibrator.load(path)
        except ArtifactError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            return
    for method in cal.methods:
        for row in cal.within_km(method, SIGNAL_ROWS) or []:
            assert all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in row.values()), row
            json.dumps(row, allow_nan=False)


@pytest.mark.parametrize(
    "edit,key",
    [
        ({"mean": [1e300] * len(SIGNALS), "scale": [1e-300] * len(SIGNALS)}, "methods.swc.mean[0]"),
        ({"scale": [1e-300] * len(SIGNALS)}, "methods.swc.scale[0]"),
        ({"scale": [0.0] + [1.0] * (len(SIGNALS) - 1)}, "methods.swc.scale[0]"),
        ({"intercept": [0.0, 0.0, 0.0, 0.0, 1e7]}, "methods.swc.intercept[4]"),
        ({"n": 2**62}, "methods.swc.n"),
        ({"n": -1}, "methods.swc.n"),
        ({"positives": [1, 2, 3, 4, 10**6]}, "methods.swc.positives[4]"),
        ({"positives": [1, 2]}, "methods.swc.positives"),
        ({"mean": ["1"] + [0.0] * (len(SIGNALS) - 1)}, "methods.swc.mean[0]"),
    ],
)
def test_a_resealed_calibrator_with_absurd_coefficients_is_refused_naming_the_key(
    tmp_path: Path, edit: dict[str, Any], key: str
) -> None:
    meta = json.loads(json.dumps(_calibrator_meta()))
    meta["methods"]["swc"].update(edit)
    path = tmp_path / "calibration.json"
    path.write_text(_reseal_calibrator(meta))
    with pytest.raises(ArtifactError) as e:
        Calibrator.load(path)
    assert str(path) in str(e.value) and key in str(e.value) and "\n" not in str(e.value)


def test_the_pristine_calibrator_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(_reseal_calibrator(json.loads(json.dumps(_calibrator_meta()))))
    cal = Calibrator.load(path)
    assert set(cal.methods) == {"swc", "retrieval"} and cal.rule == LocalizableRule(750.0, 0.3)
    default = Calibrator.load(ROOT / "src/geoswc/assets/default/calibration.json")  # the embedded model's
    assert set(default.methods) == {"swc", "classification", "retrieval"}


_bounded = st.floats(-PARAM_LIMIT, PARAM_LIMIT)


@settings(max_examples=100, deadline=None)
@given(
    mean=st.lists(_bounded, min_size=len(SIGNALS), max_size=len(SIGNALS)),
    scale=st.lists(st.floats(1e-12, PARAM_LIMIT), min_size=len(SIGNALS), max_size=len(SIGNALS)),
    coef=st.lists(st.lists(_bounded, min_size=len(SIGNALS), max_size=len(SIGNALS)), min_size=5, max_size=5),
    intercept=st.lists(_bounded, min_size=5, max_size=5),
    signals=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=len(SIGNALS), max_size=len(SIGNALS)),
)
def test_predictions_within_the_bounds_are_always_probabilities(
    mean: list[float], scale: list[float], coef: list[list[float]], intercept: list[float], signals: list[float]
) -> None:
    cal = MethodCalibration(mean, scale, coef, intercept, 10, [0, 1, 2, 3, 4])
    p = cal.predict(np.array([signals]))
    assert p.shape == (1, 5) and np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    assert (np.diff(p, axis=1) >= 0).all()


def test_an_index_with_an_absurd_block_size_is_an_artifact_error() -> None:
    folder = _index_folder("flat")
    record = folder / "index.json"
    meta = json.loads(record.read_text())
    try:
        for bad in (0, -64, 2**62, "64"):
            edited = json.loads(json.dumps(meta))
            edited.pop(json_records.SEAL_KEY)
            edited["tensors"]["block_bytes"] = bad
            record.write_text(json.dumps(json_records.seal(edited)))
            with pytest.raises(ArtifactError):
                load_gallery(folder)
    finally:
        record.write_text(json.dumps(meta))
    assert len(load_gallery(folder)) == N_ROWS


@pytest.mark.parametrize(
    "spec",
    [
        {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]},
        {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 0]},
        {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},
        {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 16]},
        {"dtype": "Q8", "shape": [2], "data_offsets": [0, 8]},
        ["F32"],
    ],
)
def test_a_tensor_spec_of_absurd_sizes_is_a_value_error(spec: Any) -> None:
    with pytest.raises(ValueError):
        tensor_files.tensor_view(np.zeros(64, np.uint8), spec, 0)


# -- 3. config ints that size allocations --------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(["mvmf_hidden", "rrm_hidden"]), value=st.integers(-(2**70), 2**70))
def test_head_widths_are_bounded(name: str, value: int) -> None:
    if 0 <= value <= 16_384:
        assert getattr(HeadConfig(**{name: value}), name) == value
    else:
        with pytest.raises(SettingError) as e:
            HeadConfig(**{name: value})
        assert e.value.field == name and e.value.owner is HeadConfig


@settings(max_examples=100, deadline=None)
@given(value=st.integers(-(2**70), 2**70))
def test_codes_training_rows_are_bounded(value: int) -> None:
    if 256 <= value <= 1_048_576:
        assert GalleryCodes(train_rows=value).train_rows == value
    else:
        with pytest.raises(SettingError) as e:
            GalleryCodes(train_rows=value)
        assert e.value.field == "train_rows" and e.value.owner is GalleryCodes


def test_the_embedded_model_and_the_recipes_keep_valid_sizes() -> None:
    from geoswc.core.config import ModelConfig, from_dict

    config = json.loads((ROOT / "src/geoswc/assets/default/config.json").read_text())
    assert isinstance(from_dict(ModelConfig, config["config"]).heads, HeadConfig)
    seen = 0

    def walk(node: Any) -> None:
        nonlocal seen
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "heads" and isinstance(v, dict):
                    HeadConfig(**v)
                    seen += 1
                elif k == "codes" and isinstance(v, dict):
                    GalleryCodes(**v)
                    seen += 1
                else:
                    walk(v)

    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        walk(yaml.safe_load(recipe.read_text()))
    assert seen >= 3


@pytest.mark.parametrize("flag,value", [("heads.rrm_hidden", 1_000_000_000), ("heads.mvmf_hidden", 100_000_000)])
def test_train_refuses_a_huge_head_width_naming_the_flag(
    flag: str, value: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--features", tmp_path / "nope", "--cells", tmp_path / "nope.csv", "--out", tmp_path / "m"]
    rc, _, err = run_cli([*args, f"--{flag}", value], capsys)
    assert_cli_error(rc, err, "train", f"--{flag}", "16384")


# -- 4. Gallery.search's k -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "pq"])
def test_a_huge_k_allocates_for_the_rows_not_for_k(kind: str) -> None:
    g = load_gallery(_index_folder(kind))
    q = _embeddings(1, seed=5)[0]
    small, _ = g.search(q, N_ROWS)
    tracemalloc.start()
    try:
        for k in (10**7, 10**12, 2**80):
            rows, sims = g.search(q, k)
            assert (rows == small).all() and len(rows) == N_ROWS and (np.diff(sims) <= 0).all()
            cell_rows, _ = g.search(q, k, cells=[1])
            assert len(cell_rows) == g.cell_sizes()[1]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, peak  # a buffer for 10**7 neighbours alone would be 240 MB


@pytest.mark.parametrize("k,error", [(5.5, TypeError), ("5", TypeError), (True, TypeError), (None, TypeError)])
def test_a_k_that_is_not_a_whole_number_is_refused(k: Any, error: type) -> None:
    g = load_gallery(_index_folder("flat"))
    with pytest.raises(error, match="k must be"):
        g.search(_embeddings(1)[0], k)


@pytest.mark.parametrize("k", [0, -1, -(2**70)])
def test_a_k_below_one_is_refused(k: int) -> None:
    g = load_gallery(_index_folder("flat"))
    with pytest.raises(InputError, match="k must be at least 1"):
        g.search(_embeddings(1)[0], k)
    assert len(g.search(_embeddings(1)[0], np.int64(3))[0]) == 3


def teardown_module() -> None:
    _index_folder.cache_clear()
    for folder in _MADE:
        shutil.rmtree(folder, ignore_errors=True)
