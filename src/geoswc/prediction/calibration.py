"""How far to trust an estimate: calibrated probabilities that it lies within 1/25/200/750/2500 km.

A :class:`Calibrator` maps the signals a prediction already has (:data:`SIGNALS`: prediction density at several
radii, the top cell's probability, the best retrieval similarity, the winning DBSCAN cluster's size and mean
similarity, the fallback flag) to ``P(error <= t km)`` for each standard threshold ``t``, with one
scikit-learn logistic regression per threshold on standardized signals, fitted on photos of photographers the
model did not train on (out-of-fold, or a labelled set: ``geoswc calibrate``). The probabilities are made
monotone across thresholds (``P(<=1) <= P(<=25) <= ...``) by a running maximum.

It is saved as ``calibration.json`` beside the model (coefficients only, never pickle), sealed, fingerprinted,
and tied to the model's fingerprint; the model's weights and fingerprint do not change. A
:class:`LocalizableRule` saved with it says which estimates are worth showing (``P(<= within_km) >= p``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.linear_model import LogisticRegression

from geoswc.core import atomic_files, json_records
from geoswc.core.config import canonical_json, check_field, digest, from_dict, to_dict
from geoswc.core.errors import ArtifactError, InputError
from geoswc.core.sphere import THRESHOLDS_KM
from geoswc.prediction.swc import densities

log = logging.getLogger(__name__)

CALIBRATION_FORMAT = "geoswc-calibration/1"
CALIBRATION_FILE = "calibration.json"
"""The calibrator's file name inside a model folder."""
DENSITY_RADII_KM: tuple[float, ...] = (25.0, 200.0, 750.0, 2500.0)
"""Radii of the prediction-density signals."""
SIGNALS: tuple[str, ...] = (
    *(f"density_{int(r)}" for r in DENSITY_RADII_KM),
    "cell_probability",
    "top_similarity",
    "cluster_size",
    "cluster_similarity",
    "fallback",
)
"""The signals of a prediction a calibrator reads, in this order."""
LOG_SIGNALS: tuple[str, ...] = (*(f"density_{int(r)}" for r in DENSITY_RADII_KM), "cell_probability")
"""Probability-like signals, entered as ``log(x + LOG_FLOOR)`` (they span orders of magnitude)."""
LOG_FLOOR = 1e-4
THRESHOLD_KEYS: tuple[str, ...] = tuple(str(int(t)) for t in THRESHOLDS_KM)
"""``"1"``, ``"25"``, ``"200"``, ``"750"``, ``"2500"``: the keys of ``within_km``."""
PARAM_LIMIT = 1e6
"""Largest magnitude of a saved mean, scale, coefficient or intercept (fitted ones are below 100): a file beyond
it is refused, and with it no prediction's arithmetic can overflow into NaN."""
MIN_SCALE = 1e-12
"""Smallest saved scale (a fit replaces smaller spreads by 1)."""
SIGNAL_LIMIT = 1e6
"""Signals are clipped to ``[-SIGNAL_LIMIT, SIGNAL_LIMIT]`` before use (real ones lie in [-1, 1])."""
MAX_PHOTOS = 10**12
"""Most photos a saved calibrator may say it was fitted on."""
_KEYS = ("fingerprint", "model", "thresholds_km", "signals", "log_signals", "methods", "rule", "search", "fitted")


@dataclass(frozen=True)
class LocalizableRule:
    """Which estimates are called localizable: those with ``P(error <= within_km) >= p``."""

    within_km: float = 2500.0
    """The threshold whose calibrated probability decides (one of 1, 25, 200, 750, 2500)."""
    p: float = 0.5
    """The least probability of lying within ``within_km`` of the truth."""

    def __post_init__(self) -> None:
        check_field(self, "within_km", self.within_km in THRESHOLDS_KM, "must be one of 1, 25, 200, 750, 2500")
        check_field(self, "p", math.isfinite(self.p) and 0.0 <= self.p <= 1.0, "must be in [0, 1]")

    @property
    def key(self) -> str:
        return str(int(self.within_km))

    def describe(self) -> str:
        return f"P(within {self.key} km) >= {100 * self.p:g} %"


@dataclass(frozen=True)
class Abstention:
    """Abstaining: which photos are localizable (default: the rule saved with the model's calibrator), and
    whether a batch output leaves the others out."""

    within_km: float | None = None
    """Change the rule's threshold (1, 25, 200, 750 or 2500 km)."""
    p: float | None = None
    """Change the rule's least probability, in [0, 1]."""
    leave_out: bool = False
    """Leave the non-localizable photos out of the output (they are counted in the summary)."""

    def __post_init__(self) -> None:
        self.rule(LocalizableRule())  # the fields' own checks, before any model is loaded

    def rule(self, saved: LocalizableRule) -> LocalizableRule:
        """``saved`` with the fields given here changed."""
        changes = {k: v for k, v in (("within_km", self.within_km), ("p", self.p)) if v is not None}
        try:
            return dataclasses.replace(saved, **changes)
        except InputError as e:
            raise type(e)(str(e), type(self), getattr(e, "field", "")) from None


def density_signals(probs: ArrayLike, cells_xyz: ArrayLike, chosen: int) -> dict[str, float]:
    """Prediction density around the chosen cell at each of :data:`DENSITY_RADII_KM`, and the top cell's
    probability, from cell probabilities ``(C,)`` and unit centroids ``(C, 3)``."""
    p = np.asarray(probs, np.float64)
    dens = densities(p, cells_xyz, chosen, DENSITY_RADII_KM)
    out = {f"density_{int(r)}": d for r, d in zip(DENSITY_RADII_KM, dens, strict=True)}
    return out | {"cell_probability": float(p.max()) if p.size else 0.0}


def retrieval_signals(
    similarity: ArrayLike, labels: ArrayLike, cluster: int, k: int, fallback: bool = False
) -> dict[str, float]:
    """The best similarity among the retrieved neighbours ``(n,)``, the winning cluster's share of ``k`` and its
    mean similarity (0 when there is none), and the fallback flag."""
    sim, lab = np.asarray(similarity, np.float64), np.asarray(labels)
    member = lab == cluster if cluster >= 0 else np.zeros(len(lab), bool)
    return {
        "top_similarity": float(sim.max()) if sim.size else 0.0,
        "cluster_size": float(member.sum()) / max(k, 1),
        "cluster_similarity": float(sim[member].mean()) if member.any() else 0.0,
        "fallback": float(fallback),
    }


def signal_matrix(signals: Sequence[dict[str, float]]) -> NDArray[np.float64]:
    """The :data:`SIGNALS` of each prediction as a matrix ``(N, F)``; a missing signal is 0."""
    return np.array([[float(s.get(name, 0.0)) for name in SIGNALS] for s in signals], np.float64).reshape(
        len(signals), len(SIGNALS)
    )


def _design(x: NDArray[np.float64]) -> NDArray[np.float64]:
    x = x.copy()
    for name in LOG_SIGNALS:
        j = SIGNALS.index(name)
        x[:, j] = np.log(np.clip(x[:, j], 0.0, None) + LOG_FLOOR)
    return x


def rounded(obj: Any, digits: int = 10) -> Any:
    """``obj`` (numbers, lists, dicts) with every float rounded to ``digits`` significant digits: a saved number
    then has one decimal form, so a changed digit in the file is a changed value (and caught by the seal)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def monotone(p: ArrayLike) -> NDArray[np.float64]:
    """Probabilities ``(N, T)`` made non-decreasing along the thresholds (a running maximum), in [0, 1]."""
    return np.maximum.accumulate(np.clip(np.asarray(p, np.float64), 0.0, 1.0), axis=-1)


@dataclass(frozen=True)
class MethodCalibration:
    """One method's logistic regressions: ``P(<= t) = sigmoid(coef[t] . (x - mean) / scale + intercept[t])``."""

    mean: list[float]
    scale: list[float]
    coef: list[list[float]]
    """``(T, F)``: one row per threshold."""
    intercept: list[float]
    n: int = 0
    """Photos it was fitted on."""
    positives: list[int] = field(default_factory=list)
    """Of those, how many lay within each threshold."""

    @classmethod
    def fit(cls, signals: ArrayLike, errors_km: ArrayLike, c: float = 1.0) -> MethodCalibration:
        """Fit on signals ``(N, F)`` and the estimates' errors ``(N,)`` km. A threshold that every photo (or none)
        meets gets a constant, its smoothed rate."""
        x, err = _design(np.asarray(signals, np.float64)), np.asarray(errors_km, np.float64)
        if len(x) == 0 or len(x) != len(err) or not np.isfinite(x).all() or not np.isfinite(err).all():
            raise InputError(f"cannot calibrate on {len(x)} photos with {len(err)} errors (or non-finite values)")
        mean, scale = x.mean(0), x.std(0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        z = (x - mean) / scale
        coef, intercept, positives = [], [], []
        for t in THRESHOLDS_KM:
            y = (err <= t).astype(int)
            positives.append(int(y.sum()))
            if 0 < y.sum() < len(y):
                lr = LogisticRegression(C=c, max_iter=2000).fit(z, y)
                coef.append([float(v) for v in lr.coef_[0]])
                intercept.append(float(lr.intercept_[0]))
            else:
                rate = (y.sum() + 0.5) / (len(y) + 1.0)
                coef.append([0.0] * x.shape[1])
                intercept.append(float(np.log(rate / (1 - rate))))
        return cls(
            rounded([float(v) for v in mean]),
            rounded([float(v) for v in scale]),
            rounded(coef),
            rounded(intercept),
            len(x),
            positives,
        )

    def predict(self, signals: ArrayLike) -> NDArray[np.float64]:
        """``P(error <= t)`` ``(N, T)`` for signals ``(N, F)``, non-decreasing along ``t``, always finite: a NaN
        signal counts as missing (0), others are clipped to ``±SIGNAL_LIMIT`` (with a loaded calibrator's bounded
        coefficients, nothing then overflows)."""
        x = np.nan_to_num(np.asarray(signals, np.float64), nan=0.0, posinf=SIGNAL_LIMIT, neginf=-SIGNAL_LIMIT)
        x = np.clip(x, -SIGNAL_LIMIT, SIGNAL_LIMIT)
        z = (_design(x) - np.asarray(self.mean, np.float64)) / np.asarray(self.scale, np.float64)
        logit = z @ np.asarray(self.coef).T + np.asarray(self.intercept)
        return monotone(1.0 / (1.0 + np.exp(-np.clip(logit, -50, 50))))


@dataclass(frozen=True)
class Calibrator:
    """Calibrated ``within_km`` for the predictions of one model (per method), and its localizable rule."""

    model: str
    """Fingerprint of the model it was fitted for."""
    methods: dict[str, MethodCalibration]
    rule: LocalizableRule = field(default_factory=LocalizableRule)
    search: dict[str, Any] = field(default_factory=dict)
    """The search settings the signals were computed with."""
    fitted: dict[str, Any] = field(default_factory=dict)
    """How it was fitted (out-of-fold or a labelled set, how many photos): provenance."""

    @property
    def fingerprint(self) -> str:
        return digest(canonical_json(self._body()))

    def _body(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "thresholds_km": list(THRESHOLDS_KM),
            "signals": list(SIGNALS),
            "log_signals": list(LOG_SIGNALS),
            "methods": {m: to_dict(c) for m, c in self.methods.items()},
            "rule": to_dict(self.rule),
            "search": self.search,
            "fitted": self.fitted,
        }

    def constant_thresholds(self) -> list[str]:
        """A line for each threshold that no fitted photo (or every one) met: its probability is then a constant,
        the same for every photo, and says nothing about a photo."""
        out = []
        for m, cal in self.methods.items():
            for t, pos in zip(THRESHOLD_KEYS, cal.positives, strict=False):
                if pos in (0, cal.n):
                    which = "none" if pos == 0 else "all"
                    out.append(f"{m}: {which} of the {cal.n} photos lay within {t} km")
        return out

    def within_km(self, method: str, signals: Sequence[dict[str, float]]) -> list[dict[str, float]] | None:
        """``{"1": p, "25": p, ...}`` for each prediction's signals; None for a method it was not fitted for."""
        cal = self.methods.get(method)
        if cal is None or not signals:
            return None if cal is None else []
        p = cal.predict(signal_matrix(signals))
        return [{k: round(float(v), 4) for k, v in zip(THRESHOLD_KEYS, row, strict=True)} for row in p]

    def save(self, path: str | Path) -> str:
        """Write the sealed JSON record atomically; returns the fingerprint."""
        atomic_files.write_json(
            path, json_records.seal({"format": CALIBRATION_FORMAT, "fingerprint": self.fingerprint, **self._body()})
        )
        return self.fingerprint

    @classmethod
    def load(cls, path: str | Path) -> Calibrator:
        """Read and verify a calibrator file.

        Raises:
            ArtifactError: missing, damaged, changed (seal or fingerprint), or of another format or version.
        """
        path = Path(path)
        fix = "refit it with `geoswc calibrate`, or restore it"
        meta = json_records.read_record(path, "calibrator", CALIBRATION_FORMAT, _KEYS, fix)
        if (
            meta["thresholds_km"] != list(THRESHOLDS_KM)
            or meta["signals"] != list(SIGNALS)
            or meta["log_signals"] != list(LOG_SIGNALS)
        ):
            raise ArtifactError(f"calibrator {path} reads other thresholds or signals than this version; {fix}")
        try:
            methods = {str(m): from_dict(MethodCalibration, c) for m, c in dict(meta["methods"]).items()}
            cal = cls(
                str(meta["model"]),
                methods,
                from_dict(LocalizableRule, meta["rule"]),
                dict(meta["search"]),
                dict(meta["fitted"]),
            )
            for name, c in methods.items():
                check_method(name, c)
        except (ArtifactError, InputError, TypeError, ValueError) as e:
            raise ArtifactError(f"calibrator {path} is damaged ({e}); {fix}") from e
        if cal.fingerprint != meta["fingerprint"]:
            raise ArtifactError(f"calibrator {path} does not match its recorded fingerprint; {fix}")
        return cal


def check_method(name: str, c: MethodCalibration) -> None:
    """Refuse the coefficients of method ``name`` when they have the wrong shape or type, or lie outside their
    ranges: means, coefficients and intercepts within ``±PARAM_LIMIT``, scales in ``[MIN_SCALE, PARAM_LIMIT]``,
    ``0 <= positives <= n <= MAX_PHOTOS``.

    Raises:
        ValueError: naming the key (``methods.swc.scale[2]``) and the value.
    """
    f, t, key = len(SIGNALS), len(THRESHOLDS_KM), f"methods.{name}"
    if not isinstance(c.coef, list) or len(c.coef) != t:
        raise ValueError(f"{key}.coef must be a list of {t} rows")
    lists = [
        ("mean", c.mean, f, -PARAM_LIMIT),
        ("scale", c.scale, f, MIN_SCALE),
        ("intercept", c.intercept, t, -PARAM_LIMIT),
    ]
    lists += [(f"coef[{i}]", row, f, -PARAM_LIMIT) for i, row in enumerate(c.coef)]
    for part, values, size, low in lists:
        if not isinstance(values, list) or len(values) != size:
            raise ValueError(f"{key}.{part} must be a list of {size} numbers")
        for i, v in enumerate(values):
            if not (_is_number(v) and low <= v <= PARAM_LIMIT):
                raise ValueError(f"{key}.{part}[{i}] is {v!r}, not a number in [{low:g}, {PARAM_LIMIT:g}]")
    if not 0 <= c.n <= MAX_PHOTOS:
        raise ValueError(f"{key}.n is {c.n}, not a count of photos in 0..{MAX_PHOTOS}")
    if not isinstance(c.positives, list) or len(c.positives) not in (0, t):
        raise ValueError(f"{key}.positives must be a list of {t} counts")
    for i, v in enumerate(c.positives):
        if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= c.n):
            raise ValueError(f"{key}.positives[{i}] is {v!r}, not a count in 0..n ({c.n})")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fit_calibrator(
    model_fingerprint: str,
    per_method: dict[str, tuple[ArrayLike, ArrayLike]],
    rule: LocalizableRule = LocalizableRule(),
    search: dict[str, Any] | None = None,
    fitted: dict[str, Any] | None = None,
) -> Calibrator:
    """A calibrator for a model from each method's ``(signals (N, F), errors (N,) km)``."""
    methods = {m: MethodCalibration.fit(x, e) for m, (x, e) in per_method.items()}
    for m, c in methods.items():
        try:
            check_method(m, c)  # what Calibrator.load will check: never save a file that cannot be loaded
        except ValueError as e:
            raise InputError(f"cannot calibrate {m}: the fit is out of range ({e}); check the signals") from e
        log.info("calibrated %s on %d photos (within 1/25/200/750/2500 km: %s)", m, c.n, c.positives)
    return Calibrator(model_fingerprint, methods, rule, search or {}, rounded(fitted or {}))


def load_calibrator(model_dir: str | Path) -> Calibrator | None:
    """The calibrator saved in a model folder, or None (with a warning) when it has none."""
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.exists():
        log.warning(
            "model %s has no calibrator: predictions carry no within_km or localizable (fit one with "
            "`geoswc calibrate`)",
            model_dir,
        )
        return None
    return Calibrator.load(path)
