"""Foundation backbones through ``transformers`` (CLIP, DINOv2, SigLIP), offline: the registry entries match
their architectures, missing weights give one clear error without reaching the network, and tiny randomly
initialised models of each family (registered for the test, saved as local weight folders) go through
features -> train -> index -> locate -> evaluate, the ONNX runtime and a 2-process run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from importlib.metadata import requires
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from geoswc import workflow
from geoswc.cli import main
from geoswc.core import distributed
from geoswc.core.config import CellConfig, Preprocess, RunConfig, TrainConfig
from geoswc.core.errors import ArtifactError, InputError, ModelMismatchError, SettingError
from geoswc.data.sources import Photos
from geoswc.models.backbone import BackboneChoice, create_backbone, default_config
from geoswc.models.geomodel import GeoModel
from geoswc.models.hf_backbones import FAMILIES, HFBackbone, architecture, require_transformers
from geoswc.models.registry import REGISTRY, BackboneSpec, HubWeights, register_backbone
from geoswc.training.features import Extractor, FeatureSet

from .conftest import ROOT, free_port, jpeg_bytes, load_script, write_csv

HALF = (0.5, 0.5, 0.5)


def _arch(hidden: int = 32, layers: int = 2, heads: int = 2, patch: int = 8, **more) -> tuple:
    return tuple(
        sorted(
            dict(
                hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, patch_size=patch, **more
            ).items()
        )
    )


TINY = {
    "clip": BackboneSpec(
        "tiny-clip",
        24,
        32,
        (0.48, 0.46, 0.41),
        (0.27, 0.26, 0.28),
        HubWeights("test/tiny-clip"),
        "clip",
        arch=_arch(intermediate_size=64, projection_dim=24, image_size=32),
    ),
    "dinov2": BackboneSpec(
        "tiny-dinov2",
        32,
        32,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        HubWeights("test/tiny-dinov2"),
        "dinov2",
        arch=_arch(image_size=64),
    ),  # 8x8 position grid, interpolated to 4x4
    "siglip": BackboneSpec(
        "tiny-siglip",
        32,
        32,
        HALF,
        HALF,
        HubWeights("test/tiny-siglip"),
        "siglip",
        "squash",
        arch=_arch(intermediate_size=64, image_size=32),
    ),
}
PLACES = np.array([[48.85, 2.35], [40.7, -74.0], [-33.9, 151.2], [35.7, 139.7]])


def register_tiny() -> None:
    """Register the tiny specs (idempotent; also in spawned processes)."""
    for spec in TINY.values():
        REGISTRY.setdefault(spec.name, spec)


def save_tiny(spec: BackboneSpec, folder: Path) -> Path:
    """A tiny model of ``spec``'s family with seeded random weights, saved as ``save_pretrained`` does."""
    tf = require_transformers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        getattr(tf, FAMILIES[spec.family].model_class)(architecture(spec)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny specs registered, their weight folders, and 48 geotagged photos around 4 places (the colour
    says the place)."""
    register_tiny()
    d = tmp_path_factory.mktemp("hf")
    weights = {f: save_tiny(s, d / f"w-{f}") for f, s in TINY.items()}
    (d / "img").mkdir()
    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    rows = []
    for i in range(48):
        k = i % 4
        c = tuple(int(np.clip(v + rng.normal(0, 15), 0, 255)) for v in colours[k])
        (d / "img" / f"{i:02d}.jpg").write_bytes(jpeg_bytes((48 + i % 5, 40), color=c))
        lat, lon = PLACES[k] + rng.normal(0, 0.05, 2)
        rows.append({"image": f"{i:02d}.jpg", "lat": f"{lat:.5f}", "lon": f"{lon:.5f}", "author": f"a{i % 7}"})
    csv_path = write_csv(d / "photos.csv", rows)
    pts = np.concatenate(
        [PLACES + rng.normal(0, 0.05, (4, 2)) for _ in range(30)]
        + [np.column_stack([rng.uniform(-60, 70, 200), rng.uniform(-180, 180, 200)])]
    )
    write_csv(d / "coords.csv", [{"lat": f"{a}", "lon": f"{b}"} for a, b in pts], columns=("lat", "lon"))
    workflow.cells(d / "coords.csv", d / "cells.csv", CellConfig(max_per_cell=40, min_per_cell=5))
    yield {"dir": d, "weights": weights, "csv": csv_path, "images": d / "img", "cells": d / "cells.csv"}
    for spec in TINY.values():
        REGISTRY.pop(spec.name, None)


# -- the registry ----------------------------------------------------------------------------------------


def test_registry_has_the_foundation_families_with_their_preprocessing():
    want = {
        "clip-vit-l14": ("openai/clip-vit-large-patch14", 768),
        "clip-vit-b16": ("openai/clip-vit-base-patch16", 512),
        "clip-vit-b32": ("openai/clip-vit-base-patch32", 512),
        "dinov2-small": ("facebook/dinov2-small", 384),
        "dinov2-base": ("facebook/dinov2-base", 768),
        "siglip-base": ("google/siglip-base-patch16-224", 768),
    }
    for name, (mid, dim) in want.items():
        spec = REGISTRY[name]
        assert spec.weights_source == HubWeights(mid) and spec.feature_dim == dim and spec.image_size == 224
    clip = default_config("clip-vit-l14").preprocess
    assert clip == Preprocess(
        224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "center_crop"
    )
    assert default_config("dinov2-base").preprocess == Preprocess(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert default_config("siglip-base").preprocess == Preprocess(224, HALF, HALF, "squash")  # SigLIP resizes whole
    assert default_config("siglip-base", 256, "center_crop").preprocess.resize == "center_crop"
    assert BackboneChoice("dinov2-small", image_size=448).resolve().preprocess.image_size == 448
    with pytest.raises(InputError, match="already registered"):
        register_backbone(REGISTRY["dinov2-small"])


@pytest.mark.slow
def test_registry_sizes_and_widths_are_those_of_the_architectures():
    """Parameter counts and feature widths of every entry, from its architecture built without memory."""
    for spec in REGISTRY.values():
        with torch.device("meta"):
            bb, cfg = create_backbone(dataclasses.replace(default_config(spec.name), weights="none"))
        assert abs(sum(p.numel() for p in bb.net.parameters()) / 1e6 - spec.params_m) < 0.006, spec.name
        assert cfg.feature_dim == bb.feature_dim == spec.feature_dim
        if spec.family == "clip":
            assert bb.net.config.projection_dim == spec.feature_dim
        elif not spec.family.startswith("efficientnet"):
            assert bb.net.config.hidden_size == spec.feature_dim


@pytest.mark.slow
def test_plain_install_pulls_no_transformers():
    reqs = [r.replace(" ", "") for r in requires("geoswc") or []]  # the installed metadata of pyproject.toml
    assert not [r for r in reqs if r.startswith("transformers") and "extra==" not in r]
    for extra in ("hf", "dev", "bench"):
        assert any(r.startswith("transformers") and f'extra=="{extra}"' in r for r in reqs), extra
    code = (
        "import sys, geoswc, geoswc.cli, geoswc.workflow, geoswc.models.backbone, geoswc.prediction.geolocator; "
        "from geoswc.cli import main; main(['backbones']); assert 'transformers' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "clip-vit-l14" in r.stdout and "304.0M" in r.stdout


def test_backbones_command_lists_the_new_families(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("clip-vit-l14"))
    assert "768-d" in line and "224 px" in line and "projected image embedding" in line and "303.97" not in line
    assert "openai/clip-vit-large-patch14" in line and "304.0M" in line
    assert "squash" in next(x for x in out.splitlines() if x.startswith("siglip-base"))
    assert "384-d" in next(x for x in out.splitlines() if x.startswith("dinov2-small"))


# -- weights ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ["HF_HUB_OFFLINE", "torchrun rank"])
def test_missing_weights_give_one_clear_error_offline(env, tmp_path, monkeypatch):
    """Not in the cache: one error naming the model id and the offline way, at once (no network, no hang)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    if env == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # a torchrun rank only reads the cache
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
    t0 = time.monotonic()
    with pytest.raises(ArtifactError) as e:
        create_backbone(default_config("clip-vit-l14"))
    assert time.monotonic() - t0 < 60
    msg = str(e.value)
    assert "openai/clip-vit-large-patch14" in msg and "--backbone.weights DIR" in msg and "hf download" in msg
    assert "\n" not in msg


def test_weights_folder_is_checked(tiny, tmp_path):
    spec = TINY["clip"]
    with pytest.raises(InputError, match="folder holding a saved Hugging Face model"):
        create_backbone(dataclasses.replace(default_config(spec.name), weights=str(tmp_path)))
    REGISTRY["tiny-clip-wide"] = dataclasses.replace(
        spec, name="tiny-clip-wide", arch=_arch(64, intermediate_size=64, projection_dim=24, image_size=32)
    )
    try:
        with pytest.raises(ArtifactError, match="not a tiny-clip-wide .config differs: hidden_size 32 vs 64"):
            create_backbone(dataclasses.replace(default_config("tiny-clip-wide"), weights=str(tiny["weights"]["clip"])))
    finally:
        REGISTRY.pop("tiny-clip-wide")
    # loaded weights are digested; another folder with other weights is refused where these were recorded
    _, resolved = create_backbone(dataclasses.replace(default_config(spec.name), weights=str(tiny["weights"]["clip"])))
    assert len(resolved.weights_sha256) == 16 and resolved.feature_dim == 24
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        tf = require_transformers()
        getattr(tf, FAMILIES["clip"].model_class)(architecture(spec)).save_pretrained(tmp_path / "other")
    with pytest.raises(ArtifactError, match="differ from the ones this model was built with"):
        create_backbone(dataclasses.replace(resolved, weights=str(tmp_path / "other")))


@pytest.mark.parametrize("family", list(TINY))
def test_pooled_output_is_the_documented_one(tiny, family):
    spec = TINY[family]
    bb, _ = create_backbone(dataclasses.replace(default_config(spec.name), weights=str(tiny["weights"][family])))
    assert isinstance(bb, HFBackbone) and len(bb.blocks()) == 2
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = bb.net(pixel_values=x)
        f = bb(x)
    assert f.shape == (3, spec.feature_dim)
    if family == "clip":  # the projection of the final-layer-norm CLS
        assert torch.allclose(f, out.image_embeds) and not torch.allclose(f[:, :24], out.last_hidden_state[:, 0, :24])
    elif family == "dinov2":
        assert torch.allclose(f, out.last_hidden_state[:, 0])  # last_hidden_state is after the final layer norm
    else:
        assert torch.allclose(f, out.pooler_output)
    # other input sizes: the position embeddings are interpolated
    bb2, _ = create_backbone(dataclasses.replace(default_config(spec.name, 48), weights=str(tiny["weights"][family])))
    with torch.no_grad():
        assert bb2(torch.randn(2, 3, 48, 48)).shape == (2, spec.feature_dim)


def test_last_blocks_fine_tuning_freezes_the_rest():
    register_tiny()
    bb, _ = create_backbone(dataclasses.replace(default_config("tiny-dinov2"), weights="none"))
    bb.train_last_blocks(1)
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("net.encoder.layer.1.", "net.layernorm.")) for n in trainable)
    assert bb.train_last_blocks(0) == len(list(bb.parameters()))
    with pytest.raises(SettingError, match="finetune_blocks must be in 0..2"):
        bb.train_last_blocks(3)
    eff, _ = create_backbone(dataclasses.replace(default_config("efficientnet-lite0", 64), weights="none"))
    eff.train_last_blocks(2)
    eff.train()
    stem_bn = eff.net._bn0
    assert not stem_bn.training and eff.net._bn1.training and not stem_bn.weight.requires_grad
    assert eff.net._blocks[-1]._bn2.training and not eff.net._blocks[0]._bn1.training


# -- end to end ------------------------------------------------------------------------------------------


def _photos(tiny) -> Photos:
    return Photos(csv=tiny["csv"], images=tiny["images"])


@pytest.mark.slow
@pytest.mark.parametrize("family", list(TINY))
def test_end_to_end_offline(tiny, family, tmp_path, monkeypatch):
    """features -> train -> index -> locate (torch and ONNX) -> evaluate, through the commands, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GEOSWC_CACHE_DIR", str(tmp_path / "cache"))
    spec, w = TINY[family], tmp_path
    assert (
        main(
            [
                "features",
                "--data.csv",
                str(tiny["csv"]),
                "--data.images",
                str(tiny["images"]),
                "--out",
                str(w / "feats"),
                "--backbone.name",
                spec.name,
                "--backbone.weights",
                str(tiny["weights"][family]),
                "--views",
                "2",
                "--run.batch_size",
                "7",
            ]
        )
        == 0
    )
    fs = FeatureSet.load(w / "feats")
    assert fs.features.shape == (48, 2, spec.feature_dim) and fs.backbone.name == spec.name
    assert fs.backbone.preprocess == Preprocess(32, spec.mean, spec.std, spec.resize)  # recorded with the features
    assert (
        main(
            [
                "train",
                "--features",
                str(w / "feats"),
                "--cells",
                str(tiny["cells"]),
                "--out",
                str(w / "model"),
                "--train.epochs",
                "3",
                "--train.rrm_epochs",
                "3",
                "--train.batch_size",
                "16",
            ]
        )
        == 0
    )
    assert GeoModel.read_config(w / "model").backbone == fs.backbone
    assert main(["index", "--model", str(w / "model"), "--features", str(w / "feats")]) == 0
    photos = [str(tiny["images"] / f"{i:02d}.jpg") for i in (0, 1, 2, 3, 9)]
    for runtime in ("torch", "onnx"):
        assert (
            main(
                [
                    "locate",
                    *photos,
                    "--model",
                    str(w / "model"),
                    "--output",
                    str(w / f"{runtime}.jsonl"),
                    "--run.runtime",
                    runtime,
                ]
            )
            == 0
        )
    eager, fast = ([json.loads(x) for x in (w / f"{r}.jsonl").read_text().splitlines()] for r in ("torch", "onnx"))
    assert len(eager) == 5 and [p["cell"] for p in eager] == [p["cell"] for p in fast]
    for a, b in zip(eager, fast, strict=True):
        assert abs(a["lat"] - b["lat"]) < 1e-3 and abs(a["lon"] - b["lon"]) < 1e-3
    record = json.loads(next((w / "cache" / "onnx").glob("backbone-*.json")).read_text())
    assert record["relative_error"] < 1e-4  # the export was compared with eager
    assert (
        main(
            [
                "evaluate",
                "--data.csv",
                str(tiny["csv"]),
                "--data.images",
                str(tiny["images"]),
                "--model",
                str(w / "model"),
                "--out",
                str(w / "eval"),
            ]
        )
        == 0
    )
    metrics = json.loads((w / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 48 and metrics["missing"] == 0
    assert (w / "eval" / "predictions.csv").read_text().count("\n") == 49


@pytest.mark.slow
def test_mixed_backbones_are_refused(tiny, tmp_path):
    """Features of one family, a model of another: index refuses them, naming both fingerprints."""
    feats = {}
    for family in ("clip", "siglip"):
        feats[family] = workflow.features(
            tmp_path / family, _photos(tiny), BackboneChoice(TINY[family].name, str(tiny["weights"][family]))
        )
    workflow.train(tmp_path / "siglip", tiny["cells"], tmp_path / "model", TrainConfig(epochs=1, rrm_epochs=1))
    with pytest.raises(ModelMismatchError, match="come from backbone"):
        workflow.index(tmp_path / "model", features=tmp_path / "clip")
    # and the same family at another size or resize policy is another backbone too
    other = workflow.features(
        tmp_path / "squash",
        _photos(tiny),
        BackboneChoice(TINY["siglip"].name, str(tiny["weights"]["siglip"]), resize="center_crop"),
    )
    assert other.backbone_fingerprint != feats["siglip"].backbone_fingerprint
    with pytest.raises(ModelMismatchError):
        workflow.index(tmp_path / "model", features=tmp_path / "squash")


@pytest.mark.slow
def test_finetune_last_blocks(tiny, tmp_path):
    """``--train.finetune_blocks 1`` trains the last block and what follows at the lower rate; the rest keeps the
    pretrained weights."""
    spec = TINY["dinov2"]
    workflow.features(tmp_path / "f", _photos(tiny), BackboneChoice(spec.name, str(tiny["weights"]["dinov2"])))
    assert (
        main(
            [
                "train",
                "--features",
                str(tmp_path / "f"),
                "--cells",
                str(tiny["cells"]),
                "--out",
                str(tmp_path / "m"),
                "--train.epochs",
                "1",
                "--train.rrm_epochs",
                "1",
                "--train.finetune",
                "true",
                "--train.finetune_blocks",
                "1",
                "--train.finetune_epochs",
                "1",
                "--train.batch_size",
                "16",
                "--data.csv",
                str(tiny["csv"]),
                "--data.images",
                str(tiny["images"]),
            ]
        )
        == 0
    )
    tuned = load_file(str(tmp_path / "m" / "backbone.safetensors"))
    start = create_backbone(BackboneChoice(spec.name, str(tiny["weights"]["dinov2"])).resolve())[0].state_dict()
    assert set(tuned) == set(start)
    changed = {k for k, v in tuned.items() if not torch.equal(v, start[k].to(v.dtype))}  # (stored as float16)
    tail = {k for k in tuned if k.startswith(("net.encoder.layer.1.", "net.layernorm."))}
    assert changed <= tail and len(changed) >= len(tail) - 2, tail - changed  # (a key bias gets no gradient)
    m = GeoModel.load(tmp_path / "m")
    assert m.config.train.finetune_blocks == 1 and m.config.backbone_finetuned
    # the fine-tuned model extracts its own features, which its index accepts
    assert (
        main(
            [
                "index",
                "--model",
                str(tmp_path / "m"),
                "--data.csv",
                str(tiny["csv"]),
                "--data.images",
                str(tiny["images"]),
            ]
        )
        == 0
    )


# -- torchrun --------------------------------------------------------------------------------------------


def _rank(rank: int, world: int, port: int, tmp: str, weights: str, csv_path: str, images: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.pop("HF_HUB_OFFLINE", None)  # the ranks never reach the hub anyway
    torch.set_num_threads(1)
    register_tiny()
    workflow.features(
        Path(tmp) / "ddp",
        Photos(csv=Path(csv_path), images=Path(images)),
        BackboneChoice(TINY["dinov2"].name, weights),
        run=RunConfig(batch_size=5, device="cpu"),
    )


@pytest.mark.slow
def test_features_under_torchrun_equal_one_process(tiny, tmp_path):
    w = str(tiny["weights"]["dinov2"])
    torch.multiprocessing.spawn(
        _rank, args=(2, free_port(), str(tmp_path), w, str(tiny["csv"]), str(tiny["images"])), nprocs=2, join=True
    )
    two = FeatureSet.load(tmp_path / "ddp")
    one = workflow.features(tmp_path / "one", _photos(tiny), BackboneChoice(TINY["dinov2"].name, w))
    assert two.names == one.names and two.backbone_fingerprint == one.backbone_fingerprint
    assert torch.allclose(two.features.float(), one.features.float(), atol=1e-3)
    ex = Extractor.from_config(BackboneChoice(TINY["dinov2"].name, w).resolve())
    assert ex.fingerprint == one.backbone_fingerprint


# -- recipe and benchmarks -------------------------------------------------------------------------------


def _benchmark(name: str):
    return load_script("benchmarks", name)


def test_clip_recipe_builds_every_command():
    from geoswc.recipes import Recipe

    recipe = Recipe.load(ROOT / "recipes" / "clip-l14-mp16.yaml")
    feats = recipe.arguments("features", out="f", data={"shards": "s"})
    assert feats["backbone"].resolve() == default_config("clip-vit-l14") and feats["views"] == 1
    train = recipe.arguments("train", features="f", cells="c.csv", out="m")
    assert not train["train"].finetune and train["search"].k == 10
    assert recipe.arguments("cells", coords="x.csv", out="c.csv")["cells"].max_per_cell == 350
    assert recipe.arguments("evaluate", data={"csv": "t.csv"}, out="e")["methods"] == [
        "swc",
        "classification",
        "retrieval",
    ]
    assert "docs/clip-l14-mp16.md" in (ROOT / "recipes" / "clip-l14-mp16.yaml").read_text()
    assert "recipes/clip-l14-mp16.yaml" in (ROOT / "docs" / "clip-l14-mp16.md").read_text()


def test_throughput_benchmark(tiny, tmp_path, capsys):
    bt = _benchmark("backbone_throughput")
    out = tmp_path / "tp.json"
    assert (
        bt.main(
            ["--out", str(out), "--backbones", "efficientnet-lite0,tiny-dinov2", "--batch-size", "2", "--batches", "1"]
        )
        == 0
    )
    rows = {r["backbone"]: r for r in json.loads(out.read_text())["backbones"]}
    assert abs(rows["efficientnet-lite0"]["gflops_per_image"] - 0.77) < 0.01  # as backbone_peak.py counts it
    assert rows["tiny-dinov2"]["feature_dim"] == 32 and 0 < rows["tiny-dinov2"]["gflops_per_image"] < 0.01
    for r in rows.values():
        assert r["images_per_cpu_s"] > 0 and r["mp16_core_hours"] >= 0
    assert "| efficientnet-lite0 |" in capsys.readouterr().out and out.with_suffix(".md").is_file()


@pytest.mark.slow
def test_backbone_comparison_on_any_labelled_set(tiny, tmp_path, capsys):
    """Two foundation families (local weight folders) compared on a labelled set, author-disjoint."""
    bc = _benchmark("backbone_comparison")
    out = tmp_path / "bc.json"
    backbones = [{"name": TINY[f].name, "weights": str(tiny["weights"][f])} for f in ("dinov2", "siglip")]
    changes = {"cells": {"cells": {"max_per_cell": 40, "min_per_cell": 5}}, "train": {"search": {"select_km": 0}}}
    assert (
        bc.main(
            [
                "--out",
                str(out),
                "--data.csv",
                str(tiny["csv"]),
                "--data.images",
                str(tiny["images"]),
                "--cell_coords",
                str(tiny["dir"] / "coords.csv"),
                "--cache",
                str(tmp_path / "cache"),
                "--quick",
                "true",
                "--backbones",
                json.dumps(backbones),
                "--changes",
                json.dumps(changes),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert [r["backbone"] for r in result["results"]] == ["tiny-dinov2", "tiny-siglip"]
    for r in result["results"]:
        assert r["n"] == 48 and r["folds"] == 2 and r["views"] == 1 and set(bc.METHODS) <= set(r["methods"])
        assert r["choice"]["weights"] == str(tiny["weights"][r["backbone"].split("-")[1]])
    assert result["results"][1]["resize"] == "squash"  # each backbone with its own preprocessing
    table = (tmp_path / "bc.md").read_text()
    assert "| tiny-siglip | 32 | swc |" in table and "| tiny-dinov2 | 32 | retrieval |" in table
