"""The README and the documentation site: the README stays short, every relative link and anchor resolves, the
results tables in docs/tables are what scripts/docs_tables.py makes of benchmarks/results (a changed number makes
this fail until the tables are regenerated), and every results file says where it comes from."""

from __future__ import annotations

import json
import re
import shutil
import unicodedata
from pathlib import Path

import pytest

from .conftest import ROOT, load_script

DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
README_MAX_LINES = 250
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


@pytest.fixture(scope="module")
def tables():
    return load_script("scripts", "docs_tables")


def _prose(path: Path) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks, inline code removed."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug (what MkDocs uses for anchors)."""
    text = unicodedata.normalize("NFKD", re.sub(r"[`*_]", "", heading)).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(path: Path) -> set[str]:
    return {_slug(line.lstrip("#").strip()) for line in _prose(path) if re.match(r"#{1,6} ", line)}


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    broken = []
    for line in _prose(page):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{target}: no such file")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_documentation_pages_are_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages == set(re.findall(r":\s*([\w.-]+\.md)\s*$", config, re.M))
    assert "font: false" in config and "pymdownx.snippets" in config
    api = (DOCS / "api.md").read_text()
    for target in ("geoswc.Geolocator", "geoswc.workflow", "geoswc.core.config"):
        assert f"::: {target}" in api


def test_every_included_table_exists() -> None:
    for page in DOCS.glob("*.md"):
        for name in re.findall(r'^--8<-- "([^"]+)"', page.read_text(), re.M):
            assert (DOCS / "tables" / name).is_file(), f"{page.name} includes a missing table {name}"


def test_committed_tables_are_what_the_results_make(tables) -> None:
    stale = tables.stale(tables.render_all(RESULTS), DOCS / "tables")
    assert not stale, f"stale tables {stale}: run `make docs-tables`"


def _results_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "results"
    shutil.copytree(RESULTS, copy, ignore=shutil.ignore_patterns("*.png", "*.csv"))
    return copy


def test_a_changed_number_changes_the_table_and_check_names_it(tables, tmp_path, capsys) -> None:
    results = _results_copy(tmp_path)
    data = json.loads((results / "cross_validation.json").read_text())
    data["methods"]["swc"]["accuracy"]["750"] = 0.4321
    (results / "cross_validation.json").write_text(json.dumps(data))
    assert "| swc | 0.5 | 1.1 | 1.8 | 43.2 | 40.1 |" in tables.cross_validation(results)
    assert tables.main(["--results", str(results), "--out", str(DOCS / "tables"), "--check"]) == 1
    err = capsys.readouterr().err
    assert "cross_validation.md" in err and "compare.md" not in err
    out = tmp_path / "tables"
    assert tables.main(["--results", str(results), "--out", str(out)]) == 0
    assert tables.main(["--results", str(results), "--out", str(out), "--check"]) == 0


def test_tables_render_keys_only_when_present(tables, tmp_path) -> None:
    results = _results_copy(tmp_path)
    data = json.loads((results / "locate_throughput.json").read_text())
    for r in data["runtimes"].values():
        for key in ("backbone_only_images_per_s", "profile"):
            r.pop(key, None)
    (results / "locate_throughput.json").write_text(json.dumps(data))
    assert "Where the time goes" not in tables.locate_throughput(results)
    onnx = data["runtimes"]["onnx"]
    onnx["images_per_s"], onnx["backbone_only_images_per_s"] = 49.0, 61.25
    stage = {"thread": "decode", "ms_per_photo": 3.5, "share_of_wall": 0.2}
    onnx["profile"] = {"images_per_s": 50.0, "photos": 8, "wall_s": 0.16, "stages": {"decode": stage}}
    (results / "locate_throughput.json").write_text(json.dumps(data))
    text = tables.locate_throughput(results)
    assert "| geoswc, onnx runtime | 49.0 | 61.2 | 80 |" in text and "| decode | decode | 3.50 | 20 |" in text
    gallery = json.loads((results / "gallery_search_4.7M.json").read_text())
    gallery["runs"][0]["disk_bound_s"] = 12.5
    (results / "gallery_search_4.7M.json").write_text(json.dumps(gallery))
    assert "disk-bound s" in tables.gallery_search(results, "gallery_search_4.7M.json")


def test_captions_say_measured_at_or_committed_in(tables, tmp_path) -> None:
    results = _results_copy(tmp_path)
    backfilled = tables.cell_selection(results)
    assert re.search(r"committed in [0-9a-f]{7} \(", backfilled) and "measured at" not in backfilled
    data = json.loads((results / "cell_selection.json").read_text())
    data["provenance"] = {
        "command": "python benchmarks/cell_selection.py",
        "commit": "0123456789abcdef0123456789abcdef01234567-dirty",
        "date": "2030-01-02T03:04:05Z",
        "machine": {"cpu": "Some CPU", "cores": 8, "gpu": None},
        "load_average": [1.0, 2.0, 3.0],
    }
    (results / "cell_selection.json").write_text(json.dumps(data))
    caption = tables.cell_selection(results).splitlines()[-1]
    assert "measured at 0123456-dirty (2030-01-02)" in caption
    assert "Some CPU, 8 cores, no GPU" in caption and "load average 1.0–3.0" in caption
    assert caption.count("Source:") == 1


def test_every_results_json_records_its_provenance() -> None:
    files = sorted(RESULTS.glob("*.json")) + sorted(RESULTS.glob("*/*.json"))
    assert files
    for f in files:
        p = json.loads(f.read_text()).get("provenance")
        assert p, f"{f.name} has no provenance"
        assert p.get("commit") or re.fullmatch(r"[0-9a-f]{40}", p.get("committed_in", "")), f.name
        assert re.match(r"\d{4}-\d\d-\d\dT", p["date"]) and "machine" in p and "command" in p, f.name


def test_provenance_names_command_commit_machine_and_date(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    prov = load_script("benchmarks", "provenance")
    p = prov.provenance("python benchmarks/x.py --out y.json")
    assert p["command"] == "python benchmarks/x.py --out y.json"
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", p["commit"] or "0" * 40)
    assert p["machine"]["cores"] >= 1 and p["machine"]["cpu"] and "gpu" in p["machine"]
    assert p["date"].endswith("Z") and json.dumps(p)


def test_the_layer_map_follows_test_layers() -> None:
    from .test_layers import LAYERS

    rows = re.findall(r"^\| `(\w+)/` \|", (DOCS / "architecture.md").read_text(), re.M)
    assert rows == [name for name, _ in LAYERS if name]


def test_the_gpu_check_table_says_when_nothing_was_measured_and_shows_a_run(tables, tmp_path) -> None:
    results = _results_copy(tmp_path)
    (results / "gpu_check.json").unlink(missing_ok=True)
    assert "Not measured yet" in tables.gpu_check(results)
    run = {
        "device": "NVIDIA H100 80GB HBM3",
        "settings": {"backbone": "efficientnet-b4", "image_size": "300", "precision": "bf16"},
        "one_process": {
            "extract": {"processes": 1, "images_per_s": 812.4, "peak_gpu_gib": 9.5},
            "train": {"processes": 1, "images_per_s": 301.2, "loss_fell": True, "peak_gpu_gib": 21.25},
        },
        "torchrun": {"extract": {"error": "NCCL error"}, "train": {}},
        "clip_extract": {"backbone": "clip-vit-l14", "images_per_s": 640.0, "peak_gpu_gib": 3.0},
        "provenance": {"commit": "0123456789abcdef", "date": "2026-12-08T00:00:00Z", "machine": {"gpu": "H100 x1"}},
    }
    (results / "gpu_check.json").write_text(json.dumps(run))
    text = tables.gpu_check(results)
    assert "| one process (1 process(es)) | 812.4 | 301.2 | yes | 21.2 |" in text
    assert "| torchrun (– process(es)) | failed |" in text and "| clip-vit-l14 extraction | 640.0 |" in text
    assert "NVIDIA H100 80GB HBM3: efficientnet-b4 at 300 px, bf16" in text and "measured at 0123456" in text
