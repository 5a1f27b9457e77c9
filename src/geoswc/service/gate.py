"""Admission control of the web service and its error answers."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse

from geoswc.service.schemas import ErrorModel

KIND_STATUS: dict[str, int] = {"empty": 422, "corrupt": 422, "unreadable": 422, "unsupported": 415, "too_large": 413}
"""HTTP status of each :class:`geoswc.core.errors.ImageError` kind."""


class ServiceError(Exception):
    """An error answered as :class:`ErrorModel` JSON with the given status."""

    def __init__(
        self, status: int, kind: str, message: str, image: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.image, self.headers = status, kind, message, image, headers

    def response(self) -> JSONResponse:
        body = ErrorModel(error=self.message, kind=self.kind, status=self.status, image=self.image)
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


class InferenceGate:
    """Bounds the work in flight: at most ``slots`` requests run inference, and at most ``slots + queue``
    are admitted at all (uploading or waiting); beyond that, or after waiting ``timeout`` seconds for a
    slot, requests get 503 with a ``Retry-After`` estimated from recent inference times."""

    def __init__(self, slots: int, queue: int, timeout: float) -> None:
        self.slots, self.capacity, self.timeout = slots, slots + queue, timeout
        self.admitted = 0
        self._sem = asyncio.Semaphore(slots)
        self._seconds = 1.0  # moving average of an inference's duration

    def retry_after(self) -> int:
        return int(min(60, max(1, math.ceil(self._seconds * max(1, self.admitted) / self.slots))))

    def _busy(self, why: str) -> ServiceError:
        wait = self.retry_after()
        return ServiceError(
            503, "busy", f"the service is busy ({why}); retry in {wait} s", headers={"Retry-After": str(wait)}
        )

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        if self.admitted >= self.capacity:
            raise self._busy(f"{self.admitted} requests in progress")
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        try:
            await asyncio.wait_for(self._sem.acquire(), self.timeout)
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            raise self._busy(f"no inference slot free within {self.timeout:g} s") from None
        t0 = time.monotonic()
        try:
            yield
        finally:
            self._sem.release()
            self._seconds = 0.8 * self._seconds + 0.2 * (time.monotonic() - t0)
