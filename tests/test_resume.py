"""Interruptions: a killed training resumes to the same model, and a kill never leaves a half-written file
(checkpoint, model, index, cell table, evaluation output) that is later read as good."""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from geoswc import workflow
from geoswc.core import atomic_files
from geoswc.core.config import ModelConfig, TrainConfig
from geoswc.core.errors import ArtifactError
from geoswc.data.sources import Photos
from geoswc.gallery.files import load_gallery, save_gallery
from geoswc.geo.cells import CellTable
from geoswc.models import compat
from geoswc.models.geomodel import GeoModel
from geoswc.training.features import FeatureSet
from geoswc.training.train import train_heads

from .conftest import DEV_IMAGES, dev_rows, write_csv

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "geoswc"


class Killed(BaseException):
    """Stands in for SIGKILL inside the test process: nothing after the raise point runs."""


# -- training: SIGKILL at random points, then the same command again --------------------------------------


def _progress(ckpt: Path) -> int:
    """Epochs recorded by the last complete checkpoint (0 when none yet)."""
    try:
        meta = json.loads((ckpt / "checkpoint.json").read_text())
    except (OSError, ValueError):
        return 0
    return int(sum(meta.get("phase_epochs", {}).values()))


@pytest.mark.slow
def test_sigkill_during_training_then_rerun_gives_the_same_model(
    tiny_workspace: dict[str, Path], tmp_path: Path
) -> None:
    """`geoswc train` is killed (SIGKILL) at a random point after a checkpoint, with a random extra delay
    (GEOSWC_RESUME_KILLS=2 kills it twice); re-running the same command resumes and ends with the heads of the
    uninterrupted run (the tiny workspace's model, trained by the very same command)."""
    seed = int(os.environ.get("GEOSWC_RESUME_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    out = tmp_path / "model"
    cmd = [
        sys.executable,
        "-m",
        "geoswc",
        "train",
        "--features",
        str(tiny_workspace["features"]),
        "--cells",
        str(tiny_workspace["cells"]),
        "--out",
        str(out),
        "--train.epochs",
        "3",
        "--train.rrm_epochs",
        "3",
        "--train.batch_size",
        "16",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    total = 6  # 3 MvMF + 3 RRM epochs, one checkpoint each
    kills: list[tuple[int, int, int]] = []
    wanted = int(os.environ.get("GEOSWC_RESUME_KILLS", "1"))
    for _attempt in range(8):
        start = _progress(out / "checkpoint")
        if len(kills) >= wanted or start >= total - 1:
            break
        target = rng.randint(start + 1, total - 1)  # kill after this many epochs (never after the last)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        seen, last_change, epoch_s = start, time.monotonic(), 0.5
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            p = _progress(out / "checkpoint")
            if p != seen:
                now = time.monotonic()
                if seen > start:
                    epoch_s = now - last_change
                seen, last_change = p, now
            if seen >= target:
                time.sleep(rng.uniform(0, 0.8 * epoch_s))  # somewhere inside the next epoch
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        if proc.returncode == 0 or (out / "config.json").exists():
            # the tiny run outpaced the poller (a loaded machine) and saved its model: not a mid-training kill
            shutil.rmtree(out)
            continue
        kills.append((target, _progress(out / "checkpoint"), proc.returncode))
        assert proc.returncode == -signal.SIGKILL, f"seed {seed}: the run failed before the kill: {kills}"
    assert kills, f"seed {seed}: every run finished before it could be killed"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from checkpoint" in proc.stderr
    resumed, reference = (
        load_file(str(out / "heads.safetensors")),
        load_file(str(tiny_workspace["model"] / "heads.safetensors")),
    )
    assert resumed.keys() == reference.keys()
    worst = max(float((resumed[k].double() - reference[k].double()).abs().max()) for k in resumed)
    assert worst <= 1e-6, f"seed {seed}, kills {kills}: heads differ by up to {worst}"
    if worst == 0.0:  # bit-identical heads: then the whole model is the same
        assert (
            json.loads((out / "config.json").read_text())["fingerprint"]
            == json.loads((tiny_workspace["model"] / "config.json").read_text())["fingerprint"]
        )


# -- training: a kill between the two files of a checkpoint ----------------------------------------------


def _setup(ws: dict[str, Path], val_fraction: float = 0.0) -> tuple[FeatureSet, TrainConfig, GeoModel]:
    fs = FeatureSet.load(ws["features"])
    cells = CellTable.load(ws["cells"])
    cfg = TrainConfig(epochs=2, rrm_epochs=1, batch_size=16, val_fraction=val_fraction)
    return fs, cfg, GeoModel(ModelConfig(backbone=fs.backbone, train=cfg), cells)


@pytest.fixture(scope="module")
def uninterrupted(tiny_workspace: dict[str, Path]) -> dict[float, str]:
    out = {}
    for val in (0.0, 0.3):
        fs, cfg, model = _setup(tiny_workspace, val)
        train_heads(model, fs, cfg, progress=False)
        out[val] = model.fingerprint
    return out


@pytest.mark.slow
@pytest.mark.parametrize("val_fraction", [0.0, 0.3])  # 0.3: the best MvMF head so far is checkpointed too
@pytest.mark.parametrize("kill_at", [2, 3])  # at the end of the MvMF phase, and in the RRM phase
def test_kill_between_checkpoint_tensors_and_json_resumes(
    tiny_workspace: dict[str, Path],
    tmp_path: Path,
    uninterrupted: dict[float, str],
    kill_at: int,
    val_fraction: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dying after a checkpoint's tensors are written but before checkpoint.json is: the json still names
    the previous tensors, which are still there, so the re-run resumes (one shared file name would have
    left a json whose digest no longer matched: a run that could never resume)."""
    ckpt = tmp_path / "ckpt"
    real = atomic_files.write_json
    calls = {"n": 0}

    def dying_write_json(path: str | Path, data: Any) -> None:
        if Path(path).name == "checkpoint.json":
            calls["n"] += 1
            if calls["n"] == kill_at:
                raise Killed
        real(path, data)

    fs, cfg, model = _setup(tiny_workspace, val_fraction)
    monkeypatch.setattr(atomic_files, "write_json", dying_write_json)
    with pytest.raises(Killed):
        train_heads(model, fs, cfg, checkpoint_dir=ckpt, progress=False)
    monkeypatch.setattr(atomic_files, "write_json", real)
    assert len(list(ckpt.glob("checkpoint*.safetensors"))) == 2  # the named one and the orphan
    _, _, fresh = _setup(tiny_workspace, val_fraction)  # a re-run is a new process: a new model
    train_heads(fresh, fs, cfg, checkpoint_dir=ckpt, progress=False)
    assert fresh.fingerprint == uninterrupted[val_fraction]
    assert len(list(ckpt.glob("checkpoint*.safetensors"))) == 1, "the orphan is cleaned up"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_tensors", "bad_json"])
def test_damaged_checkpoint_is_refused_with_a_hint(
    tiny_workspace: dict[str, Path], tmp_path: Path, damage: str
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_workspace["model"] / "checkpoint", ckpt)
    tensors = next(ckpt.glob("checkpoint*.safetensors"))
    if damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    elif damage == "flip":
        b = bytearray(tensors.read_bytes())
        b[len(b) // 3] ^= 0x10
        tensors.write_bytes(bytes(b))
    elif damage == "delete_tensors":
        tensors.unlink()
    else:
        (ckpt / "checkpoint.json").write_text('{"run_key": ')
    fs = FeatureSet.load(tiny_workspace["features"])
    cfg = TrainConfig(epochs=3, rrm_epochs=3, batch_size=16)
    model = GeoModel(ModelConfig(backbone=fs.backbone, train=cfg), CellTable.load(tiny_workspace["cells"]))
    with pytest.raises(ArtifactError, match="checkpoint") as e:
        train_heads(model, fs, cfg, checkpoint_dir=ckpt, progress=False)
    assert str(ckpt) in str(e.value) and "delete" in str(e.value)


# -- atomic writes: every writer, and a SIGKILL in the middle of one --------------------------------------

ALLOWED_WRITERS = {
    # (file, code of the call): why it is safe
    ("core/atomic_files.py", "*"): "the atomic writer itself (temp file + fsync + rename)",
    (
        "evaluation/figures.py",
        "fig.savefig(buf, format='png')",
    ): "renders into memory; written by atomic_files.write_bytes",
    (
        "training/feature_files.py",
        "np.save(self.folder / 'keys.npy', self.keys)",
    ): "a rank's staging folder; rank 0 reads it only after the rank's JSON record, written atomically after it",
    ("training/feature_files.py", "np.save(self.folder / 'lines.npy', self.lines)"): "as keys.npy",
}
DIRECT_WRITES = {
    ("json", "dump"),
    ("pickle", "dump"),
    ("torch", "save"),
    ("np", "save"),
    ("np", "savez"),
    ("np", "savez_compressed"),
    ("shutil", "copy"),
    ("shutil", "copyfile"),
}


def _writers(path: Path) -> list[str]:
    """Calls in a source file that write a file in place: open(..., 'w'), Path.write_text/bytes (not
    atomic_files'), savefig/tofile, json/pickle.dump, torch/np.save, shutil.copy."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        if name == "open" and owner in ("", "io", "os", "builtins"):
            modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)] + [
                k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)
            ]
            if any(isinstance(m, str) and set(m) & set("wax+") for m in modes):
                found.append(ast.unparse(node))
        elif (
            (name in ("write_text", "write_bytes") and owner != "atomic_files")
            or name in ("savefig", "tofile")
            or (owner, name) in DIRECT_WRITES
        ):
            found.append(ast.unparse(node))
    return found


def test_every_file_writer_goes_through_the_atomic_writer() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if (rel, "*") in ALLOWED_WRITERS:
            continue
        for call in _writers(path):
            if (rel, call) not in ALLOWED_WRITERS:
                offenders.append(f"{rel}: {call}")
    assert not offenders, (
        "write files with geoswc.core.atomic_files (write_bytes/write_text/write_json/atomic_writer) or "
        "tensor_files.save_tensors, or add a reasoned entry to ALLOWED_WRITERS: " + "; ".join(offenders)
    )


_LOOP = """
import sys
from geoswc.core import atomic_files
path, a, b = sys.argv[1], bytes([65]) * (8 << 20), bytes([66]) * (12 << 20)
print("ready", flush=True)
while True:
    atomic_files.write_bytes(path, a)
    atomic_files.write_bytes(path, b)
"""


@pytest.mark.slow
def test_sigkill_in_the_middle_of_writes_leaves_the_old_or_the_new_file(tmp_path: Path) -> None:
    """A process rewriting a file (8 MiB 'A', 12 MiB 'B', in turn) is killed at random moments: the file is
    always one of the two, whole; the only debris is hidden temp files, which no loader reads."""
    target = tmp_path / "artefact.bin"
    rng = random.Random(1)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", _LOOP, str(target)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        data = target.read_bytes()
        assert data in (bytes([65]) * (8 << 20), bytes([66]) * (12 << 20)), (len(data), data[:1], data[-1:])
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in tmp_path.iterdir() if p != target)


# -- a kill between the files of an artefact: refused or whole, never a mix read as good --------------------


def _kill_at_replace(monkeypatch: pytest.MonkeyPatch, k: int) -> dict[str, int]:
    """Make the k-th os.replace (the rename that publishes a written file) die first."""
    real, calls = os.replace, {"n": 0}

    def replace(src: Any, dst: Any) -> None:
        calls["n"] += 1
        if calls["n"] == k:
            raise Killed
        real(src, dst)

    monkeypatch.setattr(atomic_files.os, "replace", replace)
    return calls


@pytest.mark.parametrize("k", [1, 2, 3])
def test_interrupted_model_save_is_refused_or_whole(
    tiny_workspace: dict[str, Path], tmp_path: Path, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_workspace["model"], folder, ignore=shutil.ignore_patterns("checkpoint*", "index"))
    old = GeoModel.load(folder, with_backbone=False)
    new = GeoModel.load(folder, with_backbone=False)
    with torch.no_grad():
        new.rrm.fc2.bias.add_(0.01)
    calls = _kill_at_replace(monkeypatch, k)
    with pytest.raises(Killed):
        new.save(folder)
    monkeypatch.undo()
    assert calls["n"] == k
    try:
        loaded = GeoModel.load(folder, with_backbone=False)
    except ArtifactError:
        return  # refused: fine
    assert loaded.fingerprint == old.fingerprint, "only the untouched old model may load"


@pytest.mark.parametrize("k", [1, 2, 3])
def test_interrupted_index_write_is_refused_or_whole(
    tiny_workspace: dict[str, Path], tmp_path: Path, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "index"
    shutil.copytree(tiny_workspace["model"] / "index", folder)
    model = GeoModel.load(tiny_workspace["model"], with_backbone=False)
    fs = FeatureSet.load(tiny_workspace["features"])
    smaller = model.gallery(fs.features[:30, 0], fs.lat[:30], fs.lon[:30], fs.names[:30], fs.authors[:30])
    _kill_at_replace(monkeypatch, k)
    with pytest.raises(Killed):
        save_gallery(smaller, folder)
    monkeypatch.undo()
    try:
        loaded = load_gallery(folder, verify=True)
        compat.check(model, gallery=loaded)
    except ArtifactError:
        return
    assert len(loaded) == 60, "only the untouched old index may load"


@pytest.fixture(scope="module")
def finished_evaluation(tiny_workspace: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("eval")
    data = Photos(csv=write_csv(d / "bench.csv", dev_rows(4, step=307)), images=DEV_IMAGES)
    workflow.evaluate(data, d / "eval", model=tiny_workspace["model"], methods=["swc"])
    return {"model": tiny_workspace["model"], "data": data, "out": d / "eval"}


@pytest.mark.parametrize("k", [1, 3])  # after predictions.csv, after run.json (metrics.json comes last)
def test_interrupted_evaluation_never_pairs_old_metrics_with_new_predictions(
    finished_evaluation: dict, tmp_path: Path, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "eval"
    shutil.copytree(finished_evaluation["out"], out)
    _kill_at_replace(monkeypatch, k)
    with pytest.raises(Killed):
        workflow.evaluate(
            finished_evaluation["data"], out, model=finished_evaluation["model"], methods=["classification"]
        )
    monkeypatch.undo()
    if not (out / "metrics.json").exists():
        return  # an incomplete run is visibly incomplete
    metrics = json.loads((out / "metrics.json").read_text())
    rows = (out / "predictions.csv").read_text().splitlines()[1:]
    errors = np.array([float(r.split(",")[5]) for r in rows])
    assert metrics["n"] == len(rows) and metrics["median_km"] == pytest.approx(float(np.median(errors)), abs=1e-2)
    assert json.loads((out / "run.json").read_text())["methods"] == [metrics["method"]]


def test_interrupted_cell_table_write_keeps_the_old_table(
    tiny_workspace: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cells.csv"
    shutil.copy(tiny_workspace["cells"], path)
    before = path.read_bytes()
    table = CellTable.load(path)
    table.count = table.count + 1
    _kill_at_replace(monkeypatch, 1)
    with pytest.raises(Killed):
        table.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cells.csv"], "the temp file is removed"
