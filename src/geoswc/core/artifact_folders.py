"""Artifact folders: which kind of geoswc artifact a folder holds, where a command may write its output, and a
folder's new version swapped in whole (:class:`FolderSwap`)."""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from geoswc.core.atomic_files import ensure_dir, process_running, remove_stale, temp_prefix
from geoswc.core.errors import InputError
from geoswc.core.json_records import parse_json

ARTIFACT_RECORDS: dict[str, tuple[str, str]] = {
    "model": ("config.json", "geoswc-model/"),
    "gallery index": ("index.json", "geoswc-index/"),
    "feature cache": ("features.json", "geoswc-features/"),
    "shard set": ("shards.json", "wids-shard-index"),
    "evaluation": ("run.json", ""),
}
"""Each kind of artifact folder: its record file and the start of the format that record names."""


def artifact_kind(folder: str | Path) -> str | None:
    """The kind of geoswc artifact ``folder`` holds (None: none, or not one geoswc made)."""
    for kind, (name, fmt) in ARTIFACT_RECORDS.items():
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            meta = parse_json(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue
        if isinstance(meta, dict) and (
            str(meta.get("format") or meta.get("__kind__") or "").startswith(fmt)
            if fmt
            else "methods" in meta and "model" in meta
        ):
            return kind
    return None


def claim_folder(folder: str | Path, kind: str) -> Path:
    """Check ``folder`` before a command writes an artifact of ``kind`` into it: a folder (or a file in the way)
    holding another kind of geoswc artifact is refused, naming both, so that no command overwrites another's.

    Raises:
        InputError: ``folder`` is a file, or holds another kind of artifact.
    """
    folder = ensure_dir(folder, create=False)
    other = artifact_kind(folder)
    if other is not None and other != kind:
        raise InputError(f"{folder} holds a geoswc {other}; write the {kind} into another folder")
    return folder


def artifact_around(path: str | Path) -> tuple[Path, str] | None:
    """The nearest folder at or above ``path`` (symbolic links followed) that holds a geoswc artifact, with its
    kind (None: ``path`` lies in no artifact folder)."""
    real = Path(os.path.realpath(path))
    for folder in (real, *real.parents):
        kind = artifact_kind(folder) if folder.is_dir() else None
        if kind is not None:
            return folder, kind
    return None


def claim_output(path: str | Path) -> Path:
    """Check a file a command is about to write for its user (``locate --output``): a file inside a geoswc
    artifact folder, at any depth and through symbolic links, is refused, so that no output overwrites a model's,
    an index's or an evaluation's files or mixes with them; so is a folder.

    Raises:
        InputError: ``path`` is a folder or lies inside an artifact folder.
    """
    path = Path(path)
    real = Path(os.path.realpath(path))  # a symbolic link is written through: where it points is what counts
    if real.is_dir():
        raise InputError(f"cannot write {path}: it is a directory; give a file name")
    found = artifact_around(real.parent)
    if found is not None:
        raise InputError(f"cannot write {path}: {found[0]} holds a geoswc {found[1]}; write it outside that folder")
    ensure_dir(path.parent, create=False)
    return path


def claim_output_folder(folder: str | Path, kind: str, inside: str | Path | None = None) -> Path:
    """:func:`claim_folder` for an output folder of ``kind``, which must also lie outside every other artifact
    folder, at any depth (symbolic links followed), but ``inside`` (the one it may lie in: an index in the folder
    of the model it is built for).

    Raises:
        InputError: ``folder`` is a file, holds another kind of artifact, or lies inside an artifact folder.
    """
    folder = claim_folder(folder, kind)
    found = artifact_around(Path(os.path.realpath(folder)).parent)
    if found is not None and inside is not None and found[0] == Path(os.path.realpath(inside)):
        found = artifact_around(found[0].parent)
    if found is not None:
        raise InputError(
            f"cannot write the {kind} into {folder}: it lies inside {found[0]}, which holds a geoswc {found[1]}; "
            "write it outside that folder"
        )
    return folder


class FolderSwap:
    """A new version of the artifact folder ``target``, built in a staging folder beside it
    (``.NAME.<pid>.*.new``, after removing what killed runs left) and swapped in whole by :meth:`commit`: at every
    moment ``target`` holds the old version or the new one, complete. Entries of the old folder that are not the
    artifact's own files (``own``) or temporary files are kept (hard-linked into the new one before the swap).

    On Linux the swap is one atomic exchange of the two folders (``renameat2``); elsewhere the old folder is renamed
    aside (``.NAME.<pid>.old``) and the new one into place, and a process killed between the two renames leaves
    the old one for :func:`recover_folder` to put back.

    Attributes:
        target: the folder replaced (symbolic links resolved).
        path: the staging folder to build the new version in.
    """

    def __init__(self, target: str | Path, own: Sequence[str]) -> None:
        self.target = Path(os.path.realpath(target))
        recover_folder(self.target)
        remove_stale(self.target.parent, self.target.name)
        self.own = frozenset(own)
        self.path = Path(tempfile.mkdtemp(prefix=temp_prefix(self.target.name), suffix=".new", dir=self.target.parent))
        os.chmod(self.path, self.target.stat().st_mode & 0o7777)
        self.committed = False

    def commit(self) -> None:
        """Swap the staging folder in for ``target``, then remove the old version."""
        _keep_foreign(self.target, self.path, self.own)
        old = self.path
        if not exchange_paths(self.path, self.target):
            old = self.target.parent / f"{temp_prefix(self.target.name)}old"
            os.rename(self.target, old)
            try:
                os.rename(self.path, self.target)
            except BaseException:
                os.rename(old, self.target)
                raise
        self.committed = True
        _sync_folder(self.target.parent)
        shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        """Give the new version up (the old one stays); nothing happens after :meth:`commit`."""
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)


def swappable(folder: str | Path) -> bool:
    """Whether a :class:`FolderSwap` can replace ``folder``: a folder, not a mount point, in a folder this process
    may write (else a writer writes into it in place)."""
    real = Path(os.path.realpath(folder))
    return real.is_dir() and not os.path.ismount(real) and os.access(real.parent, os.W_OK | os.X_OK)


def recover_folder(target: str | Path) -> bool:
    """Put back an artifact folder that a process killed in the middle of a :class:`FolderSwap` left renamed aside
    (``.NAME.<pid>.old``, the process gone, ``target`` missing). Returns whether it did."""
    target = Path(os.path.realpath(target))
    if target.exists() or not target.parent.is_dir():
        return False
    for p in sorted(target.parent.glob(f".{glob.escape(target.name)}.*.old")):
        pid = p.name[len(target.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_running(int(pid)) and p.is_dir():
            os.rename(p, target)
            return True
    return False


def exchange_paths(a: str | Path, b: str | Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``). Returns False, having changed
    nothing, where the system or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, TypeError, AttributeError):  # not Linux, or a C library without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0


def _keep_foreign(old: Path, new: Path, own: frozenset[str]) -> None:
    """Hard-link (or copy) into ``new`` the entries of ``old`` that are not the artifact's own or temporary."""
    for p in old.iterdir():
        if p.name in own or _temporary(p.name) or os.path.lexists(new / p.name):
            continue
        if p.is_symlink():
            os.symlink(os.readlink(p), new / p.name)
        elif p.is_dir():
            shutil.copytree(p, new / p.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(p, new / p.name)


def _temporary(name: str) -> bool:
    """Whether ``name`` is one of a process's temporary files or folders (:func:`temp_prefix`)."""
    parts = name.split(".")
    return name.startswith(".") and len(parts) > 3 and any(part.isdigit() for part in parts[2:-1])


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _sync_folder(folder: Path) -> None:
    """Make a folder's renames durable (where the system can sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
