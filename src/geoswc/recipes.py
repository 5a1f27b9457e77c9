"""The commands' parsers and their settings files. A command's parser is generated from its workflow function
(:func:`command_parser`); its ``-c`` file is a config of that command or a recipe.

Recipes: one YAML (or JSON) file holding the settings of every command that builds a model, one section per
command (``cells``, ``features``, ``train``, ...), plus free-form provenance (``description``, ``data``).
A recipe is marked by its top-level ``recipe:`` key, its name.

``geoswc CMD -c RECIPE ...`` reads the section for ``CMD``; any other ``-c`` file is that command's own
config (``--print_config`` writes one). From Python, :meth:`Recipe.arguments` gives a workflow function's
keyword arguments for its section, parsed by the same parser as the command::

    recipe = Recipe.load("recipes/default.yaml")
    workflow.cells(**recipe.arguments("cells", coords="coords.csv", out="work/cells.csv"))

Every settings file (``-c``, a recipe, a group's file such as ``--run FILE``) and every ``--flag`` value that is
parsed as YAML goes through one bounded reader, :mod:`geoswc.core.settings_files`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import docstring_parser  # jsonargparse[signatures]'s docstring reader
import yaml
from jsonargparse import (
    ActionConfigFile,
    ArgumentParser,
    DefaultHelpFormatter,
    get_loader,
    set_loader,
    set_parsing_settings,
)
from jsonargparse.typing import register_type

from geoswc.core.config import SearchChanges, SearchConfig, canonical_json, digest
from geoswc.core.errors import InputError
from geoswc.core.settings_files import load_text, read_settings, read_text
from geoswc.service.settings import ServiceChanges, ServiceSettings
from geoswc.workflow import COMMANDS

RECIPE_KEY = "recipe"

POSITIONALS = {
    "locate": ("data.files", "PHOTO", "photo files or folders"),
    "compare": ("runs", "RUN_OR_FILE", "evaluation folders or per-photo prediction files; the first is the reference"),
}
"""Commands whose first option is also taken from positional arguments: the option, its metavar and its help."""

PARSER_MODE = "geoswc-yaml"
"""The jsonargparse parser mode of the ``geoswc`` parsers: jsonargparse's YAML, behind the bounded reader."""

CHANGES_OF: dict[Any, type] = {SearchChanges: SearchConfig, ServiceChanges: ServiceSettings}
"""The settings each mapping of changes (a ``TypedDict`` parameter such as ``search``) changes: each of its fields
is a ``--name.field`` flag, with that setting's docstring as help."""

_JSONARGPARSE_YAML = get_loader("yaml")


def parser_mode() -> str:
    """:data:`PARSER_MODE`, registered with jsonargparse (registering it again changes nothing)."""
    set_loader(PARSER_MODE, _load_value, (yaml.YAMLError, InputError))
    return PARSER_MODE


def _load_value(text: str) -> Any:
    """A value jsonargparse parses as YAML (a ``-c`` file's text, a ``--group`` mapping, a list): checked by the
    bounded reader, then built by jsonargparse's own YAML loader (its resolution of numbers and dates)."""
    return load_text(text, "the YAML value", _JSONARGPARSE_YAML)


def command_parser(name: str, fn: Callable[..., Any]) -> Any:
    """The parser of one command: ``-c/--config``, ``--print_config`` and a flag (group) per parameter of ``fn``."""
    # Field docstrings become help. Configs are data: no value names a module to import or a class to build.
    set_parsing_settings(
        docstring_parse_attribute_docstrings=True, instantiate_subclass_spec_in_any=False, import_path_denylist=["*"]
    )
    parser = ArgumentParser(
        prog=f"geoswc {name}",
        description=summary(fn),
        exit_on_error=False,
        parser_mode=parser_mode(),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "-c",
        "--config",
        action=config_action(name),
        help=f"a config file of this command (--print_config writes one), or a recipe with a '{name}' section",
    )
    if name in POSITIONALS:
        _, metavar, help_text = POSITIONALS[name]
        parser.add_argument("positional", nargs="*", default=[], metavar=metavar, help=help_text)
    _add_parameters(parser, fn)
    return parser


def _add_parameters(parser: Any, fn: Callable[..., Any]) -> None:
    """A flag (group) per parameter of ``fn``, in order: a mapping of changes is a group of optional flags, a list
    of choices a flag that takes them comma-separated too, any other parameter what jsonargparse makes of it."""
    hints = typing.get_type_hints(fn)
    params = inspect.signature(fn).parameters
    docs = _param_docs(fn)
    plain: list[str] = []
    for name in [*params, ""]:
        kind = _special(hints[name]) if name else ""
        if name and kind is None:
            plain.append(name)
            continue
        if plain:  # the plain parameters since the last special one, in one call
            skip = set(params) - set(plain)
            parser.add_function_arguments(fn, as_group=False, sub_configs=True, fail_untyped=True, skip=skip)
            plain = []
        if kind == "changes":
            _add_changes(parser, name, hints[name], docs.get(name, name))
        elif kind == "choices":
            _add_choice_list(parser, name, hints[name], params[name].default, docs.get(name, name))


def _param_docs(obj: Any) -> dict[str, str]:
    """The docstring of each parameter (or field) of ``obj``, on one line."""
    return {p.arg_name: " ".join((p.description or "").split()) for p in docstring_parser.parse_from_object(obj).params}


def _special(tp: Any) -> str | None:
    """``changes`` for a mapping of changes (a ``TypedDict``), ``choices`` for a list of choices, else None."""
    if typing.is_typeddict(tp):
        return "changes"
    return "choices" if _choices(tp) else None


def _choices(tp: Any) -> tuple[str, ...]:
    """The choices of a ``Sequence[Literal[...]]`` or ``list[Literal[...]]`` of strings; () for any other type."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) not in (list, Sequence) or len(args) != 1 or typing.get_origin(args[0]) is not Literal:
        return ()
    choices = typing.get_args(args[0])
    return choices if all(isinstance(c, str) for c in choices) else ()


def _add_changes(parser: Any, name: str, changes: Any, title: str) -> None:
    """The group of a mapping of changes: ``--name.FIELD`` for each field (unset: not changed), and ``--name``
    for a mapping of them (``--search '{k: 5}'``) or a file of them."""
    parser.add_class_arguments(_changes_class(changes, title), name, sub_configs=True)


@functools.cache
def _changes_class(changes: Any, title: str) -> type:
    """A dataclass of the fields of ``changes``, each optional and unset (None) by default, documented by the
    docstrings of the settings it changes (:data:`CHANGES_OF`) and what an unset field keeps."""
    hints = typing.get_type_hints(changes)
    source = CHANGES_OF.get(changes)
    docs = _param_docs(source) if source else {}
    kept = {f.name: _kept(f) for f in dataclasses.fields(source)} if source else {}
    cls = dataclasses.make_dataclass(
        changes.__name__,
        [(k, t | None, dataclasses.field(default=None)) for k, t in hints.items()],
        frozen=True,
    )
    cls.__doc__ = f"{title}\n\nArgs:\n" + "".join(
        f"    {k}: {docs.get(k) or k} Default: {kept.get(k, 'unchanged')}.\n" for k in hints
    )
    return cls


def _kept(f: dataclasses.Field[Any]) -> str:
    """What an unset change of setting ``f`` keeps: its environment variable, else its default (service
    settings); the model's value (search settings)."""
    env = f.metadata.get("env")
    return f"${env}, else {'unset' if f.default is None else f.default}" if env else "the model's"


def _add_choice_list(parser: Any, name: str, tp: Any, default: Any, help_text: str) -> None:
    """The flag of a list of choices: ``--methods swc,retrieval`` as well as ``--methods '[swc, retrieval]'``."""
    choices = _choices(tp)
    cls = _choice_list(choices, name.removesuffix("s"))
    example = ",".join(choices[:2])
    parser.add_argument(
        f"--{name}",
        type=cls,
        default=cls(default),
        help=f"{help_text} One or more, comma-separated ({example}) or a list ('[{example.replace(',', ', ')}]'). "
        f"Default: {','.join(default)}.",
    )


class _ChoiceListType(type):
    """The type of a list of choices, named in the help as ``list of a|b|c``."""

    choices: tuple[str, ...] = ()

    def __repr__(cls) -> str:
        return f"list of {'|'.join(cls.choices)}"

    __str__ = __repr__


@functools.cache
def _choice_list(choices: tuple[str, ...], noun: str) -> type:
    """A tuple type of ``choices`` that jsonargparse reads from a list or from one comma-separated string."""
    cls = _ChoiceListType(f"{noun.capitalize()}List", (tuple,), {"__module__": __name__, "choices": choices})
    example = ",".join(choices[:2])

    def read(value: Any) -> Any:
        items = _items(value)
        if not items:
            raise InputError(f"give at least one {noun}: {', '.join(choices)}")
        wrong = [v for v in items if v not in choices]
        if wrong:
            raise InputError(
                f"{wrong[0]!r} is not a {noun}: give one or more of {', '.join(choices)}, comma-separated "
                f"({example}) or as a list ('[{example.replace(',', ', ')}]')"
            )
        return cls(items)

    register_type(cls, serializer=list, deserializer=read)
    return cls


def _items(value: Any) -> list[Any]:
    """The items of a list flag's value: a list, a YAML list written as text, or comma-separated text."""
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("["):
            return [v.strip() for v in text.split(",")] if text else []
        value = load_text(text, "the list")
    return list(value) if isinstance(value, (list, tuple)) else [value]


_SAYS_DEFAULT = re.compile(r"\bdefault: ", re.IGNORECASE)


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, without its ``default: ...`` where the help says the default in words (``Default: the
    model's`` rather than ``default: null``). The ``geoswc`` parser's, and so its subcommands'."""

    def _get_help_string(self, action: Any) -> str:
        text = str(super()._get_help_string(action))
        if _SAYS_DEFAULT.search(action.help or ""):
            text = text.replace(", default: %(default)s", "").replace(" (default: %(default)s)", "")
        return text


def summary(fn: Callable[..., Any]) -> str:
    """The first paragraph of a function's docstring, on one line."""
    return " ".join((inspect.getdoc(fn) or "").split("\n\n")[0].split())


def call_arguments(parser: Any, namespace: Any, fn: Callable[..., Any], command: str) -> dict[str, Any]:
    """``fn``'s keyword arguments from a parsed namespace: dataclass groups built (their own checks run), a
    group of changes as the mapping of the fields given, a list of choices as a tuple."""
    if command in POSITIONALS and namespace.get("positional"):
        namespace[POSITIONALS[command][0]] = namespace.positional
    built = parser.instantiate(namespace)
    hints = typing.get_type_hints(fn)
    kwargs = {name: built[name] for name in inspect.signature(fn).parameters}
    for name, value in kwargs.items():
        kind = _special(hints[name])
        if kind == "changes" and dataclasses.is_dataclass(value):
            kwargs[name] = {k: v for k, v in dataclasses.asdict(value).items() if v is not None}  # type: ignore[arg-type]
        elif kind == "choices":
            kwargs[name] = list(value)  # as jsonargparse gives any list
    return kwargs


def inline_settings_files(argv: list[str], fn: Callable[..., Any]) -> list[str]:
    """``argv`` with the settings file of each group flag (``--run FILE``, ``--search=FILE``) replaced by its
    text, read by the bounded reader: jsonargparse would read it whole, however large, or forever from a pipe.

    Raises:
        InputError: naming the flag and the file, when the file is refused or holds no mapping of settings.
    """
    groups = {f"--{g}" for g in _groups(fn)}
    out: list[str] = []
    flag = ""
    for arg in argv:
        name, eq, value = arg.partition("=")
        if flag:
            out.append(_settings_file_text(arg, flag))
        elif name in groups and eq:
            out.append(f"{name}={_settings_file_text(value, name)}")
        else:
            out.append(arg)
        flag = arg if arg in groups else ""
    return out


def _groups(fn: Callable[..., Any]) -> set[str]:
    """The flag groups of ``fn``'s parameters: its dataclasses (and theirs, ``backbone.preprocess``) and mappings
    of changes, each of which also takes a settings file."""
    pending = [(n, t) for n, t in typing.get_type_hints(fn).items() if n in inspect.signature(fn).parameters]
    groups = set()
    while pending:
        name, tp = pending.pop()
        if typing.is_typeddict(tp):
            groups.add(name)
        elif dataclasses.is_dataclass(tp):
            groups.add(name)
            pending.extend((f"{name}.{k}", t) for k, t in typing.get_type_hints(tp).items())
    return groups


def _settings_file_text(value: str, flag: str) -> str:
    """The text of the settings file ``value`` given to ``flag``; ``value`` itself when it names no file."""
    if not os.path.exists(value) or os.path.isdir(value):
        return value  # settings written out (--search '{k: 5}'), or a name jsonargparse will say is wrong
    text = read_text(value)
    content = load_text(text, f"{flag}: the settings file {value}", _JSONARGPARSE_YAML)
    if content is None:
        return "{}"
    if not isinstance(content, dict):
        raise InputError(
            f"{flag}: the settings file {value} holds a {type(content).__name__}, not settings: write one "
            "FIELD: VALUE line per setting"
        )
    return text


def read_settings_file(path: str | Path) -> Any:
    """A YAML or JSON file's content (bounded, safe loading: plain data only, nothing is built or run)."""
    return read_settings(path)


@dataclass(frozen=True)
class Recipe:
    """A recipe file's content: its name, provenance, and a section of settings per command."""

    path: Path
    content: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        return cls.of(path, read_settings_file(path))

    @classmethod
    def of(cls, path: str | Path, content: Any) -> Recipe:
        """The recipe of a file's ``content`` (already read)."""
        if not isinstance(content, dict) or not isinstance(content.get(RECIPE_KEY), str):
            raise InputError(
                f"{path} is not a recipe: it needs a top-level '{RECIPE_KEY}: NAME' and one section per command"
            )
        return cls(Path(path), content)

    @property
    def name(self) -> str:
        return str(self.content[RECIPE_KEY])

    @property
    def digest(self) -> str:
        """Digest of the recipe's content (recorded with what it builds)."""
        return digest(canonical_json(self.content))

    def section(self, command: str) -> dict[str, Any]:
        """The settings of ``command`` (an empty section is no settings)."""
        if command not in COMMANDS:
            raise InputError(f"{command!r} is not a geoswc command")
        if command not in self.content:
            raise InputError(
                f"recipe {self.path} has no '{command}' section; its sections are "
                f"{sorted(k for k in self.content if k in COMMANDS)}"
            )
        section = self.content[command] or {}
        if not isinstance(section, dict):
            raise InputError(f"recipe {self.path}: the '{command}' section must be a mapping of settings")
        return section

    def arguments(self, command: str, **given: Any) -> dict[str, Any]:
        """The keyword arguments of ``geoswc.workflow.<command>``: the recipe's section, then ``given`` (plain
        values, as in a config file: strings for paths, mappings for groups), parsed and checked as the
        command line would be."""
        parser = command_parser(command, COMMANDS[command])
        cfg = parser.parse_object({**self.section(command), **{k: _plain(v) for k, v in given.items()}})
        return call_arguments(parser, cfg, COMMANDS[command], command)


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def config_text(value: str, command: str) -> str:
    """The settings ``-c VALUE`` gives ``command``, as text: a config file's (``-`` reads standard input), a
    recipe's section for it, or ``VALUE`` itself when it is settings written out (``-c '{run: {workers: 2}}'``).

    Raises:
        InputError: when the file is refused by the bounded reader or holds no mapping of settings.
    """
    is_file = value == "-" or os.path.exists(value)
    text = read_text(value) if is_file else value
    content = load_text(text, f"the config file {value}" if is_file else f"-c {value!r}", _JSONARGPARSE_YAML)
    if content is None and is_file:
        return "{}"  # an empty file: no settings
    if not isinstance(content, dict):
        said = f"holds a {type(content).__name__}, not settings" if is_file else "does not exist"
        raise InputError(
            f"the config file {value} {said}: give a config of this command (--print_config writes one) or a "
            f"recipe with a '{command}' section"
        )
    if RECIPE_KEY in content:
        return json.dumps(Recipe.of(value, content).section(command), default=str)
    return text


def config_action(command: str) -> type:
    """The ``-c/--config`` action of ``command``: a recipe file gives its ``command`` section, any other file
    is read whole (jsonargparse's :class:`ActionConfigFile`), each by the bounded reader (:func:`config_text`)."""

    class RecipeOrConfig(ActionConfigFile):
        def __call__(self, parser: Any, cfg: Any, values: Any, option_string: str | None = None) -> None:
            super().__call__(parser, cfg, config_text(str(values), command), option_string)

    return RecipeOrConfig
