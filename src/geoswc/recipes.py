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
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from geoswc.core.config import canonical_json, digest
from geoswc.core.errors import InputError
from geoswc.workflow import COMMANDS

RECIPE_KEY = "recipe"

POSITIONALS = {
    "locate": ("data.files", "PHOTO", "photo files or folders"),
    "compare": ("runs", "RUN_OR_FILE", "evaluation folders or per-photo prediction files; the first is the reference"),
}
"""Commands whose first option is also taken from positional arguments: the option, its metavar and its help."""


def command_parser(name: str, fn: Callable[..., Any]) -> Any:
    """The parser of one command: ``-c/--config``, ``--print_config`` and a flag (group) per parameter of ``fn``."""
    # Field docstrings become help. Configs are data: no value names a module to import or a class to build.
    set_parsing_settings(
        docstring_parse_attribute_docstrings=True, instantiate_subclass_spec_in_any=False, import_path_denylist=["*"]
    )
    parser = ArgumentParser(prog=f"geoswc {name}", description=summary(fn), exit_on_error=False)
    parser.add_argument(
        "-c",
        "--config",
        action=config_action(name),
        help=f"a config file of this command (--print_config writes one), or a recipe with a '{name}' section",
    )
    if name in POSITIONALS:
        _, metavar, help_text = POSITIONALS[name]
        parser.add_argument("positional", nargs="*", default=[], metavar=metavar, help=help_text)
    parser.add_function_arguments(fn, as_group=False, sub_configs=True, fail_untyped=True)
    return parser


def summary(fn: Callable[..., Any]) -> str:
    """The first paragraph of a function's docstring, on one line."""
    return " ".join((inspect.getdoc(fn) or "").split("\n\n")[0].split())


def call_arguments(parser: Any, namespace: Any, fn: Callable[..., Any], command: str) -> dict[str, Any]:
    """``fn``'s keyword arguments from a parsed namespace: dataclass groups built (their own checks run)."""
    if command in POSITIONALS and namespace.get("positional"):
        namespace[POSITIONALS[command][0]] = namespace.positional
    built = parser.instantiate(namespace)
    return {name: built[name] for name in inspect.signature(fn).parameters}


def read_settings_file(path: str | Path) -> Any:
    """A YAML or JSON file's content (safe loading: plain data only, nothing is built or run)."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"cannot read the config file {path}: {' '.join(str(e).split())}") from e


@dataclass(frozen=True)
class Recipe:
    """A recipe file's content: its name, provenance, and a section of settings per command."""

    path: Path
    content: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        content = read_settings_file(path)
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


def config_action(command: str) -> type:
    """The ``-c/--config`` action of ``command``: a recipe file gives its ``command`` section, any other file
    is read whole (jsonargparse's :class:`ActionConfigFile`)."""

    class RecipeOrConfig(ActionConfigFile):
        def __call__(self, parser: Any, cfg: Any, values: Any, option_string: str | None = None) -> None:
            path = Path(str(values))
            content = read_settings_file(path) if path.is_file() else None
            if isinstance(content, dict) and RECIPE_KEY in content:
                values = json.dumps(Recipe.load(path).section(command))
            super().__call__(parser, cfg, values, option_string)

    return RecipeOrConfig
