"""Image decoding: odd modes, orientation, and every kind of bad input gets a clear ImageError."""

import io

import numpy as np
import pytest
from PIL import Image

from geoswc.core.errors import ImageError
from geoswc.data.images import ImageLimits, jpeg_is_complete, load_image, read_gps

from .conftest import gps_exif, jpeg_bytes


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("CMYK", "JPEG"),
        ("L", "PNG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("I;16", "PNG"),
        ("1", "PNG"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
        ("RGB", "TIFF"),
    ],
)
def test_modes_decode_to_rgb(mode, fmt):
    img = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode)
    out = load_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (40, 30)


def test_16bit_is_scaled_not_clipped():
    a = np.full((10, 10), 40000, np.uint16)
    out = load_image(encode(Image.fromarray(a), "PNG"))
    assert 150 < np.asarray(out)[0, 0, 0] < 160  # 40000 / 257 = 155.6, not 255


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(load_image(encode(img, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = load_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 60)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("P", (8, 8), i) for i in (1, 2, 3)]
    data = io.BytesIO()
    frames[0].save(data, format="GIF", save_all=True, append_images=frames[1:])
    assert load_image(data.getvalue()).size == (8, 8)


def test_jpeg_draft_decodes_smaller():
    big = Image.new("RGB", (2000, 1500), (1, 2, 3))
    out = load_image(encode(big, "JPEG"), draft_size=224)
    assert 224 <= min(out.size) < 750


@pytest.mark.parametrize("side,quarter", [(2000, False), (4000, False), (2000, True)])
def test_a_draft_decoded_jpeg_gives_the_full_decodes_crop(side, quarter):
    """A big JPEG decoded at a reduced scale (as the reader decodes it) is resized to the full image's geometry:
    the same crop, unshifted, and pixels close to the full decode's (DCT scaling is not bicubic resampling)."""
    from geoswc.core.config import Preprocess
    from geoswc.data.transforms import preprocess

    from .conftest import KAUAI

    src = Image.open(KAUAI).convert("RGB")
    big = src.resize((side, side * src.size[1] // src.size[0]), Image.Resampling.BICUBIC)
    exif = None
    if quarter:  # stored sideways, EXIF orientation 6: the upright photo is the other way round
        big = big.transpose(Image.Transpose.ROTATE_90)
        e = Image.Exif()
        e[0x0112] = 6
        exif = e.tobytes()
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=92, **({"exif": exif} if exif else {}))
    pre = Preprocess(224, (0.5,) * 3, (0.5,) * 3, "center_crop")
    full = load_image(buf.getvalue())
    drafted = load_image(buf.getvalue(), draft_size=2 * pre.image_size)
    assert max(drafted.size) < max(full.size) // 3
    a = preprocess(full, pre).numpy().astype(np.float64) * 127.5  # (3, S, S), in steps of 255
    b = preprocess(drafted, pre).numpy().astype(np.float64) * 127.5
    shifts = {
        (dy, dx): np.abs(a[:, 1 + dy : 223 + dy, 1 + dx : 223 + dx] - b[:, 1:223, 1:223]).mean()
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    }
    assert min(shifts, key=shifts.get) == (0, 0), shifts
    assert np.abs(a - b).mean() < 4.0, np.abs(a - b).mean()  # of 255


@pytest.mark.parametrize(
    "data,kind,msg",
    [
        (b"", "empty", "empty"),
        (b"hello, I am text", "unsupported", "not an image"),
        (b"%PDF-1.4 fake", "unsupported", "not an image"),
        # a real image signature with a header that does not decode: corrupt (HTTP 422), not unsupported (415)
        (b"\xff\xd8\xff" + b"garbage" * 20, "corrupt", "corrupt JPEG"),
        (b"RIFF\x10\x00\x00\x00WEBPjunkjunk", "corrupt", "corrupt WebP"),
        (b"GIF89a" + b"\x00" * 3, "corrupt", "corrupt"),
    ],
)
def test_bad_bytes(data, kind, msg):
    with pytest.raises(ImageError, match=msg) as e:
        load_image(data)
    assert e.value.kind == kind


def test_truncated_jpeg():
    data = jpeg_bytes((256, 256))
    with pytest.raises(ImageError, match="truncated|corrupt") as e:
        load_image(data[: len(data) // 2])
    assert e.value.kind == "corrupt"


def test_jpeg_with_a_zeroed_tail_is_truncated():
    """libjpeg only warns when the second half is zeros (a failed copy): it must not decode to grey."""
    data = jpeg_bytes((256, 256))
    half = len(data) // 2
    with pytest.raises(ImageError, match="truncated") as e:
        load_image(data[:half] + bytes(len(data) - half))
    assert e.value.kind == "corrupt"


@pytest.mark.parametrize("variant", ["baseline", "progressive", "restart_markers", "exif_thumbnail", "trailer"])
def test_complete_jpegs_pass_the_end_marker_check(variant):
    """Valid JPEGs of every structure the check walks: scans with restart markers, progressive scans, an
    EOI inside an embedded EXIF thumbnail, and bytes appended after the image."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    kw: dict = {"progressive": {"progressive": True}, "restart_markers": {"restart_marker_blocks": 1}}.get(variant, {})
    data = encode(img, "JPEG", **kw)
    if variant == "exif_thumbnail":  # an APP1 segment holding a whole JPEG (SOI ... SOS ... EOI)
        thumb = encode(img.resize((16, 12)), "JPEG")
        payload = b"Exif\x00\x00" + thumb
        data = data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]
    if variant == "trailer":
        data += b"\xff\xda vendor trailer without an end marker"
    assert jpeg_is_complete(data)
    assert load_image(data).size == (128, 96)
    cut = data[: len(data) // 2] if variant != "exif_thumbnail" else data[: len(data) - 200]
    assert not jpeg_is_complete(cut)


def test_limits(tmp_path):
    data = encode(Image.new("RGB", (300, 300)), "PNG")
    with pytest.raises(ImageError, match="MP") as e:
        load_image(data, ImageLimits(max_pixels=300 * 299))
    assert e.value.kind == "too_large"
    with pytest.raises(ImageError, match="MiB") as e:
        load_image(data, ImageLimits(max_bytes=100))
    assert e.value.kind == "too_large"


def test_decompression_bomb_is_refused_before_decoding():
    # A PNG whose header claims 30000 x 30000 pixels, made small by being a constant image.
    bomb = encode(Image.new("1", (30000, 30000)), "PNG")
    assert len(bomb) < 200_000
    with pytest.raises(ImageError) as e:
        load_image(bomb)
    assert e.value.kind == "too_large"


def test_paths(tmp_path):
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="cannot be read"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.jpg")


def test_read_gps():
    assert read_gps(jpeg_bytes(exif=gps_exif(-22.5, -159.25))) == pytest.approx((-22.5, -159.25), abs=1e-6)
    assert read_gps(jpeg_bytes()) is None
