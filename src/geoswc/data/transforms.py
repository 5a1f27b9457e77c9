"""Image -> tensor preprocessing (stored with every model) and training augmentation, in PIL + NumPy."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageEnhance

from geoswc.core.config import Preprocess
from geoswc.data.images import FULL_SIZE

_MAX_ASPECT = 8
"""Beyond this aspect ratio, center_crop crops before resizing (bounded memory)."""


_RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
"""PIL's filter for each :attr:`Preprocess.interpolation`."""


def _resample(img: Image.Image, size: tuple[int, int], pre: Preprocess) -> Image.Image:
    """``img`` resized to ``size`` with ``pre``'s interpolation."""
    return img.resize(size, _RESAMPLING[pre.interpolation], reducing_gap=3.0)


def _center(img: Image.Image, s: int) -> Image.Image:
    """The central ``s`` x ``s`` square of ``img`` (at least that large)."""
    w, h = img.size
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def _resize(img: Image.Image, pre: Preprocess) -> Image.Image:
    """``img`` at ``pre.image_size`` square: resized to ``round(image_size / crop_fraction)`` (the shorter side
    for ``center_crop``, the whole square for ``squash``), then the central square."""
    s = pre.image_size
    r = round(s / pre.crop_fraction)
    if pre.resize == "squash":
        return _center(_resample(img, (r, r), pre), s)
    w, h = img.size
    if max(w, h) > _MAX_ASPECT * min(w, h):
        # A 1 x 30000 image would be scaled to 224 x 6.7M pixels before the crop (GBs of memory): crop the
        # central square first. Ordinary photos keep the resize-then-crop path (bit-identical features).
        img = _center(img, min(w, h))
        w, h = img.size
    else:
        # A draft-decoded JPEG is resized to the size its full decode would be: the same crop, no shift.
        w, h = img.info.get(FULL_SIZE, (w, h))
    scale = r / min(w, h)
    return _center(_resample(img, (max(r, round(w * scale)), max(r, round(h * scale))), pre), s)


def to_tensor(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    """Normalised ``(3, S, S)`` float32 tensor of an RGB image already at size ``S``."""
    a = np.asarray(img, dtype=np.float32) / 255.0
    a -= np.asarray(pre.mean, np.float32)  # in place: the same arithmetic, two fewer (S, S, 3) copies
    a /= np.asarray(pre.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def preprocess(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    """The deterministic evaluation transform: resize per ``pre.resize``, normalise. ``(3, S, S)``."""
    return to_tensor(_resize(img, pre), pre)


def augment(img: Image.Image, pre: Preprocess, rng: np.random.Generator) -> torch.Tensor:
    """A random training view: resized crop (40-100 % of the area), horizontal flip, mild colour jitter.

    Geolocation cues (skyline, vegetation, signage layout) survive these; rotations and strong colour
    changes would not, so they are left out.
    """
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(0.4, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = round(np.sqrt(target * ratio)), round(np.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = img.crop((x0, y0, x0 + cw, y0 + ch))
            break
    s = pre.image_size
    img = _resample(img, (s, s), pre)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.8, 1.2))
    return to_tensor(img, pre)
