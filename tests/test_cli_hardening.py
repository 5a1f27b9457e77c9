"""Settings files and flags that would exhaust memory, recurse without end or build classes are refused in one
line (exit 2), by the one bounded reader (``geoswc.core.settings_files``); the search and service changes are
listed flag by flag in the help; a list of choices takes a comma-separated value."""

from __future__ import annotations

import io
import os
import sys
import threading
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geoswc.cli import main
from geoswc.core.errors import InputError
from geoswc.core.settings_files import MAX_BYTES, MAX_DEPTH, load_text, read_settings
from geoswc.recipes import Recipe, call_arguments, command_parser
from geoswc.workflow import COMMANDS

LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)
"""Nine levels of nine aliases: 9**9 (387 million) strings once expanded, from 300 bytes."""


def one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The command's stderr: one line, no traceback, holding each of ``needles``."""
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and all(n in err for n in needles), err
    return err


def test_billion_laughs_is_refused_before_it_is_expanded(tmp_path, capsys):
    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS)
    assert len(LAUGHS) < 1024
    start = time.perf_counter()
    assert main(["locate", "-c", str(path)]) == 2
    assert time.perf_counter() - start < 5
    one_line_error(capsys, "geoswc locate: error:", str(path), "aliases")
    with pytest.raises(InputError, match="aliases"):  # a recipe is read by the same reader
        Recipe.load(path)


@pytest.mark.parametrize(
    "text",
    ["[" * 20_000 + "]" * 20_000, "{a: " * 20_000 + "}" * 20_000, "".join(" " * i + "- \n" for i in range(1000))],
    ids=["lists", "mappings", "block"],
)
def test_a_deeply_nested_file_is_one_line_not_a_recursion_error(tmp_path, capsys, text):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    assert main(["train", "-c", str(path)]) == 2
    one_line_error(capsys, f"more than {MAX_DEPTH} deep")


def test_a_file_over_1_mib_is_refused(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text("run:\n  workers: 0\n" + "# padding\n" * (MAX_BYTES // 10 + 1))
    assert path.stat().st_size > MAX_BYTES
    assert main(["evaluate", "-c", str(path)]) == 2
    one_line_error(capsys, "larger than 1 MiB")


@pytest.mark.parametrize(
    "argv",
    [
        ["-c", "{file}"],
        ["--run", "{file}"],
        ["--search", "{{class_path: geoswc.workflow.locate}}"],
        ["--run", "{{class_path: os.system, init_args: {{command: 'touch {marker}'}}}}"],
    ],
    ids=["config", "group-file", "search-value", "run-value"],
)
def test_class_paths_are_refused_in_one_line(tmp_path, capsys, argv):
    marker = tmp_path / "ran"
    path = tmp_path / "cls.yaml"
    path.write_text(f"run:\n  class_path: os.system\n  init_args:\n    command: touch {marker}\n")
    if argv[0] == "--run" and "{file}" in argv[1]:
        path.write_text(f"class_path: os.system\ninit_args: {{command: touch {marker}}}\n")
    args = [a.format(file=path, marker=marker) for a in argv]
    assert main(["locate", "photo.jpg", *args]) == 2
    one_line_error(capsys, "config files hold values, not classes", "class_path")
    assert not marker.exists()


class Endless(io.RawIOBase):
    """A stream that never ends ('y\\n' forever), which fails the test rather than hang it when it is read
    far past the bound."""

    def __init__(self) -> None:
        self.given = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        assert self.given < 16 * MAX_BYTES, "the settings were read without a bound"
        n = len(buffer)
        buffer[:n] = (b"y\n" * (n // 2 + 1))[:n]
        self.given += n
        return n


def test_an_endless_standard_input_is_read_only_up_to_the_bound(monkeypatch, capsys):
    stream = Endless()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(stream)))
    assert main(["locate", "-c", "-"]) == 2
    one_line_error(capsys, "larger than 1 MiB")
    assert stream.given <= 2 * MAX_BYTES


@pytest.mark.parametrize("flag", ["-c", "--run"])
def test_an_endless_pipe_is_read_only_up_to_the_bound(tmp_path, capsys, flag):
    """``-c /dev/stdin`` fed by ``yes``: a pipe that never ends. A FIFO stands in for it; its writer stops at
    64 MiB, so a reader without a bound would end too, having read everything."""
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)
    written = {"bytes": 0, "broken": False}

    def feed() -> None:
        chunk = b"y\n" * 32768
        with open(fifo, "wb") as f:
            try:
                while written["bytes"] < 64 * MAX_BYTES:
                    f.write(chunk)
                    written["bytes"] += len(chunk)
            except BrokenPipeError:
                written["broken"] = True

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        assert main(["locate", "photo.jpg", flag, str(fifo)]) == 2
    finally:
        writer.join(timeout=30)
    one_line_error(capsys, "larger than 1 MiB")
    assert written["broken"] and written["bytes"] < 8 * MAX_BYTES, written


def nested(depth: int) -> list:
    """``depth`` lists, each in the one before: ``nested(2) == [[]]``."""
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_the_bounds_are_exact():
    assert load_text("[" * MAX_DEPTH + "]" * MAX_DEPTH) == nested(MAX_DEPTH)
    with pytest.raises(InputError, match="deep"):
        load_text("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    anchored = "[" * (MAX_DEPTH - 2) + "1" + "]" * (MAX_DEPTH - 2)
    assert load_text(f"a: &x {anchored}\nb: [*x]\n")["b"][0] == yaml.safe_load(anchored)
    with pytest.raises(InputError, match="deep"):  # an alias is as deep as what it repeats, where it is used
        load_text(f"a: &x {anchored}\nb: [[*x]]\n")
    with pytest.raises(InputError, match="alias"):
        load_text("a: *nowhere\n")


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        | inner.map(lambda v: [v, v])  # one object twice: the dump writes an anchor and an alias
    ),
    max_leaves=40,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=values, flow=st.booleans(), raw=st.booleans())
def test_data_below_the_bounds_loads_as_yaml_safe_load_does(value, flow, raw):
    text = yaml.safe_dump(value, default_flow_style=flow, allow_unicode=raw)
    assert load_text(text) == yaml.safe_load(text)
    if not raw:  # PyYAML's own round trip: a raw NEL (U+0085) in a plain scalar is read back as a line break
        assert load_text(text) == value


@settings(max_examples=25, deadline=None)
@given(value=st.dictionaries(st.text(min_size=1, max_size=8), values, max_size=4))
def test_a_settings_file_below_the_bounds_reads_as_yaml_safe_load_does(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("settings") / "s.yaml"
    path.write_text(yaml.safe_dump(value), encoding="utf-8")
    assert read_settings(path) == yaml.safe_load(path.read_text(encoding="utf-8")) == value


def help_of(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main([command, "-h"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # help text is wrapped


@pytest.mark.parametrize("command", ["locate", "evaluate"])
def test_the_help_lists_each_search_setting(command, capsys):
    text = help_of(command, capsys)
    assert "--search.k K Gallery neighbours retrieved inside the chosen cell. Default: the model's." in text
    assert "--search.eps_km EPS_KM DBSCAN radius (haversine), km. Default: the model's." in text
    assert "--search.select_km" in text and "--search.search_km" in text
    assert "e.g. ``{k: 5}``" in text  # the mapping form is said too


def test_the_serve_help_lists_each_service_setting(capsys):
    text = help_of("serve", capsys)
    assert "--service.max_queue MAX_QUEUE Further requests admitted" in text
    assert "Default: $GEOSWC_MAX_QUEUE, else 8." in text
    assert "--service.token" in text and "--service.warmup" not in text  # not a change serve takes


def test_search_changes_are_given_flag_by_flag_or_as_a_mapping():
    parser = command_parser("locate", COMMANDS["locate"])
    cfg = parser.parse_args(["photo.jpg", "--search", "{k: 5, r_km: 50}", "--search.eps_km", "2"])
    kwargs = call_arguments(parser, cfg, COMMANDS["locate"], "locate")
    assert kwargs["search"] == {"k": 5, "r_km": 50.0, "eps_km": 2.0}  # only what was given changes
    kwargs = call_arguments(parser, parser.parse_args(["photo.jpg"]), COMMANDS["locate"], "locate")
    assert kwargs["search"] == {}
    parser = command_parser("serve", COMMANDS["serve"])
    kwargs = call_arguments(parser, parser.parse_args(["--service.max_queue", "1"]), COMMANDS["serve"], "serve")
    assert kwargs["service"] == {"max_queue": 1}


def test_print_config_of_search_changes_reads_back(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["locate", "photo.jpg", "--search.k", "5", "--print_config"])
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["search"]["k"] == 5
    (tmp_path / "locate.yaml").write_text(printed)
    parser = command_parser("locate", COMMANDS["locate"])
    cfg = parser.parse_args(["-c", str(tmp_path / "locate.yaml"), "--search.eps_km", "3"])
    assert call_arguments(parser, cfg, COMMANDS["locate"], "locate")["search"] == {"k": 5, "eps_km": 3.0}


@pytest.mark.parametrize(
    ("value", "methods"),
    [
        ("swc,retrieval", ["swc", "retrieval"]),
        ("[swc, retrieval]", ["swc", "retrieval"]),
        ("classification", ["classification"]),
    ],
)
def test_a_list_of_methods_is_comma_separated_or_a_list(value, methods):
    parser = command_parser("evaluate", COMMANDS["evaluate"])
    cfg = parser.parse_args(["--data.csv", "b.csv", "--out", "o", "--methods", value])
    assert call_arguments(parser, cfg, COMMANDS["evaluate"], "evaluate")["methods"] == methods


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("[]", "give at least one method: swc, classification, retrieval"),
        ("", "give at least one method: swc, classification, retrieval"),
        ("swc,nearest", "'nearest' is not a method: give one or more of swc, classification, retrieval"),
    ],
)
def test_a_bad_list_of_methods_is_one_line_naming_the_accepted_form(tmp_path, capsys, value, needle):
    argv = ["evaluate", "--data.csv", str(tmp_path / "b.csv"), "--out", str(tmp_path / "o"), "--methods", value]
    assert main(argv) == 2
    one_line_error(capsys, "--methods", needle)
    assert not (tmp_path / "o").exists()  # refused before any work


def test_a_huge_refused_value_is_quoted_in_a_short_line(capsys):
    assert main(["locate", "photo.jpg", "--run.batch_size", "[" * 100_000]) == 2
    err = one_line_error(capsys, "--run.batch_size", "characters in all")
    assert len(err) < 2200
