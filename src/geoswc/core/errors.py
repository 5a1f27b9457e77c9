"""Exceptions with messages that name the item at fault and the fix."""

from __future__ import annotations


class GeoswcError(Exception):
    """Base class of every error geoswc raises on purpose."""


class InputError(GeoswcError, ValueError):
    """A user-supplied file or value is unusable (bad CSV, corrupt image, coordinates out of range)."""


class SettingError(InputError):
    """A configuration value outside its allowed range.

    Attributes:
        owner: the config dataclass whose field is at fault (the CLI names the flag from it).
        field: the field's name.
    """

    def __init__(self, message: str, owner: type | None = None, field: str = "") -> None:
        super().__init__(message)
        self.owner, self.field = owner, field

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (str(self), self.owner, self.field))


class ImageError(InputError):
    """An image cannot be decoded or is outside the configured limits.

    Attributes:
        kind: ``"empty"``, ``"unsupported"``, ``"corrupt"``, ``"too_large"`` or ``"unreadable"``; the
            web service maps it to an HTTP status.
    """

    def __init__(self, message: str, kind: str = "corrupt") -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keep `kind` across DataLoader worker processes
        return (type(self), (str(self), self.kind))


class ArtifactError(GeoswcError):
    """A saved model, index, feature cache or cell table is missing, damaged or of another format."""


class ModelMismatchError(ArtifactError):
    """An artifact was built by another model (or backbone, or cell table) than the one in use."""


class building:  # noqa: N801 - used as a lower-case context manager, like contextlib's
    """Name what was being built when memory ran out: ``with building(f"the positives grid of {n:,} photos"):``.

    A :class:`MemoryError` inside becomes one that starts with it (NumPy's and PyTorch's own messages, which
    give the size of the failed allocation, follow), so the CLI's one-line report says which step ran out.
    """

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> None:
        if kind is not None and issubclass(kind, MemoryError) and not str(exc).startswith("while building"):
            raise MemoryError(f"while building {self.what}{f': {exc}' if str(exc) else ''}") from exc
