"""Safe image decoding: size limits, EXIF orientation, odd modes to RGB, and GPS EXIF."""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from geoswc.core.errors import ImageError
from geoswc.core.sphere import validate_latlon

ImageSource = str | os.PathLike | bytes | BinaryIO | Image.Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif")
"""File endings of the photos geoswc reads (folders are scanned for these; shards store photos under them)."""


@dataclass(frozen=True)
class ImageLimits:
    """Refuse inputs beyond these bounds before decoding them."""

    max_bytes: int = 50 * 1024 * 1024
    """Largest encoded file accepted."""
    max_pixels: int = 100_000_000
    """Largest width x height accepted (decompression-bomb guard)."""


DEFAULT_LIMITS = ImageLimits()
_heif_checked = False


def _register_optional_codecs() -> None:
    """Teach Pillow HEIC/HEIF when ``pillow-heif`` is installed (phones' default format)."""
    global _heif_checked
    if _heif_checked:
        return
    _heif_checked = True
    try:
        from pillow_heif import register_heif_opener  # optional dependency (geoswc[heif])
    except ImportError:
        return
    register_heif_opener()


def source_name(source: ImageSource) -> str:
    """How messages name an image: its path, else ``<image>`` (callers with a better name pass it)."""
    return str(source) if isinstance(source, (str, os.PathLike)) else "<image>"


_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _signature(fp: BinaryIO) -> str | None:
    """The image format a file's first bytes announce (``None``: no known signature)."""
    try:
        fp.seek(0)
        head = fp.read(12)
    except (OSError, ValueError):
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((fmt for sig, fmt in _SIGNATURES if head.startswith(sig)), None)


def open_image(source: ImageSource, limits: ImageLimits = DEFAULT_LIMITS, name: str | None = None) -> Image.Image:
    """Open an image without decoding its pixels, checking the byte and pixel limits.

    Raises:
        ImageError: empty, too large, not an image, or a header that does not decode; named ``name``.
    """
    name = name or source_name(source)
    _register_optional_codecs()
    if isinstance(source, Image.Image):
        return check_size(source, name, limits)
    fp = _source_file(source, name, limits)
    return check_size(_open_header(fp, name), name, limits)


def _source_file(source: str | os.PathLike | bytes | BinaryIO, name: str, limits: ImageLimits) -> BinaryIO:
    """A binary file holding the encoded image of a path, bytes or file object, within ``limits.max_bytes``."""
    if isinstance(source, (str, os.PathLike)):
        return _read_path(Path(source), name, limits)
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise ImageError(f"{name} is empty (0 bytes)", kind="empty")
        _check_max_bytes(len(source), name, limits)
        return io.BytesIO(source)
    if hasattr(source, "read"):
        return source
    raise ImageError(
        f"{name} is a {type(source).__name__}, not a path, bytes, a binary file or a PIL image", kind="unsupported"
    )


def _read_path(path: Path, name: str, limits: ImageLimits) -> BinaryIO:
    return io.BytesIO(read_image_file(path, limits, name))


def read_image_file(
    path: str | os.PathLike[str], limits: ImageLimits = DEFAULT_LIMITS, name: str | None = None
) -> bytes:
    """The bytes of the regular, non-empty file at ``path``, refused before reading when above the limit (a
    pipe or a device, which would block or never end, is refused too).

    Raises:
        ImageError: naming ``name`` (default: the path).
    """
    path, name = Path(path), name or str(path)
    if path.is_dir():
        raise ImageError(f"{name} is a directory, not an image file", kind="unsupported")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageError(f"{name} cannot be read: {e.strerror or e}", kind="unreadable") from e
    if not path.is_file():  # a pipe would block the read, a device never ends
        raise ImageError(
            f"{name} is not a regular file (a device, pipe or socket); give an image file", kind="unsupported"
        )
    if size == 0:
        raise ImageError(f"{name} is an empty file (0 bytes)", kind="empty")
    _check_max_bytes(size, name, limits)
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageError(f"{name} cannot be read: {e.strerror or e}", kind="unreadable") from e


def _check_max_bytes(size: int, name: str, limits: ImageLimits) -> None:
    """Raise :class:`ImageError` when an encoded image of ``size`` bytes is above ``limits.max_bytes``."""
    if size > limits.max_bytes:
        raise ImageError(
            f"{name} is {size / 2**20:.1f} MiB, above the limit of {limits.max_bytes / 2**20:.0f} MiB",
            kind="too_large",
        )


def _open_header(fp: BinaryIO, name: str) -> Image.Image:
    """Pillow's lazily decoded image in ``fp``, or an :class:`ImageError` saying why its header does not open."""
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check (check_size) decides; Pillow's hard limit (2 x MAX_IMAGE_PIXELS) stays.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name} has too many pixels to decode safely ({e})", kind="too_large") from e
    except UnidentifiedImageError as e:
        raise _unidentified(fp, name) from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{name} is corrupt: {e}", kind="corrupt") from e


def _unidentified(fp: BinaryIO, name: str) -> ImageError:
    """The error for a file Pillow does not recognise: corrupt when its signature names a format, else unsupported."""
    fmt = _signature(fp)
    if fmt is not None:  # it says it is an image, but its header does not decode
        return ImageError(f"{name} is a corrupt {fmt} file (its header cannot be decoded)", kind="corrupt")
    return ImageError(
        f"{name} is not an image Pillow can read (supported: JPEG, PNG, WebP, GIF, BMP, TIFF"
        f"{', HEIC' if 'HEIF' in Image.OPEN else ''})",
        kind="unsupported",
    )


def check_size(img: Image.Image, name: str, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """``img`` when it has pixels and no more than ``limits`` allows, else an :class:`ImageError` naming it."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name} has no pixels ({w}x{h})", kind="corrupt")
    if w * h > limits.max_pixels:
        raise ImageError(
            f"{name} is {w}x{h} = {w * h / 1e6:.0f} MP, above the limit of {limits.max_pixels / 1e6:.0f} MP",
            kind="too_large",
        )
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode == "F" or a.max(initial=0) > 65535:
            lo, hi = np.nanmin(a), np.nanmax(a)
            a = (a - lo) / (hi - lo if hi > lo else 1.0) * 255.0
        elif a.max(initial=0) > 255:
            a = a / 257.0
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def jpeg_is_complete(data: bytes) -> bool:
    """Whether a JPEG's marker structure runs from SOI to an EOI marker.

    Walks the segments and skips each scan's entropy-coded data (where 0xFF is always followed by a
    stuffed 0x00 or a restart marker), so an EOI inside an EXIF thumbnail or bytes appended after the
    image do not count. A file cut short, or whose tail was overwritten with zeros, has no EOI: libjpeg
    only warns about such files and fills the missing rows with grey.
    """
    n, pos = len(data), 2
    while pos < n:
        nxt = data.find(b"\xff", pos)
        if nxt < 0 or nxt + 1 >= n:
            return False
        marker = data[nxt + 1]
        if marker == 0xD9:
            return True
        if marker == 0xFF:  # fill byte before a marker
            pos = nxt + 1
            continue
        if marker == 0x00 or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # stuffed byte, RSTn, TEM
            pos = nxt + 2
            continue
        if nxt + 3 >= n:
            return False
        length = (data[nxt + 2] << 8) | data[nxt + 3]
        pos = nxt + 2 + length  # a segment (for SOS: its header; the scan data follows, walked above)
    return False


FULL_SIZE = "geoswc_full_size"
"""``Image.info`` key of a draft-decoded JPEG: its ``(width, height)`` at full scale, upright."""


def load_image(
    source: ImageSource, limits: ImageLimits = DEFAULT_LIMITS, draft_size: int | None = None, name: str | None = None
) -> Image.Image:
    """Decode an image to upright 8-bit RGB.

    Args:
        source: a path, the encoded bytes, a binary file object or a PIL image.
        limits: byte and pixel bounds checked before decoding.
        draft_size: when set, JPEGs are decoded at the smallest power-of-two reduction whose sides are
            still at least this large (much faster for big photos); the image then records its full size
            (``info[FULL_SIZE]``) so that resizing gives the full decode's geometry.
        name: how error messages name the image (default: its path, or ``<image>``).

    Raises:
        ImageError: empty, unsupported, corrupt, truncated, or too large; the message names the input.
    """
    name = name or source_name(source)
    img = open_image(source, limits, name)
    if img.format == "JPEG" and isinstance(img.fp, io.BytesIO) and not jpeg_is_complete(img.fp.getvalue()):
        raise ImageError(f"{name} is truncated: its JPEG data ends before the end-of-image marker", kind="corrupt")
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        full = img.size
        if draft_size and img.format == "JPEG":
            # exif_transpose may swap the sides, so ask for the short side on both axes.
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        decoded = img.size
        if img.format == "JPEG" and grey_filled_tail(img):
            raise ImageError(
                f"{name} is truncated: the bottom of its frame holds no image data (its header "
                "declares more rows than its data holds)",
                kind="corrupt",
            )
        img = ImageOps.exif_transpose(img)
        if img.size != decoded:  # turned a quarter
            full = (full[1], full[0])
        out = _to_rgb(img)
        if out.size != full:  # draft-decoded: resizing keeps the full image's geometry (transforms)
            out.info[FULL_SIZE] = full
        return out
    except ImageError:
        raise
    except MemoryError as e:
        raise ImageError(f"{name} needs more memory to decode than is available", kind="too_large") from e
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many types (TypeError, struct.error, ...)
        msg = str(e) or type(e).__name__
        hint = "truncated" if "truncated" in msg.lower() else "corrupt"
        raise ImageError(f"{name} is {hint}: {msg}", kind="corrupt") from e


FILL_ROWS = 8
"""Rows at the bottom of a decoded JPEG that must not all be the decoder's fill (one block row)."""


def grey_filled_tail(img: Image.Image) -> bool:
    """Whether a decoded JPEG ends in rows of libjpeg's fill, mid-grey 128 in every pixel and channel.

    libjpeg decodes a frame whose data ends early (the header claims more rows than the scans hold, and an
    end-of-image marker follows) without an error, filling the rows it has no data for with grey: a photo
    of "almost uniform grey" that would otherwise be located as if it were one.
    """
    w, h = img.size
    if img.mode not in ("L", "RGB") or h < 2 * FILL_ROWS:
        return False
    tail = np.asarray(img.crop((0, h - FILL_ROWS, w, h)))
    return bool((tail == 128).all())


def _rational(v: object) -> float:
    if isinstance(v, tuple) and len(v) == 2:
        return float(v[0]) / float(v[1])
    return float(v)  # type: ignore[arg-type]


def _degrees(value: object) -> float:
    """Degrees from EXIF's (degrees, minutes, seconds) rationals; anything else raises ValueError."""
    parts = list(value) if isinstance(value, (tuple, list)) else [value]  # type: ignore[call-overload]
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"{len(parts)} components")
    return sum(_rational(x) / 60**i for i, x in enumerate(parts))


def read_gps(
    source: ImageSource, limits: ImageLimits = DEFAULT_LIMITS, name: str | None = None
) -> tuple[float, float] | None:
    """The ``(lat, lon)`` in the GPS EXIF of an image, or None when absent or invalid.

    Never raises for a bad EXIF block: a photo without usable GPS simply has none. An image that cannot
    be opened at all raises :class:`ImageError`.
    """
    try:
        img = open_image(source, limits, name)
        gps = img.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    except ImageError:
        raise
    except Exception:  # noqa: BLE001 - malformed EXIF is common and never fatal
        return None
    if not gps:
        return None
    try:
        lat_v, lon_v = gps.get(ExifTags.GPS.GPSLatitude), gps.get(ExifTags.GPS.GPSLongitude)
        if lat_v is None or lon_v is None:
            return None
        lat, lon = _degrees(lat_v), _degrees(lon_v)
        lat_ref = str(gps.get(ExifTags.GPS.GPSLatitudeRef, "N")).strip("\x00 ").upper()
        lon_ref = str(gps.get(ExifTags.GPS.GPSLongitudeRef, "E")).strip("\x00 ").upper()
        lat = -lat if lat_ref == "S" else lat
        lon = -lon if lon_ref == "W" else lon
    except (TypeError, ValueError, ArithmeticError, IndexError, AttributeError):
        return None
    if not validate_latlon(lat, lon):
        return None
    return float(lat), float(lon)


# Truncated JPEGs must raise, not decode to grey silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False
