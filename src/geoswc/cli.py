"""The ``geoswc`` command, generated from :mod:`geoswc.workflow`'s functions and the config dataclasses by
jsonargparse (as litgpt does): a parameter is a flag, a dataclass parameter a group of ``--name.field``
flags, docstrings are the help, and ``-c FILE`` reads a command's settings (or a recipe's section for it).

Results go to standard output, diagnostics to standard error. Exit status: 0 success, 1 some photos of a
batch failed, 2 bad input (one line naming the flag or file), 3 a bug (one line; ``-vv`` adds the
traceback), 130 interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import traceback
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from jsonargparse import ArgumentError, ArgumentParser

from geoswc.core.errors import GeoswcError, SettingError
from geoswc.core.version import __version__
from geoswc.recipes import (
    HelpFormatter,
    call_arguments,
    command_parser,
    inline_settings_files,
    parser_mode,
    summary,
)
from geoswc.workflow import COMMANDS

log = logging.getLogger("geoswc")


def build_parser(parsers: dict[str, Any] | None = None) -> Any:
    """The ``geoswc`` parser: one subcommand per :data:`geoswc.workflow.COMMANDS` entry (put in ``parsers``)."""
    parser = ArgumentParser(
        prog="geoswc",
        exit_on_error=False,
        parser_mode=parser_mode(),  # the subcommands' too: every YAML value goes through the bounded reader
        formatter_class=HelpFormatter,  # the subcommands' too
        version=__version__,
        description="Where on Earth was this photo taken? Search-within-Cell geolocation "
        "(Kordopatis-Zilos et al., ICMR 2021).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subcommands(dest="command", required=True)
    parsers = {} if parsers is None else parsers
    for name, fn in COMMANDS.items():
        parsers[name] = command_parser(name, fn)
        sub.add_subcommand(name, parsers[name], help=summary(fn))
    return parser


def flag_of(fn: Callable[..., Any], e: SettingError) -> str:
    """The flag of a setting a command refused: ``--group.field`` for a field of a dataclass group (or of a
    mapping of its changes), ``--name`` for a plain parameter. A setting refused without its owner (a device
    the machine lacks) is the parameter of that name, else the one group field of that name."""
    fields = {f.name for f in dataclasses.fields(e.owner)} if dataclasses.is_dataclass(e.owner) else set()
    hints = typing.get_type_hints(fn)
    if e.owner is None and e.field not in hints:
        groups = [
            n
            for n, tp in hints.items()
            if dataclasses.is_dataclass(tp) and e.field in {f.name for f in dataclasses.fields(tp)}
        ]
        return f"--{groups[0]}.{e.field}" if len(groups) == 1 else f"--{e.field}"
    for name, tp in hints.items():
        for t in (tp, *typing.get_args(tp)):
            if t is e.owner or (
                typing.is_typeddict(t) and e.field in t.__annotations__ and set(t.__annotations__) <= fields
            ):
                return f"--{name}.{e.field}"
    return f"--{e.field}"


@contextlib.contextmanager
def _logging(verbose: int, command: str) -> Iterator[None]:
    """Results (``geoswc.workflow`` at INFO) on stdout; warnings, progress and errors on stderr."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    if command != "locate":  # the steps report what they do; locate's stdout carries the results
        level = min(level, logging.INFO)
    if os.environ.get("RANK", "0") != "0":  # torchrun: only rank 0 talks, unless something goes wrong
        level = logging.WARNING
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(lambda r: r.name == "geoswc.workflow" and r.levelno == logging.INFO)
    err.addFilter(lambda r: not (r.name == "geoswc.workflow" and r.levelno == logging.INFO))
    err.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    results = logging.getLogger("geoswc.workflow")
    saved = (log.level, log.propagate, results.level)
    log.setLevel(level)
    results.setLevel(logging.INFO if level <= logging.INFO or command == "locate" else level)
    log.propagate = False
    log.addHandler(out)
    log.addHandler(err)
    try:
        yield
    finally:
        log.removeHandler(out)
        log.removeHandler(err)
        log.setLevel(saved[0])
        log.propagate = saved[1]
        results.setLevel(saved[2])


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``geoswc`` with ``argv`` (default: the command line); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), "")
    parsers: dict[str, Any] = {}
    parser = build_parser(parsers)
    try:
        cfg = parser.parse_args(inline_settings_files(argv, COMMANDS[command]) if command else argv)
    except (ArgumentError, GeoswcError) as e:
        return _fail(command, _as_flags(" ".join(str(e).split()), command))
    command = cfg.command
    with _logging(cfg.verbose, command), warnings.catch_warnings():
        if cfg.verbose == 0:  # libraries' warnings (Pillow's corrupt EXIF, ...): each bad photo is reported anyway
            warnings.simplefilter("ignore")
        try:
            kwargs = call_arguments(parsers[command], cfg[command], COMMANDS[command], command)
            result = COMMANDS[command](**kwargs)
            return int(getattr(result, "exit_status", 0))
        except SettingError as e:
            return _fail(command, f"{flag_of(COMMANDS[command], e)}: {e}")
        except (GeoswcError, OSError) as e:  # bad input, or a path that is a folder, a full disk, no permission
            return _fail(command, str(e))
        except MemoryError as e:  # the machine's limit, not a bug: say so, with what numpy or torch was building
            return _fail(
                command,
                f"out of memory{f' ({e})' if str(e) else ''}; use a machine with more memory, "
                "or a smaller --run.batch_size or input",
            )
        except KeyboardInterrupt:
            print(f"geoswc {command}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - a bug of ours: one clear line, the traceback on request
            if cfg.verbose >= 2:
                traceback.print_exc(file=sys.stderr)
            print(
                f"geoswc {command}: internal error ({type(e).__name__}: {e}). This is a bug in geoswc; please "
                "report it with the output of the same command run with -vv",
                file=sys.stderr,
            )
            return 3


def _as_flags(message: str, command: str) -> str:
    """A parser message with its keys written as flags: jsonargparse's 'Parser key "a.b":' and the
    'arguments are required: CMD.a, CMD.b' list become ``--a.b`` and ``--a, --b``."""
    message = re.sub(r'Parser key "([^"]+)":', r"--\1:", message)
    head, sep, names = message.partition("arguments are required: ")
    if sep and command:
        names = ", ".join("--" + n.strip().removeprefix(f"{command}.") for n in names.split(","))
    return head + sep + names


MAX_MESSAGE = 2000
"""The longest error message printed: a parser's message quotes the value it refused, which may be huge."""


def _fail(command: str, message: str) -> int:
    message = " ".join(message.split())  # one line, whatever a library put in its message
    if len(message) > MAX_MESSAGE:
        message = f"{message[: MAX_MESSAGE - 40]} ... ({len(message):,} characters in all)"
    print(f"geoswc{' ' + command if command else ''}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
