"""Uploads read from the request stream with per-file byte limits: a file over the limit is refused (413) as
soon as the stream crosses it, never buffered whole. A client's file name is a label, never a path."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from geoswc.service.gate import ServiceError
from geoswc.service.settings import MAX_OTHER_BYTES, MiB, ServiceSettings

UPLOAD_FIELD = "files"

_MAX_OTHER_FIELDS = 32


def _too_slow(s: ServiceSettings, what: str) -> ServiceError:
    return ServiceError(
        408,
        "timeout",
        f"the upload was too slow ({what}); uploads must keep up "
        f"{s.upload_min_kbs:g} KiB/s, pause at most {s.upload_idle_s:g} s and end within "
        f"{s.upload_timeout_s:g} s",
    )


@dataclass
class Upload:
    """One uploaded file: its client-side name (never used as a path) and its bytes."""

    name: str
    data: bytes


_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def clean_name(raw: bytes, index: int) -> str:
    """The upload's base name, decoded, without directories or control characters."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        name = raw.decode("latin-1")
    name = _UNSAFE.sub("", name.replace("\\", "/").rsplit("/", 1)[-1]).strip()[:200]
    return name or f"upload-{index + 1}"


class UploadReader:
    """Streaming ``multipart/form-data`` parser keeping the files of field ``files`` in memory, refusing
    (413) a file over the byte limit or one file too many as soon as the stream shows it."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.s = settings
        self.files: list[Upload] = []
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._buf: bytearray | None = None  # current file's bytes; None for a non-file part
        self._other_fields = 0
        self._other_bytes = 0

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._buf = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        if len(self._header_value) > 16 * 1024:
            raise ServiceError(400, "bad_request", "a multipart header is too long")

    def on_header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, opts = parse_options_header(self._disposition)
        field = opts.get(b"name", b"").decode("latin-1")
        if field != UPLOAD_FIELD:
            self._other_fields += 1
            if self._other_fields > _MAX_OTHER_FIELDS:
                raise ServiceError(400, "bad_request", f"more than {_MAX_OTHER_FIELDS} form fields")
            return
        if b"filename" not in opts:
            raise ServiceError(422, "bad_request", f"the form field {UPLOAD_FIELD!r} must hold file uploads")
        if len(self.files) >= self.s.max_files:
            raise ServiceError(413, "too_many_files", f"at most {self.s.max_files} files per request")
        self.files.append(Upload(clean_name(opts[b"filename"], len(self.files)), b""))
        self._buf = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        if self._buf is None:
            self._other_bytes += n
            if self._other_bytes > MAX_OTHER_BYTES:
                raise ServiceError(400, "bad_request", "the non-file form fields are too large")
            return
        if len(self._buf) + n > self.s.max_upload_bytes:
            name = self.files[-1].name
            raise ServiceError(
                413,
                "too_large",
                f"{name} is larger than the limit of {self.s.max_upload_bytes / MiB:g} MiB per file",
                image=name,
            )
        self._buf += data[start:end]

    def on_part_end(self) -> None:
        if self._buf is not None:
            self.files[-1].data = bytes(self._buf)
            self._buf = None

    async def _timed(self, request: Request) -> AsyncIterator[bytes]:
        """The request body's chunks, or a 408 for a client that pauses longer than ``upload_idle_s``, uploads
        slower than ``upload_min_kbs`` once ``upload_idle_s`` have passed, or takes over ``upload_timeout_s``:
        a trickling client gives its admission back instead of holding it."""
        loop, s = asyncio.get_running_loop(), self.s
        start, total = loop.time(), 0
        chunks = request.stream().__aiter__()
        while True:
            left = s.upload_timeout_s - (loop.time() - start)
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), max(0.0, min(s.upload_idle_s, left)))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                raise _too_slow(s, "paused" if left > s.upload_idle_s else "took too long") from None
            total += len(chunk)
            elapsed = loop.time() - start
            if elapsed > s.upload_idle_s and total < s.upload_min_kbs * 1024 * elapsed:
                raise _too_slow(s, f"sent {total} bytes in {elapsed:.0f} s")
            yield chunk

    async def read(self, request: Request) -> list[Upload]:
        ctype, params = parse_options_header(request.headers.get("content-type", ""))
        if ctype != b"multipart/form-data":
            raise ServiceError(
                415,
                "unsupported",
                f"send multipart/form-data with the images in the field "
                f"{UPLOAD_FIELD!r}, not {ctype.decode('latin-1') or 'no content type'}",
            )
        if b"boundary" not in params:
            raise ServiceError(400, "bad_request", "the multipart content type has no boundary")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.s.max_body_bytes:
            raise ServiceError(
                413,
                "too_large",
                f"the request body ({int(length) / MiB:.1f} MiB) is above the "
                f"limit of {self.s.max_files} files x {self.s.max_upload_bytes / MiB:g} MiB",
            )
        callbacks = {
            name: getattr(self, name)
            for name in (
                "on_part_begin",
                "on_part_data",
                "on_part_end",
                "on_header_field",
                "on_header_value",
                "on_header_end",
                "on_headers_finished",
            )
        }
        parser = MultipartParser(params[b"boundary"], callbacks)  # type: ignore[arg-type]
        total = 0
        try:
            async for chunk in self._timed(request):
                total += len(chunk)
                if total > self.s.max_body_bytes:
                    raise ServiceError(
                        413,
                        "too_large",
                        "the request body is above the limit of "
                        f"{self.s.max_files} files x {self.s.max_upload_bytes / MiB:g} MiB",
                    )
                parser.write(chunk)
            parser.finalize()
        except FormParserError as e:
            raise ServiceError(400, "bad_request", f"malformed multipart body: {e}") from e
        except ClientDisconnect as e:
            raise ServiceError(400, "bad_request", "the client disconnected during the upload") from e
        if self._buf is not None:
            raise ServiceError(400, "bad_request", "the multipart body ends inside a file")
        if not self.files:
            raise ServiceError(422, "no_files", f"send one or more images in the multipart field {UPLOAD_FIELD!r}")
        return self.files
