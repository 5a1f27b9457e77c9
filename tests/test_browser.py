"""The map page in a real headless Chromium: `geoswc serve` on a free localhost port, photos uploaded through
the page's file input, the estimate drawn on the offline map. Needs a Chromium: Debian's /usr/bin/chromium
(`make browser`, as root) or playwright's own (`python -m playwright install chromium`); without one the tests
skip in one line, and fail under CI."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from geoswc.core.sphere import haversine_km

from .conftest import DEV_CSV, DEV_IMAGES, KAUAI, ROOT, free_port, gps_exif, write_csv

log = logging.getLogger(__name__)

DEBIAN_CHROMIUM = Path("/usr/bin/chromium")
NO_BROWSER = (
    "no Chromium for the browser tests: `make browser` (as root) installs Debian's chromium, "
    "or `python -m playwright install chromium` downloads playwright's own"
)
START_TIMEOUT_S = 90
ANTIMERIDIAN_JS = """() => {
  const cell = {token: 'fiji', lat: -17.5, lon: 179.5, probability: 0.5,
                polygon: [[-20, 175], [-20, -175], [-15, -175], [-15, 175]]};
  const p = {image: 'fiji.jpg', lat: -17.7, lon: 179.3, confidence: 0.4, method: 'swc', cell: 'fiji',
             cell_probability: 0.5, cluster: -1, fallback: false, place: null, exif: null, neighbors: [],
             top_cells: [cell]};
  const s = geoswc.state;
  s.items.push({name: p.image, url: '', status: 'done', result: p});
  geoswc.select(s.items.length - 1);
  const spans = [];
  s.overlay.eachLayer(l => {
    if (l instanceof L.Polygon) { const b = l.getBounds(); spans.push(b.getEast() - b.getWest()); }
  });
  return spans;
}"""

RINGS_JS = """() => {
  const p = {image: 'doubtful.jpg', lat: 48.85, lon: 2.35, confidence: 0.01, method: 'swc', cell: 'x',
             cell_probability: 0.1, cluster: -1, fallback: false, place: null, exif: null, neighbors: [],
             top_cells: [], cell_polygon: [], signals: {},
             within_km: {'1': 0.0, '25': 0.1, '200': 0.3, '750': 0.5, '2500': 0.95}, localizable: false};
  const s = geoswc.state;
  s.items.push({name: p.image, url: '', status: 'done', result: p});
  geoswc.select(s.items.length - 1);
  const radii = {};
  s.overlay.eachLayer(l => { if (l instanceof L.Circle) radii[l.options.className] = l.getRadius() / 1000; });
  return radii;
}"""


@contextlib.contextmanager
def serving(logfile: Path, *args: str) -> Iterator[str]:
    """``geoswc serve ARGS`` (the real command) in a subprocess on a free port; yields its base URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEOSWC_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "geoswc.cli", "serve", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`geoswc serve` exited with {proc.returncode}:\n{logfile.read_text()}")
            try:
                with urllib.request.urlopen(url + "api/health", timeout=2) as r:
                    assert json.load(r)["status"] == "ok"
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"`geoswc serve` did not answer within {START_TIMEOUT_S} s:\n{logfile.read_text()}")
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``geoswc serve`` with the embedded model (no thumbnails); yields its base URL."""
    with serving(tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


def _executable(path: str | Path) -> bool:
    return Path(path).is_file() and os.access(path, os.X_OK)


def find_chromium(debian: Path = DEBIAN_CHROMIUM) -> str | None:
    """A Chromium for playwright to launch: Debian's ``debian`` when installed, else the one
    ``python -m playwright install chromium`` downloads (when it did); None when there is neither."""
    if _executable(debian):
        return str(debian)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        bundled = pw.chromium.executable_path
    return bundled if bundled and _executable(bundled) else None


@pytest.fixture(scope="module")
def chromium() -> str:
    """The browser's path. Without one the tests skip in one line saying how to get one; under CI they fail."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[dev]'")
    path = find_chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but there is {NO_BROWSER}")
        pytest.skip(NO_BROWSER)
    return path


@contextlib.contextmanager
def ready_page(chromium: str, url: str, errors: list[str], console: bool = False) -> Iterator[Any]:
    """The map page at ``url`` in headless Chromium, loaded and its basemap drawn; page errors and failed
    requests (and console errors, with ``console``) are appended to ``errors``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            if console:
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(url)
            page.wait_for_selector("body[data-ready=true]", timeout=15_000)
            page.wait_for_selector("#map[data-basemap=ready]", timeout=30_000)
            yield page
        finally:
            browser.close()


@pytest.mark.slow
def test_page_locates_uploaded_photos(chromium: str, server: str, tmp_path: Path) -> None:
    gps_photo = tmp_path / "kauai_gps.jpg"  # the same photo with its GPS position in EXIF
    Image.open(KAUAI).convert("RGB").save(gps_photo, quality=90, exif=gps_exif(22.0964, -159.5261))
    page_errors: list[str] = []
    with ready_page(chromium, server, page_errors) as page:
        jump = page.evaluate("geoswc.basemapMaxJump()")
        assert jump is not None and jump < 180, f"country outlines cross the map as bands (jump {jump}°)"
        ring = page.evaluate("geoswc.unwrapRing([[-10, 179], [-10, -179], [-12, -179], [-12, 179]])")
        assert max(abs(a[1] - b[1]) for a, b in zip(ring, ring[1:], strict=False)) < 180

        page.set_input_files("#file", [str(KAUAI), str(gps_photo)])
        page.wait_for_selector(".geoswc-estimate", timeout=60_000)
        page.wait_for_selector("#details .place-name", timeout=10_000)
        page.wait_for_function("document.querySelectorAll('#results li[data-status=done]').length === 2")
        place = page.inner_text("#details .place-name").strip()
        assert place and place != "no named place"
        assert page.inner_text("#details h2") == "kauai.png"
        assert page.locator("path.geoswc-cell").count() >= 5
        assert page.locator("path.geoswc-searched").count() >= 1
        # The embedded model ships a calibrator: chances in words, rings instead of the formula circle.
        assert page.locator("path.geoswc-confidence").count() == 0
        details = page.inner_text("#details")
        assert "within 25 km:" in details and "within 2500 km:" in details and "50 %:" in details
        kauai = page.evaluate("geoswc.state.items[0].result")
        rings = page.locator("path.geoswc-ring50").count() + page.locator("path.geoswc-ring90").count()
        assert rings == sum(kauai["within_km"]["2500"] >= q for q in (0.5, 0.9))
        assert ("Not localizable" in details) == (not kauai["localizable"])
        assert page.locator("path.geoswc-neighbor").count() >= 1
        assert [t.strip() for t in page.locator("#results li .name").all_inner_texts()] == [
            "kauai.png",
            "kauai_gps.jpg",
        ]
        page.wait_for_timeout(400)  # let fitBounds' animation settle
        shot = tmp_path / "kauai.png"
        page.screenshot(path=str(shot))

        page.locator("#results li").nth(1).click()
        page.wait_for_selector("path.geoswc-exif", timeout=10_000)
        assert "km off" in page.inner_text("#details")
        page.wait_for_timeout(400)
        shot_gps = tmp_path / "kauai_gps.png"
        page.screenshot(path=str(shot_gps))

        # A cell across the antimeridian (Fiji) must be drawn as one 10°-wide polygon, not a 350° band.
        spans = page.evaluate(ANTIMERIDIAN_JS)
        assert spans and max(spans) < 20, spans

        # Rings hold 50 % and 90 % of the calibrated mass (log-interpolated between thresholds); a
        # non-localizable estimate says so plainly.
        radii = page.evaluate(RINGS_JS)
        assert radii["geoswc-ring50"] == pytest.approx(750, rel=1e-6)
        assert radii["geoswc-ring90"] == pytest.approx(750 * (2500 / 750) ** (0.4 / 0.45), rel=1e-6)
        assert "Not localizable" in page.inner_text("#details .not-localizable")
        assert "not localizable" in page.inner_text("#results li.selected")
        assert (
            page.evaluate("geoswc.massRadiusKm({'1': 0, '25': 0.1, '200': 0.2, '750': 0.3, '2500': 0.4}, 0.5)") is None
        )
        page.wait_for_timeout(400)
        shot_rings = tmp_path / "rings.png"
        page.screenshot(path=str(shot_rings))
    assert not page_errors, page_errors
    assert shot.stat().st_size > 20_000 and shot_gps.stat().st_size > 20_000 and shot_rings.stat().st_size > 20_000
    log.info("screenshots: %s, %s, %s", shot, shot_gps, shot_rings)
    if keep := os.environ.get("GEOSWC_SCREENSHOT_DIR"):
        Path(keep).mkdir(parents=True, exist_ok=True)
        for s in (shot, shot_gps, shot_rings):
            shutil.copy(s, Path(keep) / s.name)


# -- the evidence: thumbnails of the retrieved photos, from a gallery built here with them -----------------------


@pytest.fixture(scope="module")
def thumbnail_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``geoswc serve --index`` of a gallery with thumbnails built at test time (``geoswc index --thumbnails``,
    embedded model) from 30 development photos: the ten the embedded gallery retrieves for the example photo (so
    that it retrieves them here too), and 20 others. Yields its URL."""
    from geoswc.cli import main
    from geoswc.prediction.geolocator import Geolocator, default_model_dir

    d = tmp_path_factory.mktemp("thumbs")
    near = {n.image for n in Geolocator.load().locate(KAUAI, with_place=False).neighbors}
    with open(DEV_CSV, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    gallery = [r for r in rows if r["image"] in near] + [r for r in rows[::97] if r["image"] not in near][:20]
    assert len(near) >= 3 and len(gallery) == len(near) + 20
    csv_path = write_csv(d / "gallery.csv", gallery)
    assert (
        main(
            [
                "index",
                "--model",
                str(default_model_dir()),
                "--out",
                str(d / "index"),
                "--data.csv",
                str(csv_path),
                "--data.images",
                str(DEV_IMAGES),
                "--thumbnails",
                "128",
            ]
        )
        == 0
    )
    with serving(d / "serve.log", "--index", str(d / "index")) as url:
        yield url


@pytest.mark.slow
@pytest.mark.shared_data
def test_page_shows_the_thumbnails_of_the_retrieved_photos(
    chromium: str, thumbnail_server: str, tmp_path: Path
) -> None:
    url, photo = thumbnail_server, KAUAI
    page_errors: list[str] = []
    with ready_page(chromium, url, page_errors, console=True) as page:
        page.set_input_files("#file", [str(photo)])
        page.wait_for_selector(".geoswc-estimate", timeout=60_000)
        p = page.evaluate("geoswc.state.items[0].result")
        with_thumb = [n for n in p["neighbors"] if n["thumbnail"]]
        assert len(with_thumb) >= 3, f"the photo should retrieve gallery photos of its place: {p['neighbors']}"
        n = len(with_thumb)
        loaded = (
            "n => document.querySelectorAll('{} img').length === n && "
            "[...document.querySelectorAll('{} img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        page.wait_for_function(loaded.format(".evidence-strip", ".evidence-strip"), arg=n, timeout=20_000)
        page.wait_for_function(loaded.format(".geoswc-thumb-marker", ".geoswc-thumb-marker"), arg=n, timeout=20_000)
        corners = page.evaluate(
            "[...document.querySelectorAll('.geoswc-thumb-marker')].map(e => { const r = "
            "e.getBoundingClientRect(); return [Math.round(r.left), Math.round(r.top)]; })"
        )
        assert len({tuple(c) for c in corners}) == n, f"thumbnails stacked on one another: {corners}"
        sizes = page.evaluate(
            "[...document.querySelectorAll('.evidence-strip img')].map(i => [i.naturalWidth, "
            "i.naturalHeight, i.dataset.row, i.src.slice(0, 5)])"
        )
        assert all(max(w, h) == 128 and src == "blob:" for w, h, _, src in sizes), sizes
        assert sorted(int(r) for _, _, r, _ in sizes) == sorted(x["row"] for x in with_thumb)
        strip = page.inner_text("#details .evidence")
        assert "Retrieved gallery photos" in strip and "sim " in strip and " km" in strip
        first = p["neighbors"][0]
        km = page.evaluate("([a, b]) => geoswc.distanceKm(a, b)", [[p["lat"], p["lon"]], [first["lat"], first["lon"]]])
        assert km == pytest.approx(
            float(haversine_km(p["lat"], p["lon"], first["lat"], first["lon"])), rel=1e-3, abs=1e-3
        )
        cell = page.inner_text(".evidence-strip li:first-child")
        assert f"sim {first['similarity']:.2f}" in cell and " km" in cell
        assert page.locator("path.geoswc-neighbor").count() == len(p["neighbors"])
        assert "--thumbnails" in page.inner_text("#legend")
        page.locator("#details .evidence").scroll_into_view_if_needed()
        page.wait_for_timeout(400)  # let fitBounds' animation settle
        shot = tmp_path / "thumbnails.png"
        page.screenshot(path=str(shot))
    assert not page_errors, page_errors
    assert shot.stat().st_size > 20_000
    log.info("screenshot: %s", shot)
    if keep := os.environ.get("GEOSWC_SCREENSHOT_DIR"):
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
