"""Untrusted files and clients: models, indexes and feature caches load without running code, a flipped byte or
a truncation anywhere in any artefact file is refused with a clear error, and the web service keeps to
localhost, can require a token, and never reads a path a client names."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from geoswc.core.errors import ArtifactError
from geoswc.gallery.files import load_gallery
from geoswc.models.backbone import create_backbone, default_config
from geoswc.models.geomodel import GeoModel
from geoswc.prediction.calibration import CALIBRATION_FILE, Calibrator
from geoswc.prediction.geolocator import Geolocator, default_model_dir
from geoswc.training.features import FeatureSet

from .conftest import KAUAI
from .test_thumbnails import copy_with_thumbnails

SRC = Path(__file__).resolve().parents[1] / "src" / "geoswc"


def flip(path: Path, pos: int) -> None:
    b = bytearray(path.read_bytes())
    b[pos] ^= 0x01
    path.write_bytes(bytes(b))


def positions(size: int, seed: int, n: int = 6) -> list[int]:
    """Start, end, middle and a few seeded random offsets of a file."""
    rng = random.Random(seed)
    return sorted({0, size - 1, size // 2, size // 4, *(rng.randrange(size) for _ in range(n))})


def json_line_positions(path: Path) -> list[tuple[int, str]]:
    """One byte in the key and one in the value of every line of a JSON file: every field is covered."""
    out, pos = [], 0
    for line in path.read_text(encoding="utf-8").split("\n"):
        alnum = [i for i, c in enumerate(line) if c.isascii() and c.isalnum()]
        if alnum:
            colon = line.find(":")
            key = [i for i in alnum if colon < 0 or i < colon][:1]
            value = [i for i in alnum if colon >= 0 and i > colon][-1:]
            out += [(pos + i, line.strip()[:60]) for i in key + value]
        pos += len(line.encode("utf-8")) + 1
    return out


# -- which artefacts: the tiny model and the embedded default model, with their indexes, and a feature cache --


@pytest.fixture(scope="module")
def pristine(tiny_workspace: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pristine")
    shutil.copytree(tiny_workspace["model"], d / "tiny", ignore=shutil.ignore_patterns("checkpoint*"))
    shutil.copytree(default_model_dir(), d / "default")
    shutil.copytree(tiny_workspace["features"], d / "features")
    shutil.copytree(default_model_dir(), d / "thumbed", ignore=shutil.ignore_patterns("index"))
    copy_with_thumbnails(default_model_dir() / "index", d / "thumbed" / "index")
    return {"tiny": d / "tiny", "default": d / "default", "features": d / "features", "thumbed": d / "thumbed"}


def load_model_and_index(folder: Path) -> None:
    geo = Geolocator.load(folder, folder / "index", with_backbone=False)
    assert geo.gallery is not None
    load_gallery(folder / "index", verify=True)  # large indexes check embedding blocks when first read: all now


def load_and_read_thumbnails(folder: Path) -> None:
    """Thumbnails are checked one at a time, when read (``thumbnails.bin`` is not hashed whole): read them all."""
    load_model_and_index(folder)
    gallery = load_gallery(folder / "index")
    assert sum(gallery.thumbnail(r) is not None for r in range(len(gallery))) == gallery.thumbnails.count > 0


MODEL_FILES = (
    "config.json",
    "cells.csv",
    "heads.safetensors",
    "index/index.json",
    "index/index.safetensors",
    "index/items.csv",
)
ARTEFACTS: dict[str, tuple[str, str, Callable[[Path], Any]]] = {
    # case -> (which copy, file inside it, loader)
    **{f"{copy}/{name}": (copy, name, load_model_and_index) for copy in ("tiny", "default") for name in MODEL_FILES},
    "features/features.json": ("features", "features.json", FeatureSet.load),
    "features/features.safetensors": ("features", "features.safetensors", FeatureSet.load),
    "features/items.csv": ("features", "items.csv", FeatureSet.load),
    # the embedded model's calibrator: a file beside the model, read on its own here (Geolocator.load reads it too)
    "default/calibration.json": ("default", CALIBRATION_FILE, lambda f: Calibrator.load(f / CALIBRATION_FILE)),
    # an index with evidence thumbnails (synthetic tiles on the default gallery, see test_thumbnails)
    **{
        f"thumbed/index/{name}": ("thumbed", f"index/{name}", load_and_read_thumbnails)
        for name in ("thumbnails.bin", "thumbnails.safetensors")
    },
}


@pytest.fixture
def copy(pristine: dict[str, Path], tmp_path: Path) -> Callable[[str, str], Path]:
    """A copy of an artefact folder (hard links: cheap), with the file ``rel`` a real copy to damage."""

    def make(which: str, rel: str) -> Path:
        folder = Path(shutil.copytree(pristine[which], tmp_path / which, copy_function=os.link))
        p = folder / rel
        data = p.read_bytes()
        p.unlink()
        p.write_bytes(data)
        return folder

    return make


@pytest.mark.parametrize("case", list(ARTEFACTS))
def test_pristine_copies_load(pristine: dict[str, Path], case: str) -> None:
    which, _, loader = ARTEFACTS[case]
    loader(pristine[which])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ARTEFACTS))
def test_flipped_byte_is_refused(copy: Callable[[str, str], Path], case: str) -> None:
    which, rel, loader = ARTEFACTS[case]
    folder = copy(which, rel)
    path = folder / rel
    original = path.read_bytes()
    for pos in positions(len(original), seed=len(case)):
        flip(path, pos)
        with pytest.raises(ArtifactError) as e:
            loader(folder)
        assert any(w in str(e.value) for w in ("rebuild", "restore", "re-extract", "delete")), str(e.value)
        assert str(folder) in str(e.value), str(e.value)
        path.write_bytes(original)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in ARTEFACTS if c.endswith(".json") and c != "default/config.json"])
def test_every_json_field_is_checked(copy: Callable[[str, str], Path], case: str) -> None:
    """A flip in any key or value of the metadata is refused: no field is left unchecked (a key that
    vanishes must not switch its check off). The default model's config.json takes the same path as the
    tiny model's (and 16 s): only its sampled flips are tried."""
    which, rel, loader = ARTEFACTS[case]
    folder = copy(which, rel)
    path = folder / rel
    original = path.read_bytes()
    missed = []
    for pos, line in json_line_positions(path):
        flip(path, pos)
        try:
            loader(folder)
        except ArtifactError:
            pass
        else:
            missed.append(line)
        path.write_bytes(original)
    assert not missed, f"changes to these fields load as good: {missed}"


@pytest.mark.parametrize("case", list(ARTEFACTS))
@pytest.mark.parametrize("cut", ["half", "one_byte_short", "empty", "deleted"])
def test_truncated_or_missing_file_is_refused(copy: Callable[[str, str], Path], case: str, cut: str) -> None:
    which, rel, loader = ARTEFACTS[case]
    folder = copy(which, rel)
    path = folder / rel
    data = path.read_bytes()
    if cut == "deleted":
        path.unlink()
    else:
        short = data.rstrip()[:-1] if rel.endswith(".json") else data[:-1]  # a trailing newline is not content
        path.write_bytes({"half": data[: len(data) // 2], "one_byte_short": short, "empty": b""}[cut])
    if case.endswith("config.json") and cut == "deleted":
        with pytest.raises(ArtifactError, match="no geoswc model"):
            loader(folder)
        return
    with pytest.raises(ArtifactError) as e:
        loader(folder)
    assert str(folder) in str(e.value), "the message names the damaged artefact"


def test_cli_names_a_tampered_model_and_exits_2(
    pristine: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from geoswc.cli import main

    folder = Path(shutil.copytree(pristine["tiny"], tmp_path / "m"))
    flip(folder / "heads.safetensors", 1000)
    assert main(["locate", str(KAUAI), "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "heads.safetensors" in err and "damaged" in err


# -- loading never runs code ---------------------------------------------------------------------------------


class _Payload:
    """A pickle that, when loaded, would create a file: the canary of code execution."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.canary, "pwned"))


def test_pickle_planted_as_weights_runs_nothing(pristine: dict[str, Path], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(pristine["tiny"], tmp_path / "m"))
    canary = tmp_path / "canary"
    evil = pickle.dumps({"mvmf.fc.weight": _Payload(canary)})
    (folder / "heads.safetensors").write_bytes(evil)
    with pytest.raises(ArtifactError):
        GeoModel.load(folder, with_backbone=False)
    # an attacker who also rewrites the recorded digest gets no further: safetensors is not pickle
    meta = json.loads((folder / "config.json").read_text())
    import hashlib

    meta["files_sha256"]["heads.safetensors"] = hashlib.sha256(evil).hexdigest()
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError):
        GeoModel.load(folder, with_backbone=False)
    assert not canary.exists()


def test_pickled_backbone_weights_run_nothing(tmp_path: Path) -> None:
    """A user-supplied .pth goes through torch.load(weights_only=True): objects beyond tensors are refused."""
    canary = tmp_path / "canary"
    pth = tmp_path / "weights.pth"
    torch.save({"state_dict": {"x": _Payload(canary)}}, pth)
    cfg = dataclasses.replace(default_config("efficientnet-lite0"), weights=str(pth))
    with pytest.raises(ArtifactError, match="cannot read backbone weights"):
        create_backbone(cfg)
    assert not canary.exists()


def test_no_code_executing_loaders_in_the_library() -> None:
    """No pickle, no torch.load without weights_only=True, no np.load(allow_pickle=True), no eval/exec."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            rel = f"{path.relative_to(SRC)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(
                    n and n.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib")
                    for n in names
                ):
                    offenders.append(f"{rel} imports a pickle module")
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            kw = {k.arg: k.value for k in node.keywords}
            if owner == "torch" and name == "load":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    offenders.append(f"{rel} torch.load without weights_only=True")
            if owner in ("np", "numpy") and name == "load":
                ap = kw.get("allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    offenders.append(f"{rel} np.load(allow_pickle=...)")
            if isinstance(f, ast.Name) and name in ("eval", "exec"):
                offenders.append(f"{rel} {name}()")
    assert not offenders, offenders


# -- the web service's trust boundary --------------------------------------------------------------------


@pytest.fixture(scope="module")
def geo(tiny_workspace: dict[str, Path]) -> Geolocator:
    return Geolocator.load(tiny_workspace["model"])


def _serve(argv: list[str], geo: Geolocator, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run `geoswc serve ARGV` with uvicorn.run replaced: returns what uvicorn would have been given."""
    pytest.importorskip("fastapi")
    import uvicorn

    from geoswc.cli import main

    seen: dict[str, Any] = {}
    monkeypatch.setattr(Geolocator, "load", classmethod(lambda cls, *a, **k: geo))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert main(["serve", *argv]) == 0
    return seen


@pytest.mark.parametrize(
    "host,token,warns",
    [
        ("127.0.0.1", None, False),
        ("localhost", None, False),
        ("::1", None, False),
        ("0.0.0.0", None, True),
        ("192.168.1.20", None, True),
        ("::", None, True),
        ("0.0.0.0", "s3cret", False),
    ],
)
def test_serve_warns_on_a_public_interface_without_a_token(
    geo: Geolocator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    host: str,
    token: str | None,
    warns: bool,
) -> None:
    monkeypatch.delenv("GEOSWC_TOKEN", raising=False)
    if token:
        monkeypatch.setenv("GEOSWC_TOKEN", token)
    if host == "192.168.1.20":  # an interface this machine may not have: only the warning is under test here
        import geoswc.workflow

        monkeypatch.setattr(geoswc.workflow, "check_bindable", lambda host, port: None)
    seen = _serve(["--host", host, "--port", "0"], geo, monkeypatch)
    assert seen["host"] == host
    err = capsys.readouterr().err
    assert ("without a token" in err) == warns, err


def test_serve_binds_localhost_and_takes_the_token_from_the_environment(
    geo: Geolocator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    monkeypatch.setenv("GEOSWC_TOKEN", "env-s3cret")
    seen = _serve(["--port", "0"], geo, monkeypatch)
    assert seen["host"] == "127.0.0.1"
    client = TestClient(seen["app"])
    files = [("files", ("k.png", KAUAI.read_bytes(), "image/png"))]
    assert client.get("/api/health").status_code == 401
    assert client.post("/api/locate", files=files).status_code == 401
    bad = {"Authorization": "Bearer env-s3cre"}
    assert client.get("/api/health", headers=bad).status_code == 401
    assert client.post("/api/locate", files=files, headers=bad).status_code == 401
    ok = {"Authorization": "Bearer env-s3cret"}
    assert client.get("/api/health", headers=ok).status_code == 200
    assert client.post("/api/locate", files=files, headers=ok).status_code == 200
    page = client.get("/config.json")
    assert page.status_code == 200 and "env-s3cret" not in page.text  # public, and never shows the token
    # a flag wins over the environment
    seen = _serve(["--port", "0", "--service.token", "flag-token"], geo, monkeypatch)
    assert TestClient(seen["app"]).get("/api/health", headers={"Authorization": "Bearer flag-token"}).status_code == 200
