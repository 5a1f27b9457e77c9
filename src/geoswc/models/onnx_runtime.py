"""Fast CPU inference: the backbone exported once to ONNX (cached by fingerprint) and run by onnxruntime.

Needs the optional extra ``geoswc[fast]`` (``onnx``, ``onnxscript``, ``onnxruntime``). The export uses
``torch.onnx.export(..., dynamo=True)``: the legacy TorchScript exporter silently produced wrong graphs for
the EfficientNet-Lite models, so every export is checked against eager PyTorch before it is cached.

Cache layout: ``<cache dir>/backbone-<fingerprint>.onnx`` plus ``backbone-<fingerprint>.json`` (sha256 of
the graph, versions, the measured export error), written last so its presence marks a whole export.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from geoswc.core import atomic_files, json_records, tensor_files
from geoswc.core.errors import ArtifactError, GeoswcError, InputError
from geoswc.core.progress import quiet

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'geoswc[fast]'"
"""What to run when the ONNX runtime's packages are missing."""
EXPORT_FORMAT = "geoswc-onnx/1"
EXPORT_TOLERANCE = 1e-3
"""Largest accepted ``|onnx - eager|`` of an export, relative to the features' largest magnitude."""


def require(module: str = "onnxruntime") -> Any:
    """Import one of the ``fast`` extra's packages, or fail with the install command.

    Raises:
        GeoswcError: the package is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise GeoswcError(
            f"the ONNX runtime needs the optional package {module!r}, which is not installed: {INSTALL_HINT}"
        ) from e


def default_cache_dir() -> Path:
    """Where exported backbones are kept: ``$GEOSWC_CACHE_DIR/onnx``, else ``~/.cache/geoswc/onnx``."""
    env = os.environ.get("GEOSWC_CACHE_DIR")
    if env:
        return Path(env) / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "geoswc" / "onnx"


def _paths(cache_dir: Path, fingerprint: str) -> tuple[Path, Path]:
    return cache_dir / f"backbone-{fingerprint}.onnx", cache_dir / f"backbone-{fingerprint}.json"


def cached_export(cache_dir: Path, fingerprint: str) -> Path | None:
    """The cached export for ``fingerprint`` if it is whole and unchanged, else None."""
    path, meta_path = _paths(cache_dir, fingerprint)
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json_records.read_json(meta_path, "ONNX export record")
    except ArtifactError as e:
        log.warning("%s; exporting again", e)
        return None
    if meta.get("format") != EXPORT_FORMAT or meta.get("fingerprint") != fingerprint:
        return None
    if tensor_files.sha256_file(path) != meta.get("sha256"):
        log.warning("the cached ONNX backbone %s is damaged or was changed; exporting again", path)
        return None
    return path


def _session(path: Path, threads: int | None = None) -> Any:
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ArtifactError(f"onnxruntime cannot load {path} ({e}); delete it to export again") from e


def _export_checked(backbone: nn.Module, image_size: int, dest: Path) -> float:
    """Write ``backbone``'s ONNX graph (any batch size) to ``dest``; returns its largest relative difference to
    eager PyTorch on two random images."""
    x = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter reports progress on stdout, which carries results (`geoswc locate --format jsonl`), and
    # warns about its own internals; keep both out of the user's way.
    with contextlib.redirect_stdout(sys.stderr), torch.no_grad(), warnings.catch_warnings(), quiet("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            backbone,
            (x,),
            dynamo=True,
            input_names=["images"],
            output_names=["features"],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
        if program is None:
            raise ArtifactError("torch.onnx.export returned no program")
        program.save(str(dest))
        expected = backbone(x).numpy()
    got = _session(dest).run(None, {"images": x.numpy()})[0]
    return float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max())))


def export_backbone(
    backbone: nn.Module,
    fingerprint: str,
    image_size: int,
    cache_dir: str | Path | None = None,
    *,
    tolerance: float = EXPORT_TOLERANCE,
) -> Path:
    """Export ``backbone`` (``(B, 3, S, S)`` -> ``(B, D)``, any B) to ONNX once; later calls reuse the file.

    Args:
        backbone: the eager backbone; its fingerprint names the cached file.
        fingerprint: :func:`geoswc.models.registry.backbone_fingerprint` (or a model's, fine-tuning included).
        image_size: the input side S (the graph's height and width are fixed).
        cache_dir: default :func:`default_cache_dir`.
        tolerance: largest accepted relative difference between the export and eager PyTorch.

    Returns:
        Path of the ``.onnx`` file.

    Raises:
        GeoswcError: the ``fast`` extra is not installed.
        ArtifactError: the exported graph computes other features than eager PyTorch.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    hit = cached_export(cache_dir, fingerprint)
    if hit is not None:
        return hit
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module)
    path, meta_path = _paths(cache_dir, fingerprint)
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("exporting backbone %s to ONNX (once; cached in %s)", fingerprint, cache_dir)
    backbone = backbone.eval()
    if any(p.device.type != "cpu" for p in backbone.parameters()):
        raise InputError("export the backbone from the CPU (the ONNX runtime runs there)")
    atomic_files.remove_stale(cache_dir, path.name)
    fd, tmp = tempfile.mkstemp(prefix=atomic_files.temp_prefix(path.name), suffix=".tmp", dir=cache_dir)
    os.close(fd)
    try:
        err = _export_checked(backbone, image_size, Path(tmp))
        if not err <= tolerance:
            raise ArtifactError(
                f"the ONNX export of backbone {fingerprint} differs from PyTorch (relative error {err:.2e} > "
                f"{tolerance:g}); use runtime='torch'"
            )
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    ort = require("onnxruntime")
    atomic_files.write_json(
        meta_path,
        {
            "format": EXPORT_FORMAT,
            "fingerprint": fingerprint,
            "image_size": image_size,
            "sha256": tensor_files.sha256_file(path),
            "relative_error": err,
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
        },
    )
    log.info("exported %s (relative error to eager %.1e)", path, err)
    return path


class OnnxBackbone:
    """A backbone run by onnxruntime on CPU, called like :class:`geoswc.models.efficientnet.Backbone`:
    ``(B, 3, S, S)`` float tensor -> ``(B, D)`` float32 tensor.

    Args:
        path: an exported graph (see :func:`export_backbone`).
        feature_dim: D.
        threads: onnxruntime intra-op threads (None: ``torch.get_num_threads()``, as eager PyTorch would use).
    """

    def __init__(self, path: str | Path, feature_dim: int, threads: int | None = None) -> None:
        self.path = Path(path)
        self.feature_dim = feature_dim
        self._session = _session(self.path, threads)
        self._input = self._session.get_inputs()[0].name

    @classmethod
    def from_backbone(
        cls,
        backbone: nn.Module,
        fingerprint: str,
        image_size: int,
        cache_dir: str | Path | None = None,
        threads: int | None = None,
    ) -> OnnxBackbone:
        """Export (or reuse the cached export of) an eager backbone and open it."""
        path = export_backbone(backbone, fingerprint, image_size, cache_dir)
        return cls(path, int(getattr(backbone, "feature_dim", 0)), threads)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise InputError(f"the backbone takes (B, 3, S, S) images, got shape {tuple(x.shape)}")
        if x.device.type != "cpu":
            raise InputError("the ONNX runtime runs on the CPU; move the images there or use runtime='torch'")
        arr = x.detach().float().contiguous().numpy()
        return torch.from_numpy(self._session.run(None, {self._input: arr})[0])

    def eval(self) -> OnnxBackbone:
        """No-op (inference only), for code written against ``nn.Module``."""
        return self

    def __repr__(self) -> str:
        return f"OnnxBackbone({str(self.path)!r}, feature_dim={self.feature_dim})"
