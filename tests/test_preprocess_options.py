"""The evaluation crop (``crop_fraction``, timm's ``crop_pct``) and the interpolation of :class:`Preprocess`: their
defaults keep every transform bit-identical and every saved config, and its digests, as before they existed."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import geoswc
from geoswc.core.config import (
    LATER,
    BackboneConfig,
    ModelConfig,
    Preprocess,
    canonical_json,
    digest,
    from_dict,
    non_default,
    to_dict,
)
from geoswc.core.errors import ArtifactError, SettingError
from geoswc.data.transforms import augment, preprocess, to_tensor
from geoswc.models import registry
from geoswc.models.backbone import BackboneChoice, default_config
from geoswc.models.registry import backbone_fingerprint

NEW_KEYS = ("crop_fraction", "interpolation")


def _old_dict(obj: object) -> dict:
    """``to_dict`` as it was before the new fields: every field, then the new ones removed."""
    d = json.loads(json.dumps(dataclasses.asdict(obj)))  # type: ignore[call-overload]
    pre = d["preprocess"] if "preprocess" in d else d["backbone"]["preprocess"] if "backbone" in d else d
    for k in NEW_KEYS:
        pre.pop(k)
    return d


def _old_resize(img: Image.Image, pre: Preprocess) -> Image.Image:
    """The evaluation resize before crop_fraction and interpolation existed, verbatim."""
    s = pre.image_size
    if pre.resize == "squash":
        return img.resize((s, s), Image.Resampling.BICUBIC, reducing_gap=3.0)
    w, h = img.size
    if max(w, h) > 8 * min(w, h):
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        w, h = img.size
    scale = s / min(w, h)
    nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - s) // 2, (nh - s) // 2
    return img.crop((left, top, left + s, top + s))


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """PIL's resizes from now on, as ``(size, resample, reducing_gap)``."""
    calls: list[tuple] = []
    resize = Image.Image.resize

    def recorded(self: Image.Image, size: tuple[int, int], resample: int | None = None, *a: object, **k: object):
        calls.append((tuple(size), resample, k.get("reducing_gap")))
        return resize(self, size, resample, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(Image.Image, "resize", recorded)
    return calls


def _textured(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _framed(w: int = 400, h: int = 300, border: int = 10) -> Image.Image:
    """Red, with a green centre inset by ``border`` pixels."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = 255
    a[border : h - border, border : w - border] = (0, 255, 0)
    return Image.fromarray(a)


# --- serialisation and fingerprints -------------------------------------------------------------------------


def test_defaults_serialise_exactly_as_before():
    assert set(to_dict(Preprocess())) == {"image_size", "mean", "std", "resize"}
    assert to_dict(BackboneConfig()) == _old_dict(BackboneConfig())
    assert not set(NEW_KEYS) & set(to_dict(BackboneConfig())["preprocess"])
    assert to_dict(ModelConfig()) == _old_dict(ModelConfig())
    assert from_dict(Preprocess, to_dict(Preprocess())) == Preprocess()  # the missing keys come back as defaults
    assert from_dict(Preprocess, {"image_size": 224}) == Preprocess()
    assert non_default(Preprocess()) == {}


def test_a_non_default_value_is_recorded_and_round_trips():
    pre = Preprocess(crop_fraction=0.875, interpolation="bilinear")
    d = to_dict(pre)
    assert d["crop_fraction"] == 0.875 and d["interpolation"] == "bilinear"
    assert from_dict(Preprocess, d) == pre
    assert set(to_dict(Preprocess(crop_fraction=0.875))) == {"image_size", "mean", "std", "resize", "crop_fraction"}
    assert non_default(Preprocess(crop_fraction=0.875)) == {"crop_fraction": 0.875}
    cfg = BackboneConfig(preprocess=pre)
    assert from_dict(BackboneConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    model = ModelConfig(backbone=cfg)
    assert from_dict(ModelConfig, to_dict(model)) == model
    assert to_dict(model)["backbone"]["preprocess"]["interpolation"] == "bilinear"


def test_the_backbone_fingerprint_of_a_default_config_is_the_old_one():
    for cfg in (BackboneConfig(), default_config("efficientnet-b4"), default_config("siglip-base")):
        old = digest(canonical_json(_old_dict(cfg)))
        assert backbone_fingerprint(cfg) == old
    changed = BackboneConfig(preprocess=Preprocess(crop_fraction=0.875))
    assert backbone_fingerprint(changed) != backbone_fingerprint(BackboneConfig())  # other features, other digest
    bilinear = BackboneConfig(preprocess=Preprocess(interpolation="bilinear"))
    assert backbone_fingerprint(bilinear) not in (backbone_fingerprint(BackboneConfig()), backbone_fingerprint(changed))


def test_the_embedded_model_keeps_its_backbone_fingerprint():
    meta = json.loads((Path(geoswc.__file__).parent / "assets" / "default" / "config.json").read_text())
    cfg = from_dict(ModelConfig, meta["config"])
    assert cfg.backbone.preprocess.crop_fraction == 1.0 and cfg.backbone.preprocess.interpolation == "bicubic"
    assert to_dict(cfg.backbone) == meta["config"]["backbone"]
    assert backbone_fingerprint(cfg.backbone) == meta["backbone_fingerprint"]


def test_later_fields_are_left_out_generically_and_recursively():
    @dataclass(frozen=True)
    class Inner:
        a: int = 1
        b: tuple[int, ...] = field(default_factory=tuple, metadata=LATER)

    @dataclass(frozen=True)
    class Outer:
        inner: Inner = field(default_factory=Inner)
        items: list[Inner] = field(default_factory=list)
        extra: Inner = field(default_factory=Inner, metadata=LATER)
        c: str = field(default="x", metadata=LATER)

    assert to_dict(Outer()) == {"inner": {"a": 1}, "items": []}
    o = Outer(items=[Inner(), Inner(2, (3,))], extra=Inner(5), c="y")
    assert to_dict(o) == {
        "inner": {"a": 1},
        "items": [{"a": 1}, {"a": 2, "b": [3]}],
        "extra": {"a": 5},
        "c": "y",
    }
    assert to_dict(Outer(extra=Inner())) == to_dict(Outer())


# --- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [("crop_fraction", 0.2), ("crop_fraction", 1.5), ("crop_fraction", float("nan")), ("interpolation", "lanczos")],
)
def test_bad_values_are_refused_naming_the_field(name, value):
    with pytest.raises(SettingError, match=name) as e:
        Preprocess(**{name: value})
    assert e.value.field == name and e.value.owner is Preprocess and len(str(e.value).splitlines()) == 1
    with pytest.raises(SettingError, match=name) as e:
        BackboneChoice(**{name: value})
    assert e.value.field == name and e.value.owner is BackboneChoice  # the CLI names --backbone.<name>
    with pytest.raises(ArtifactError, match=name):  # a saved config with a bad value is refused on loading
        from_dict(Preprocess, {name: value})


def test_the_bounds_are_accepted():
    assert Preprocess(crop_fraction=0.5).crop_fraction == 0.5
    assert Preprocess(crop_fraction=1).crop_fraction == 1 and to_dict(Preprocess(crop_fraction=1)) == to_dict(
        Preprocess()
    )


# --- the registry and the --backbone flags ------------------------------------------------------------------


def test_default_config_passes_the_spec_through(monkeypatch):
    assert all(s.crop_fraction == 1.0 and s.interpolation == "bicubic" for s in registry.REGISTRY.values())
    spec = registry.get_spec("efficientnet-lite0")
    monkeypatch.setitem(
        registry.REGISTRY, spec.name, dataclasses.replace(spec, crop_fraction=0.875, interpolation="bilinear")
    )
    pre = default_config(spec.name).preprocess
    assert (pre.crop_fraction, pre.interpolation) == (0.875, "bilinear")
    pre = default_config(spec.name, crop_fraction=1.0, interpolation="bicubic").preprocess
    assert (pre.crop_fraction, pre.interpolation) == (1.0, "bicubic")


def test_backbone_choice_sets_them():
    assert BackboneChoice().resolve() == dataclasses.replace(default_config(), weights="default")
    pre = BackboneChoice(crop_fraction=0.875, interpolation="bilinear").resolve().preprocess
    assert (pre.crop_fraction, pre.interpolation) == (0.875, "bilinear")
    squash = BackboneChoice("siglip-base", crop_fraction=0.9).resolve().preprocess
    assert (squash.resize, squash.crop_fraction) == ("squash", 0.9)


# --- the transforms -----------------------------------------------------------------------------------------

SHAPES = [(400, 300), (300, 400), (1, 300), (300, 1), (224, 224), (97, 61)]


@pytest.mark.parametrize("size", SHAPES)
@pytest.mark.parametrize("resize", ["center_crop", "squash"])
def test_the_defaults_are_bit_identical_to_the_old_transform(size, resize):
    img = _textured(*size)
    pre = Preprocess(image_size=64, resize=resize)
    old = to_tensor(_old_resize(img, pre), pre)
    assert torch.equal(preprocess(img, pre), old)
    assert torch.equal(preprocess(img, Preprocess(image_size=64, resize=resize, crop_fraction=1.0)), old)


def test_crop_fraction_resizes_the_shorter_side_to_size_over_fraction(monkeypatch):
    img, pre = _framed(), Preprocess(image_size=224, crop_fraction=0.875)
    calls = _recording(monkeypatch)
    out = preprocess(img, pre)
    assert calls == [((341, 256), Image.Resampling.BICUBIC, 3.0)]  # 300 -> 256 = round(224 / 0.875), 400 -> 341
    assert out.shape == (3, 224, 224)
    expect = img.resize((341, 256), Image.Resampling.BICUBIC, reducing_gap=3.0).crop((58, 16, 282, 240))
    assert torch.equal(out, to_tensor(expect, pre))
    # The red frame (10 of 300 pixels, 8.5 of 256) lies inside the 16 rows cut away: the top row is green.
    top = out[:, 0, :]
    assert (top[1] > 0.9).all() and (top[0] < -0.9).all()
    # Without the margin (1.0) the frame is kept at the top.
    assert (preprocess(img, Preprocess(image_size=224))[0, 0, 100:120] > 0.9).all()


def test_crop_fraction_with_squash_resizes_the_whole_image_then_crops():
    img, pre = _textured(400, 300), Preprocess(image_size=224, resize="squash", crop_fraction=0.875)
    expect = img.resize((256, 256), Image.Resampling.BICUBIC, reducing_gap=3.0).crop((16, 16, 240, 240))
    assert torch.equal(preprocess(img, pre), to_tensor(expect, pre))


def test_crop_fraction_keeps_the_long_aspect_guard():
    img, pre = _textured(1, 3000), Preprocess(image_size=64, crop_fraction=0.5)
    assert preprocess(img, pre).shape == (3, 64, 64)
    expect = img.crop((0, 1499, 1, 1500)).resize((128, 128), Image.Resampling.BICUBIC, reducing_gap=3.0)
    assert torch.equal(preprocess(img, pre), to_tensor(expect.crop((32, 32, 96, 96)), pre))


def test_bilinear_differs_from_bicubic_and_is_pils_bilinear():
    img = _textured(400, 300)
    bicubic, bilinear = Preprocess(), Preprocess(interpolation="bilinear")
    assert not torch.equal(preprocess(img, bicubic), preprocess(img, bilinear))
    expect = img.resize((299, 224), Image.Resampling.BILINEAR, reducing_gap=3.0).crop((37, 0, 261, 224))
    assert torch.equal(preprocess(img, bilinear), to_tensor(expect, bilinear))


def test_augment_uses_the_interpolation_and_bicubic_stays_the_default(monkeypatch):
    img = _textured(300, 200)
    default = augment(img, Preprocess(image_size=64), np.random.default_rng(3))
    bilinear = augment(img, Preprocess(image_size=64, interpolation="bilinear"), np.random.default_rng(3))
    assert default.shape == bilinear.shape == (3, 64, 64) and not torch.equal(default, bilinear)
    calls = _recording(monkeypatch)
    assert torch.equal(augment(img, Preprocess(image_size=64), np.random.default_rng(3)), default)
    augment(img, Preprocess(image_size=64, interpolation="bilinear"), np.random.default_rng(3))
    assert [c[1:] for c in calls] == [(Image.Resampling.BICUBIC, 3.0), (Image.Resampling.BILINEAR, 3.0)]
