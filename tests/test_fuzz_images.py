"""Property-based fuzz of the image readers: mutated JPEG, PNG, WebP and TIFF bytes, mutated EXIF blocks and
absurd GPS rationals go through ``load_image`` and ``read_gps``. Only :class:`ImageError` may come out (or a
decoded RGB image, or a valid position), each example within a deadline, and the process's memory stays
bounded by the limits given."""

from __future__ import annotations

import functools
import io
import math
import resource

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from geoswc.core.errors import ImageError
from geoswc.data.images import ImageLimits, load_image, read_gps

from .conftest import KAUAI, gps_exif_raw

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on the mangled files it reads
LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=4_000_000)
FORMATS = ("JPEG", "PNG", "WEBP", "TIFF")
FUZZ = settings(max_examples=300, deadline=3000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


GOOD_EXIF = gps_exif_raw(((33, 1), (52, 1), (0, 1)), ((151, 1), (12, 1), (30, 1)), b"S", b"E")


@functools.cache
def encoded(fmt: str, exif: bytes = GOOD_EXIF) -> bytes:
    """A small photo (Kauai, 96 x 94) in ``fmt`` carrying ``exif``."""
    img = Image.open(KAUAI).convert("RGB").resize((96, 94))
    buf = io.BytesIO()
    img.save(buf, format=fmt, exif=exif, **({"quality": 85} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


@st.composite
def mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes flipped, set, cut, inserted or repeated, mostly in its first kilobyte
    (headers, EXIF), sometimes anywhere."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        if not out:
            break
        end = len(out) if draw(st.booleans()) else min(len(out), 1024)
        pos = draw(st.integers(0, end - 1))
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "repeat", "truncate"]))
        if op == "flip":
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            out[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01, draw(st.integers(0, 255))]))
        elif op == "cut":
            del out[pos : pos + draw(st.integers(1, 64))]
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif op == "repeat":
            out[pos:pos] = out[pos : pos + draw(st.integers(1, 64))] * draw(st.integers(1, 16))
        else:
            del out[pos:]
    return bytes(out)


def read_both(data: bytes) -> None:
    """Decode and read GPS: each either works (an RGB image; a valid position or None) or is an ImageError."""
    try:
        img = load_image(data, LIMITS, draft_size=64)
    except ImageError as e:
        assert e.kind in ("empty", "unsupported", "corrupt", "too_large", "unreadable")
    else:
        assert img.mode == "RGB" and img.width > 0 and img.height > 0
    try:
        gps = read_gps(data, LIMITS)
    except ImageError:
        return
    assert gps is None or (-90 <= gps[0] <= 90 and -180 <= gps[1] <= 180 and all(map(math.isfinite, gps)))


@pytest.fixture(scope="module", autouse=True)
def bounded_memory():
    """The whole fuzz run stays within a few hundred MiB above where it began (the limits allow 4 MP)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 512, f"the fuzz run grew the process by {grown_mb:.0f} MiB"


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_unmutated_photos_decode_with_their_position(fmt: str) -> None:
    assert load_image(encoded(fmt), LIMITS).size == (96, 94)
    lat, lon = read_gps(encoded(fmt), LIMITS)
    assert abs(lat + 33.8667) < 1e-3 and abs(lon - 151.2083) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_mutated_image_bytes(fmt: str) -> None:
    @FUZZ
    @given(mutations(encoded(fmt)))
    def check(data: bytes) -> None:
        read_both(data)

    check()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_mutated_exif_blocks(fmt: str) -> None:
    @FUZZ
    @given(mutations(GOOD_EXIF))
    def check(exif: bytes) -> None:
        try:
            data = encoded(fmt, exif)
        except (ValueError, OSError):  # Pillow refuses to write some blocks (e.g. over 64 KiB): nothing to read
            return
        read_both(data)

    check()


rationals = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))


@pytest.mark.slow
@FUZZ
@given(
    lat=st.lists(rationals, min_size=1, max_size=400).map(tuple),
    lon=st.lists(rationals, min_size=1, max_size=400).map(tuple),
    lat_ref=st.sampled_from([b"N", b"S", b"", b"X", b"\x00", b"NS"]),
    lon_ref=st.sampled_from([b"E", b"W", b"", b"?", b"\xff"]),
)
def test_absurd_gps_rationals(lat: tuple, lon: tuple, lat_ref: bytes, lon_ref: bytes) -> None:
    try:
        exif = gps_exif_raw(lat, lon, lat_ref, lon_ref)
    except (ValueError, TypeError, UnicodeDecodeError):  # piexif cannot write it: nothing to read
        return
    data = encoded("JPEG", exif)
    gps = read_gps(data, LIMITS)
    assert gps is None or (-90 <= gps[0] <= 90 and -180 <= gps[1] <= 180)
    if gps is not None:  # only the standard 1 to 3 components, with denominators, give a position
        assert 1 <= len(lat) <= 3 and 1 <= len(lon) <= 3 and all(d for _, d in lat + lon)
