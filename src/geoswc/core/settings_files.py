"""The one reader of settings files (a command's ``-c`` config, a recipe, a group's config file, a ``--flag``
value written in YAML): bounded in bytes, nesting and values, plain data only.

A YAML or JSON settings file is read with at most :data:`MAX_BYTES` bytes (a larger file, or an endless
stream such as ``-c /dev/stdin`` fed forever, is refused after that many), and its events are checked before
anything is built: nesting deeper than :data:`MAX_DEPTH` and more than :data:`MAX_VALUES` values once its
aliases are expanded ("billion laughs") are refused at once, not built. ``class_path``/``init_args`` keys,
which name a class to build, are refused: settings files hold values.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from geoswc.core.errors import InputError

MAX_BYTES = 2**20
"""The largest settings file or value read: 1 MiB (settings files are a few KiB)."""
MAX_DEPTH = 64
"""The deepest nesting of lists and mappings accepted (a command's config nests 4 deep)."""
MAX_VALUES = 2**17
"""The most values (scalars, lists and mappings) a settings file may hold once its aliases are expanded (131,072:
a command's settings hold a few hundred, a list of photos in one a few thousand). It also bounds the time a
file within :data:`MAX_BYTES` takes to load (PyYAML builds some 10,000 to 100,000 values a second)."""
CLASS_KEYS = ("class_path", "init_args")
"""Keys that name a class to build (jsonargparse's subclass specs): never accepted in settings."""

_EVENTS: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""The parser of the bounds check: libyaml's when PyYAML has it (several times faster). It is iterative: no deep
recursion, whatever the nesting."""


def read_text(path: str | Path) -> str:
    """The text of a settings file (``-``: standard input), reading at most :data:`MAX_BYTES` + 1 bytes.

    Raises:
        InputError: when it is larger, is not UTF-8 text, or cannot be read (naming the file).
    """
    try:
        if str(path) == "-":
            stdin = getattr(sys.stdin, "buffer", None)
            if stdin is None:
                raise InputError("there is no standard input to read the settings from: give a file")
            data = stdin.read(MAX_BYTES + 1)
        else:
            with open(path, "rb") as f:  # a FIFO or /dev/stdin too: read() stops after MAX_BYTES + 1 bytes
                data = f.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise InputError(
                f"the settings file {path} is larger than {MAX_BYTES // 2**20} MiB; a command's settings take a few "
                "KiB: give a smaller file"
            )
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the settings file {path}: {' '.join(str(e).split())}") from e


def load_text(text: str, where: str = "the settings", load: Callable[[str], Any] | None = None) -> Any:
    """The data of YAML (or JSON) ``text`` once :func:`check_text` and :func:`check_values` pass; ``load`` builds
    it (default: :func:`yaml.safe_load`; jsonargparse's parsers pass their own loader, on libyaml).

    Raises:
        InputError: naming ``where``, when it is out of bounds, names a class, or is not YAML.
    """
    check_text(text, where)
    try:
        value = yaml.safe_load(text) if load is None else load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{where} is not valid YAML or JSON: {' '.join(str(e).split())}") from e
    check_values(value, where)
    return value


def read_settings(path: str | Path) -> Any:
    """A settings file's data: :func:`read_text`, then :func:`load_text`."""
    return load_text(read_text(path), f"the settings file {path}")


def check_text(text: str, where: str = "the settings") -> None:
    """Refuse ``text`` larger than :data:`MAX_BYTES`, nested deeper than :data:`MAX_DEPTH` or holding more than
    :data:`MAX_VALUES` values once its aliases are expanded: its parser's events are counted, nothing is built,
    and the check stops at the first event past a bound.

    Raises:
        InputError: naming ``where`` and the bound.
    """
    if len(text) > MAX_BYTES:
        raise InputError(f"{where} is larger than {MAX_BYTES // 2**20} MiB; give a smaller file or value")
    counter = _Counter(where)
    try:
        for event in yaml.parse(text, Loader=_EVENTS):
            counter.add(event)
    except yaml.YAMLError as e:
        if "maximum nesting depth" in str(e):  # libyaml's own limit (1000), met while it looks ahead
            raise _too_deep(where) from e
        raise InputError(f"{where} is not valid YAML or JSON: {' '.join(str(e).split())}") from e


def _too_deep(where: str) -> InputError:
    return InputError(
        f"{where} nests lists or mappings more than {MAX_DEPTH} deep; a command's settings nest at most 4 deep"
    )


class _Counter:
    """The expanded size and depth of a YAML event stream, refused past the bounds. Each open list or mapping
    holds ``[anchor, values, height]``; a closed anchored one is remembered, so that an alias counts as the
    values and the height of what it repeats."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.open: list[list[Any]] = []
        self.anchors: dict[str, tuple[int, int]] = {}
        self.total = 0

    def add(self, event: yaml.Event) -> None:
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            self.open.append([event.anchor, 1, 0])
            self._check(1, 0)
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, values, height = self.open.pop()
            self._close(anchor, values, height + 1)
        elif isinstance(event, yaml.ScalarEvent):
            self._check(1, 0)
            self._close(event.anchor, 1, 0)
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in self.anchors:
                raise InputError(
                    f"{self.where}: the alias *{event.anchor} repeats no complete anchored value before it "
                    "(an undefined or recursive alias)"
                )
            values, height = self.anchors[event.anchor]
            self._check(values, height)
            self._close(None, values, height)

    def _check(self, values: int, height: int) -> None:
        """Count ``values`` more, of ``height`` levels below the open ones; refuse past a bound."""
        self.total += values
        if self.total > MAX_VALUES:
            raise InputError(
                f"{self.where} holds more than {MAX_VALUES:,} values once its aliases (*name) are expanded; "
                "settings files hold a few hundred: write the values out, without nested aliases"
            )
        if len(self.open) + height > MAX_DEPTH:
            raise _too_deep(self.where)

    def _close(self, anchor: str | None, values: int, height: int) -> None:
        """A value is complete: add it to the list or mapping holding it, and remember it under its anchor."""
        if anchor is not None:
            self.anchors[anchor] = (values, height)
        if self.open:
            parent = self.open[-1]
            parent[1] += values
            parent[2] = max(parent[2], height)


def check_values(value: Any, where: str = "the settings") -> None:
    """Refuse ``value`` when one of its mappings, at any depth, has a ``class_path`` or ``init_args`` key.

    Raises:
        InputError: naming ``where`` and the key's place.
    """
    pending: list[tuple[Any, str]] = [(value, "")]
    seen: set[int] = set()
    while pending:
        item, at = pending.pop()
        if id(item) in seen or not isinstance(item, (dict, list)):
            continue
        seen.add(id(item))  # an alias repeats an object: look at it once
        if isinstance(item, list):
            pending.extend((v, f"{at}[{i}]") for i, v in enumerate(item))
            continue
        for key, v in item.items():
            if key in CLASS_KEYS:
                raise InputError(
                    f"{where}: config files hold values, not classes: '{key}' (at {at or 'the top'}) names a "
                    "class to build; give the settings themselves, e.g. 'run: {batch_size: 4}'"
                )
            pending.append((v, f"{at}.{key}" if at else str(key)))
