"""Data-parallel training and extraction: a 2-process gloo job on localhost (as ``torchrun --nproc-per-node 2``
would run it) trains the same heads as one process, resumes from rank 0's checkpoint, and extracts the same
features; fine-tuning streams from shards on both ranks. Tiny synthetic data, so it takes seconds."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from geoswc.core import distributed, tensor_files
from geoswc.core.config import BackboneConfig, CellConfig, HeadConfig, ModelConfig, Preprocess, TrainConfig
from geoswc.core.errors import SettingError
from geoswc.data.records import Record
from geoswc.data.shards import write_shards
from geoswc.geo.cells import build_cells
from geoswc.models.geomodel import GeoModel
from geoswc.models.registry import backbone_fingerprint
from geoswc.training.features import Extraction, Extractor, FeatureSet, extract_and_save
from geoswc.training.finetune import finetune
from geoswc.training.train import train_heads

from .conftest import free_port, jpeg_bytes

DIM = 16
BB = BackboneConfig(name="tiny", weights="none", feature_dim=DIM, preprocess=Preprocess(image_size=32))
CFG = TrainConfig(epochs=4, rrm_epochs=3, batch_size=32, lr=3e-3, finetune_epochs=1, seed=3)
VAL_CFG = dataclasses.replace(CFG, val_fraction=0.25)


class TinyBackbone(nn.Module):
    """``(B, 3, 32, 32)`` -> ``(B, 16)``; the same weights in every process."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 8, 5, stride=4)
            self.fc = nn.Linear(8, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _data() -> tuple[FeatureSet, object]:
    """101 photos around 4 places, features that encode the place (+ noise), 2 views each."""
    rng = np.random.default_rng(0)
    centres = np.array([[48.85, 2.35], [40.7, -74.0], [-33.9, 151.2], [35.7, 139.7]])
    which = rng.integers(4, size=101)
    lat = centres[which, 0] + rng.normal(0, 0.05, 101)
    lon = centres[which, 1] + rng.normal(0, 0.05, 101)
    proto = rng.normal(size=(4, DIM))
    feats = proto[which][:, None, :] + 0.3 * rng.normal(size=(101, 2, DIM))
    authors = [f"u{i % 9}" if i % 5 else "" for i in range(101)]
    fs = FeatureSet(
        torch.tensor(feats, dtype=torch.float32),
        [f"p{i}.jpg" for i in range(101)],
        authors,
        lat,
        lon,
        BB,
        backbone_fingerprint(BB),
    )
    pts = np.concatenate([lat, rng.uniform(-60, 70, 200)]), np.concatenate([lon, rng.uniform(-180, 180, 200)])
    cells = build_cells(*pts, CellConfig(max_per_cell=30, min_per_cell=1))
    return fs, cells


def _extractor() -> Extractor:
    return Extractor(TinyBackbone(), BB, backbone_fingerprint(BB))


def _model(cells, backbone: nn.Module | None = None) -> GeoModel:
    return GeoModel(ModelConfig(backbone=BB, heads=HeadConfig(mvmf_dropout=0.2), train=CFG), cells, backbone)


def _heads(m: GeoModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.head_tensors().items()}


class _Stop(Exception):
    pass


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(  # what torchrun --nproc-per-node 2 sets
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_RUN_ID="test",
    )
    torch.set_num_threads(1)
    eng = distributed.start("cpu")
    assert eng.enabled and eng.rank == rank and eng.world_size == world
    assert type(eng.fabric.strategy).__name__ == "DDPStrategy" and eng.precision == "32-true"
    tmp_path = Path(tmp)
    out: dict[str, torch.Tensor] = {}
    try:
        fs, cells = _data()
        writes = {"n": 0}
        save = tensor_files.save_tensors

        def counting_save(*a, **k):
            writes["n"] += 1
            return save(*a, **k)

        tensor_files.save_tensors = counting_save
        try:
            m = _model(cells)
            train_heads(m, fs, CFG, checkpoint_dir=tmp_path / "ckpt", progress=False)
        finally:
            tensor_files.save_tensors = save
        out |= {f"full.{k}": v for k, v in _heads(m).items()}
        out["writes"] = torch.tensor(writes["n"])
        m_val = _model(cells)
        out["val_nll"] = torch.tensor(train_heads(m_val, fs, VAL_CFG, progress=False)["mvmf_val"])
        out |= {f"val.{k}": v for k, v in _heads(m_val).items()}

        # killed during the 3rd MvMF epoch on both ranks, then resumed from rank 0's checkpoint
        step, calls = torch.optim.AdamW.step, {"n": 0}

        def dying(self, *a, **k):
            calls["n"] += 1
            if calls["n"] > 9:
                raise _Stop
            return step(self, *a, **k)

        torch.optim.AdamW.step = dying
        try:
            train_heads(_model(cells), fs, CFG, checkpoint_dir=tmp_path / "ckpt2", progress=False)
        except _Stop:
            pass
        finally:
            torch.optim.AdamW.step = step
        eng.barrier()
        resumed = _model(cells)
        train_heads(resumed, fs, CFG, checkpoint_dir=tmp_path / "ckpt2", progress=False)
        out |= {f"resumed.{k}": v for k, v in _heads(resumed).items()}

        # feature extraction: shards and records split over the ranks, merged by rank 0
        extract_and_save(
            tmp_path / "f-shards",
            _extractor(),
            shards=str(tmp_path / "shards"),
            how=Extraction(views=2, batch_size=3, progress=False),
        )
        recs = [Record(p.name, p, 1.0, 2.0, "") for p in sorted((tmp_path / "img").iterdir())]
        extract_and_save(
            tmp_path / "f-records", _extractor(), records=recs, how=Extraction(batch_size=3, progress=False)
        )

        # fine-tuning streamed from shards (DDP over gloo): runs, and leaves the ranks with equal weights
        ft = _model(cells, TinyBackbone())
        hist = finetune(ft, str(tmp_path / "shards"), CFG, checkpoint_dir=tmp_path / "ckpt-ft", progress=False)
        out["ft_loss"] = torch.tensor(hist["finetune"])
        out |= {f"ft.{k}": v.detach().clone() for k, v in ft.backbone.state_dict().items()}
        torch.save(out, tmp_path / f"rank{rank}.pt")
        eng.barrier()  # both ranks done before either leaves the group
    finally:
        distributed.stop()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "img").mkdir()
    rng = np.random.default_rng(1)
    recs = []
    for i in range(11):
        p = tmp / "img" / f"{i:02d}.jpg"
        p.write_bytes(jpeg_bytes((40 + 3 * i, 36), color=tuple(int(c) for c in rng.integers(0, 255, 3))))
        recs.append(Record(p.name, p, float(rng.uniform(-50, 50)), float(rng.uniform(-150, 150)), f"a{i % 3}"))
    (tmp / "img" / "05.jpg").write_bytes(jpeg_bytes((40, 36))[:700])  # truncated: kept in shards, fails to decode
    write_shards(recs, tmp / "shards", samples_per_shard=3, verify=False, progress=False)
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), str(tmp)), nprocs=2, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
def test_two_processes_train_the_one_process_model(two_ranks, tmp_path):
    _, (r0, r1) = two_ranks
    fs, cells = _data()
    single = _model(cells)
    train_heads(single, fs, CFG, progress=False)
    for k, v in _heads(single).items():
        assert torch.equal(r0[f"full.{k}"], r1[f"full.{k}"]), k  # ranks agree exactly
        assert torch.allclose(r0[f"full.{k}"], v, rtol=1e-3, atol=1e-4), (k, (r0[f"full.{k}"] - v).abs().max())
    assert int(r0["writes"]) > 0 and int(r1["writes"]) == 0  # only rank 0 writes checkpoints


@pytest.mark.slow
def test_two_processes_choose_the_one_process_mvmf_epoch(two_ranks):
    """With a held-out share of photographers, both ranks score the same epochs and keep the same head as
    one process does."""
    _, (r0, r1) = two_ranks
    fs, cells = _data()
    single = _model(cells)
    hist = train_heads(single, fs, VAL_CFG, progress=False)
    assert torch.equal(r0["val_nll"], r1["val_nll"])
    assert torch.allclose(r0["val_nll"].double(), torch.tensor(hist["mvmf_val"], dtype=torch.float64), atol=1e-3)
    for k, v in _heads(single).items():
        assert torch.equal(r0[f"val.{k}"], r1[f"val.{k}"]), k
        assert torch.allclose(r0[f"val.{k}"], v, rtol=1e-3, atol=1e-4), k


@pytest.mark.slow
def test_resume_after_a_kill_under_ddp(two_ranks):
    _, (r0, r1) = two_ranks
    for k in [k for k in r0 if k.startswith("full.")]:
        assert torch.allclose(r0[k], r0[k.replace("full.", "resumed.")], rtol=1e-5, atol=1e-6), k
        assert torch.equal(r0[k.replace("full.", "resumed.")], r1[k.replace("full.", "resumed.")]), k


@pytest.mark.slow
def test_distributed_features_equal_one_process(two_ranks, tmp_path):
    tmp, _ = two_ranks
    recs = [Record(p.name, p, 1.0, 2.0, "") for p in sorted((tmp / "img").iterdir())]
    for name, kw, views in (("f-shards", {"shards": str(tmp / "shards")}, 2), ("f-records", {"records": recs}, 1)):
        how = Extraction(views, batch_size=4, progress=False)
        one, report = extract_and_save(tmp_path / name, _extractor(), how=how, **kw)
        two = FeatureSet.load(tmp / name)
        assert len(one) == 10 and two.names == one.names and two.authors == one.authors
        assert (two.lat == one.lat).all() and report.skipped[0][0].startswith("05.jpg")
        assert torch.allclose(two.features.float(), one.features.half().float(), rtol=1e-3, atol=1e-4)
    assert not (tmp / "f-shards" / ".parts").exists()


@pytest.mark.slow
def test_streamed_finetune_under_ddp(two_ranks):
    _, (r0, r1) = two_ranks
    assert np.isfinite(r0["ft_loss"].numpy()).all() and torch.equal(r0["ft_loss"], r1["ft_loss"])
    for k in [k for k in r0 if k.startswith("ft.")]:
        assert torch.equal(r0[k], r1[k]), k


@pytest.mark.slow
def test_geoswc_train_under_torchrun_runs_on_fabric_ddp(tmp_path):
    """``torchrun --nproc-per-node 2 -m geoswc train``: Fabric's DDP strategy on gloo, said once, and one model."""
    fs, cells = _data()
    fs.save(tmp_path / "features")
    cells.save(tmp_path / "cells.csv")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CI", None)  # (nothing here reads it; keep the child's logging as a user's)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    args = ["-m", "geoswc", "train", "--features", str(tmp_path / "features"), "--cells", str(tmp_path / "cells.csv")]
    args += ["--out", str(tmp_path / "model"), "--train.epochs", "2", "--train.rrm_epochs", "1", "--run.device", "cpu"]
    done = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if "Lightning Fabric DDPStrategy" in line]
    assert len(said) == 1 and "2 process(es) on cpu, gloo, precision 32-true" in said[0], done.stderr[-3000:]
    assert GeoModel.load(tmp_path / "model", with_backbone=False).config.train.epochs == 2


def test_precisions_map_onto_fabric_names_with_one_line_errors():
    cpu = torch.device("cpu")
    assert [distributed.fabric_precision(cpu, p) for p in ("auto", "fp32", "bf16")] == [
        "32-true",
        "32-true",
        "bf16-mixed",
    ]
    with pytest.raises(SettingError, match="fp16 needs a CUDA GPU; on a CPU use bf16 or fp32") as e:
        distributed.fabric_precision(cpu, "fp16")
    assert e.value.field == "precision" and "\n" not in str(e.value)
    with pytest.raises(SettingError, match="precision must be one of auto, fp32, bf16, fp16, got 'half'"):
        distributed.fabric_precision(cpu, "half")


def test_a_bf16_engine_trains_the_heads_on_the_cpu():
    """``--run.precision bf16`` on a CPU is Fabric's bf16-mixed (autocast), not silently fp32: the losses differ
    from fp32's by rounding, not more."""
    fs, cells = _data()
    fp32 = train_heads(_model(cells), fs, CFG, progress=False)
    eng = distributed.start("cpu", "bf16")
    try:
        assert eng.precision == "bf16-mixed" and not eng.enabled
        with eng.autocast():
            assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.bfloat16
        bf16 = train_heads(_model(cells), fs, CFG, progress=False)
    finally:
        distributed.stop()
    for phase, tol in (("mvmf", 0.8), ("rrm", 0.02)):
        a, b = np.array(fp32[phase]), np.array(bf16[phase])
        assert np.isfinite(b).all() and np.abs(a - b).max() < tol and not np.array_equal(a, b), (phase, a, b)
    assert distributed.world_size() == 1 and distributed.engine().precision == "32-true"  # stopped: the default


def test_fp16_on_a_cpu_is_refused_by_the_cli_naming_the_flag(tmp_path, capsys):
    from geoswc.cli import main

    fs, cells = _data()
    fs.save(tmp_path / "f")
    cells.save(tmp_path / "c.csv")
    rc = main(
        ["train", "--features", str(tmp_path / "f"), "--cells", str(tmp_path / "c.csv"), "--out", str(tmp_path / "m")]
        + ["--run.device", "cpu", "--run.precision", "fp16"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--run.precision" in err and "fp16 needs a CUDA GPU" in err, err
    assert not (tmp_path / "m" / "config.json").exists()
