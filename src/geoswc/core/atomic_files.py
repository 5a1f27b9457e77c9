"""Atomic writes: a file is written beside its place and renamed over it once whole, so a kill mid-write never
leaves a half-written file that reads as good; temporary files carry their process id, for cleaning up."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from geoswc.core.errors import InputError


def temp_prefix(name: str) -> str:
    """The start of the names of this process's temporary files or folders for ``name``; they carry the process
    id, so that :func:`remove_stale` can tell a killed run's leftovers from a running one's."""
    return f".{name}.{os.getpid()}."


def remove_stale(folder: Path, name: str) -> None:
    """Remove the temporary files and folders for ``name`` in ``folder`` that processes no longer running left."""
    for p in folder.glob(f".{glob.escape(name)}.*"):
        pid = p.name[len(name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_running(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, another user's
        return True
    return True


class Staging:
    """A staging folder inside ``folder`` (``.staging.<pid>.*``, after removing what killed runs left there), with
    ``names`` opened for writing: a writer appends to them, then builds its artifact from them atomically.

    Attributes:
        path: the folder.
        files: the open files, by name.
    """

    def __init__(self, folder: Path, *names: str) -> None:
        remove_stale(folder, "staging")
        self.path = Path(tempfile.mkdtemp(prefix=temp_prefix("staging"), dir=folder))
        self.files = {name: open(self.path / name, "wb") for name in names}  # noqa: SIM115 - closed by close()

    def close(self) -> None:
        """Close the files (the folder stays, e.g. for another process to read)."""
        for f in self.files.values():
            f.close()

    def remove(self) -> None:
        """Close the files and remove the folder."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temp file beside ``path``; on success fsync and rename it over ``path``. A ``path`` that is a
    symbolic link keeps the link: the file it points to is replaced. Temp files that killed runs left beside
    ``path`` are removed."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory; give a file name")
    ensure_dir(path.parent)
    remove_stale(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def ensure_dir(folder: str | Path, create: bool = True) -> Path:
    """Create ``folder`` (and its parents) for output; a path that is a file is an InputError, not a traceback.

    With ``create=False``, only check (commands call it before long work, so a bad ``--out`` fails at once).
    """
    folder = Path(folder)
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                raise InputError(f"cannot write into {folder}: {p} is a file, not a folder; choose another output path")
            break
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_report(path: str | Path, result: dict[str, Any], table: str) -> None:
    """A measurement's ``result`` as JSON at ``path`` and its Markdown ``table`` beside it (``.md``), each
    written atomically (the folder is created)."""
    path = Path(path)
    write_json(path, result)
    write_text(path.with_suffix(".md"), table + "\n")
