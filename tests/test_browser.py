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

import numpy as np
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


def drawn(page: Any, cls: str) -> int:
    """How many layers of the shown prediction carry the class ``cls`` (drawn on the overlay's canvas, not as SVG
    elements)."""
    return int(page.evaluate("cls => geoswc.drawn(cls)", cls))


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
        assert drawn(page, "geoswc-cell") >= 5
        assert drawn(page, "geoswc-searched") >= 1
        # The embedded model ships a calibrator: chances in words, rings instead of the formula circle.
        assert drawn(page, "geoswc-confidence") == 0
        details = page.inner_text("#details")
        assert "within 25 km:" in details and "within 2500 km:" in details and "50 %:" in details
        kauai = page.evaluate("geoswc.state.items[0].result")
        rings = drawn(page, "geoswc-ring50") + drawn(page, "geoswc-ring90")
        assert rings == sum(kauai["within_km"]["2500"] >= q for q in (0.5, 0.9))
        assert ("Not localizable" in details) == (not kauai["localizable"])
        assert drawn(page, "geoswc-neighbor") >= 1
        assert [t.strip() for t in page.locator("#results li .name").all_inner_texts()] == [
            "kauai.png",
            "kauai_gps.jpg",
        ]
        page.wait_for_timeout(400)  # let fitBounds' animation settle
        shot = tmp_path / "kauai.png"
        page.screenshot(path=str(shot))

        page.locator("#results li").nth(1).click()
        page.wait_for_function("geoswc.drawn('geoswc-exif') === 1", timeout=10_000)
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
        assert drawn(page, "geoswc-neighbor") == len(p["neighbors"])
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


# -- the estimate on top, the view at the estimate, the searched cell explained, thousands of neighbours ----------

MARKER_JS = """() => { const r = document.querySelector('.geoswc-estimate').getBoundingClientRect();
  return {left: r.left, top: r.top, right: r.right, bottom: r.bottom,
          x: r.left + r.width / 2, y: r.top + r.height / 2}; }"""

# Points over the estimate marker (its centre among them) whose topmost element is not the marker.
COVERED_JS = """() => {
  const m = document.querySelector('.geoswc-estimate').getBoundingClientRect(), out = [];
  for (const fx of [0.2, 0.5, 0.8]) for (const fy of [0.15, 0.5, 0.85]) {
    const x = m.left + fx * m.width, y = m.top + fy * m.height, e = document.elementFromPoint(x, y);
    if (!e || !e.closest('.geoswc-estimate')) out.push([x, y, e ? String(e.className) : null]);
  }
  return out;
}"""

# Where a thumbnail shown on the map overlaps the estimate marker: {spot: the centre of the overlap, entry: a point
# of that thumbnail away from the marker where the thumbnail is on top}; null if no thumbnail overlaps it.
OVERLAP_JS = """() => {
  const m = document.querySelector('.geoswc-estimate').getBoundingClientRect();
  for (const t of document.querySelectorAll('.geoswc-thumb-marker')) {
    if (!t.getClientRects().length) continue;  // hidden
    const r = t.getBoundingClientRect();
    const l = Math.max(r.left, m.left), rt = Math.min(r.right, m.right);
    const tp = Math.max(r.top, m.top), b = Math.min(r.bottom, m.bottom);
    if (rt - l < 3 || b - tp < 3) continue;
    const ex = r.left + r.width / 2 > m.left + m.width / 2 ? r.right - 3 : r.left + 3, ey = r.top + r.height / 2;
    const e = document.elementFromPoint(ex, ey);
    if (e && t.contains(e)) return {spot: [(l + rt) / 2, (tp + b) / 2], entry: [ex, ey]};
  }
  return null;
}"""

# What is topmost at a point: "the estimate", "a thumbnail (its photo)" or the element.
TOPMOST_JS = """([x, y]) => { const e = document.elementFromPoint(x, y);
  if (!e) return 'nothing';
  if (e.closest('.geoswc-estimate')) return 'the estimate';
  const t = e.closest('.geoswc-thumb-marker');
  return t ? 'a thumbnail (' + (t.querySelector('img') || {}).alt + ')' : e.tagName + '.' + e.className; }"""

# Whether the estimate (the marker's tip) lies inside the map's visible rectangle.
IN_VIEW_JS = """() => { const e = document.querySelector('.geoswc-estimate');
  if (!e) return false;
  const m = e.getBoundingClientRect(), r = document.getElementById('map').getBoundingClientRect();
  const x = m.left + m.width / 2, y = m.bottom;
  return x > r.left && x < r.right && y > r.top && y < r.bottom; }"""

# The visible map's width in km along its centre latitude.
VIEW_KM_JS = """() => { const b = geoswc.state.map.getBounds(), c = b.getCenter();
  return geoswc.distanceKm([c.lat, b.getWest()], [c.lat, c.lng]) +
    geoswc.distanceKm([c.lat, c.lng], [c.lat, b.getEast()]); }"""


def locate_through_page(page: Any, photo: Path) -> dict[str, Any]:
    """Upload ``photo`` through the page's file input and wait until its estimate is drawn; returns the result."""
    page.set_input_files("#file", [str(photo)])
    page.wait_for_selector(".geoswc-estimate", timeout=60_000)
    page.wait_for_selector("#details h2", timeout=10_000)
    return page.evaluate("geoswc.state.items[geoswc.state.selected].result")


def set_view(page: Any, lat: float, lon: float, zoom: float) -> None:
    page.evaluate("([lat, lon, z]) => { geoswc.state.map.setView([lat, lon], z, {animate: false}); }", [lat, lon, zoom])
    page.wait_for_timeout(150)


def click_opens_estimate_popup(page: Any, x: float, y: float, place: str, close: bool = True) -> None:
    """A real mouse click at (x, y) opens the estimate's popup, which names the place."""
    page.evaluate("() => { geoswc.state.map.closePopup(); }")
    page.mouse.click(x, y)
    page.wait_for_selector(".leaflet-popup-content", timeout=5_000)
    assert place in page.inner_text(".leaflet-popup-content")
    if close:
        page.evaluate("() => { geoswc.state.map.closePopup(); }")


def keep_screenshots(*shots: Path) -> None:
    for s in shots:
        assert s.stat().st_size > 20_000, s
    log.info("screenshots: %s", ", ".join(map(str, shots)))
    if keep := os.environ.get("GEOSWC_SCREENSHOT_DIR"):
        Path(keep).mkdir(parents=True, exist_ok=True)
        for s in shots:
            shutil.copy(s, Path(keep) / s.name)


@pytest.mark.slow
@pytest.mark.shared_data
def test_estimate_stays_on_top_of_the_thumbnails(chromium: str, thumbnail_server: str, tmp_path: Path) -> None:
    """The estimate marker ("click it for the place") is the topmost element over all of it at every zoom, also
    where a thumbnail overlaps it, and a click on it opens its popup."""
    page_errors: list[str] = []
    with ready_page(chromium, thumbnail_server, page_errors, console=True) as page:
        p = locate_through_page(page, KAUAI)
        n = sum(1 for x in p["neighbors"][:24] if x["thumbnail"])
        assert n >= 3
        page.wait_for_function(
            "n => [...document.querySelectorAll('.geoswc-thumb-marker img')].filter(i => i.complete && "
            "i.naturalWidth > 0).length === n",
            arg=n,
            timeout=20_000,
        )
        place = page.inner_text("#details .place-name").strip()
        page.wait_for_function(IN_VIEW_JS, timeout=5_000)
        assert page.evaluate(COVERED_JS) == []
        m = page.evaluate(MARKER_JS)
        click_opens_estimate_popup(page, m["x"], m["y"], place)
        shot = tmp_path / "estimate_on_top.png"
        page.screenshot(path=str(shot))

        fitted = page.evaluate("geoswc.state.map.getZoom()")
        overlapped = []
        max_zoom = page.evaluate("geoswc.state.map.getMaxZoom()")
        for z in sorted({fitted, *range(3, int(max_zoom) + 1)}):
            set_view(page, p["lat"], p["lon"], z)
            assert page.evaluate(COVERED_JS) == [], f"at zoom {z} something covers the estimate marker"
            m = page.evaluate(MARKER_JS)
            click_opens_estimate_popup(page, m["x"], m["y"], place)
            over = page.evaluate(OVERLAP_JS)
            if over:
                # A thumbnail lies under part of the marker. The pointer comes over that thumbnail (a hovered marker
                # rises above the others) and on to the estimate: the estimate must still be on top, and get the click.
                overlapped.append(z)
                page.mouse.move(*over["entry"])
                page.wait_for_timeout(100)
                page.mouse.move(*over["spot"], steps=8)
                top = page.evaluate(TOPMOST_JS, over["spot"])
                assert top == "the estimate", f"at zoom {z} the estimate is under {top} after hovering it"
                assert page.evaluate(COVERED_JS) == [], f"at zoom {z} a hovered thumbnail covers the estimate"
                click_opens_estimate_popup(page, *over["spot"], place, close=len(overlapped) > 1)
                if len(overlapped) == 1:
                    page.wait_for_timeout(300)  # the popup's fade-in
                    shot_overlap = tmp_path / "estimate_over_thumbnail.png"
                    page.screenshot(path=str(shot_overlap))
                    page.evaluate("() => { geoswc.state.map.closePopup(); }")
                page.mouse.move(5, 5)
        # Without an overlap at some zoom the checks above would prove nothing about the thumbnails.
        assert overlapped, "no zoom at which a thumbnail overlaps the estimate marker"
        log.info("a thumbnail overlaps the estimate at zooms %s (fitted: %s)", overlapped, fitted)
        # At continent zoom the thumbnails are in the strip only, not hundreds of km off on the map.
        set_view(page, p["lat"], p["lon"], 4)
        assert page.evaluate(
            "[...document.querySelectorAll('.geoswc-thumb-marker')].every(t => !t.getClientRects().length)"
        )
        assert page.locator(".evidence-strip img").count() == n
    assert not page_errors, page_errors
    keep_screenshots(shot, shot_overlap)


@pytest.mark.slow
def test_view_goes_to_the_estimate_and_the_button_brings_it_back(chromium: str, server: str, tmp_path: Path) -> None:
    """After a result the view is the estimate and the neighbours of its cluster, no closer than the offline base map
    can show; "Zoom to estimate" brings it back after panning away; past the base map's detail the page says so."""
    page_errors: list[str] = []
    with ready_page(chromium, server, page_errors, console=True) as page:
        world = page.evaluate("geoswc.state.map.getZoom()")
        idle = page.evaluate("(document.querySelector('.geoswc-zoom-estimate') || {}).disabled === true")
        p = locate_through_page(page, KAUAI)
        agree = [x for x in p["neighbors"] if x["cluster"] == p["cluster"] and x["cluster"] >= 0]
        spread = max((haversine_km(p["lat"], p["lon"], x["lat"], x["lon"]) for x in agree), default=0.0)
        assert agree and spread < 50, "the example photo's evidence should be one tight cluster"
        page.wait_for_function(IN_VIEW_JS, timeout=5_000)
        zoom = page.evaluate("geoswc.state.map.getZoom()")
        view_km = page.evaluate(VIEW_KM_JS)
        assert world < zoom and view_km < 1000, f"the view is {view_km:.0f} km wide (zoom {zoom}), not at the estimate"
        detail = page.evaluate("geoswc.DETAIL_ZOOM")
        assert zoom <= detail, "closer than the offline base map can show"
        inside = page.evaluate(
            "ns => ns.every(n => geoswc.state.map.getBounds().contains([n.lat, geoswc.nearLon(n.lon, 0)]))", agree
        )
        assert inside, "the neighbours that agree with the estimate should be in view"
        assert page.locator(".geoswc-detail-note").is_hidden()
        button = page.get_by_role("button", name="Zoom to estimate")
        assert idle and button.is_enabled(), "the button is disabled until there is an estimate, then enabled"
        page.wait_for_timeout(300)
        shot = tmp_path / "view_at_estimate.png"
        page.screenshot(path=str(shot))

        # The base map still shows something at that zoom: outlines, not one flat colour (the page's layers hidden).
        hide = ".leaflet-overlay-pane, .leaflet-geoswcEstimate-pane, .leaflet-geoswcThumbs-pane, .leaflet-control"
        page.add_style_tag(content=f"{hide} {{ visibility: hidden !important; }}")
        base = tmp_path / "basemap_at_estimate.png"
        page.locator("#map").screenshot(path=str(base))
        outline = outline_pixels(base)
        assert outline > 300, f"the base map is blank at zoom {zoom} ({outline} outline pixels)"
        page.evaluate("document.head.lastElementChild.remove()")

        set_view(page, -30, -60, 3)  # pan away to South America
        assert not page.evaluate(IN_VIEW_JS)
        button.click()
        page.wait_for_function(IN_VIEW_JS, timeout=5_000)
        page.wait_for_function("z => Math.abs(geoswc.state.map.getZoom() - z) < 0.01", arg=zoom, timeout=5_000)

        page.evaluate("z => { geoswc.state.map.setZoom(z, {animate: false}); }", detail + 2)
        note = page.locator(".geoswc-detail-note")
        note.wait_for(state="visible", timeout=5_000)
        assert "no more detail" in note.inner_text()
        page.wait_for_timeout(300)
        shot_beyond = tmp_path / "beyond_detail.png"
        page.screenshot(path=str(shot_beyond))
        page.evaluate("z => { geoswc.state.map.setZoom(z, {animate: false}); }", detail)
        note.wait_for(state="hidden", timeout=5_000)
    assert not page_errors, page_errors
    keep_screenshots(shot, base, shot_beyond)


def outline_pixels(png: Path) -> int:
    """Pixels of a base map screenshot that are neither the land fill nor the sea: the outlines."""
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int32)
    land, sea = np.array([0xF3, 0xEF, 0xE4]), np.array([0xCF, 0xE2, 0xEE])
    off = np.minimum(np.abs(rgb - land).sum(-1), np.abs(rgb - sea).sum(-1))
    return int((off > 40).sum())


def colour_pixels(png: Path, colour: str, tolerance: int = 30) -> int:
    """Pixels of a screenshot within ``tolerance`` (summed over R, G, B) of ``colour`` ('#rrggbb')."""
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int32)
    ref = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - ref).sum(-1) < tolerance).sum())


SAME_CELL_JS = """() => {
  const s = geoswc.state, p = JSON.parse(JSON.stringify(s.items[0].result));
  p.image = 'same.jpg'; p.cell = p.top_cells[0].token; p.cell_probability = p.top_cells[0].probability;
  s.items.push({name: p.image, url: '', status: 'done', result: p});
  geoswc.select(s.items.length - 1);
  return document.getElementById('details').innerText;
}"""


@pytest.mark.slow
def test_page_explains_a_searched_cell_that_is_not_the_top_cell(chromium: str, server: str, tmp_path: Path) -> None:
    page_errors: list[str] = []
    with ready_page(chromium, server, page_errors, console=True) as page:
        p = locate_through_page(page, KAUAI)
        top = p["top_cells"][0]
        assert top["token"] != p["cell"], "the embedded model (select_km 2000) searches another cell for this photo"
        details = page.inner_text("#details")
        assert f"top cell\n{top['token']} ({100 * top['probability']:.1f} %)" in details.replace("\t", "\n")
        assert f"searched cell\n{p['cell']} ({100 * p['cell_probability']:.1f} %)" in details.replace("\t", "\n")
        note = page.inner_text("#details .cell-note")
        assert "select_km" in note and "neighbourhood" in note and "most probability" in note
        assert "not the single most probable cell" in note
        assert p["prior_like"] is True  # the embedded model's answer for almost any photo: the page says so
        assert "No better than the model's prior" in page.inner_text("#details .prior-like")
        page.locator("#details .cell-note").scroll_into_view_if_needed()
        shot = tmp_path / "cell_note.png"
        page.screenshot(path=str(shot))
        same = page.evaluate(SAME_CELL_JS)
        assert "searched cell" in same and page.locator("#details .cell-note").count() == 0
    assert not page_errors, page_errors
    keep_screenshots(shot)


MAX_THUMBNAIL_REQUESTS = 24

# Thumbnail requests made, and the most in flight at once, from the browser's resource timing.
IN_FLIGHT_JS = """() => {
  const ev = [];
  for (const e of performance.getEntriesByType('resource')) {
    if (!e.name.includes('/api/thumbnails/')) continue;
    ev.push([e.startTime, 1], [e.responseEnd, -1]);
  }
  ev.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  let now = 0, most = 0;
  for (const [, d] of ev) { now += d; most = Math.max(most, now); }
  return [ev.length / 2, most];
}"""

# A promise of the time of the first frame after the estimate marker appeared (installed before the upload).
DRAWN_AT_JS = """() => { window.drawnAt = new Promise(resolve => {
  const o = new MutationObserver(() => {
    if (!document.querySelector('.geoswc-estimate')) return;
    o.disconnect();
    requestAnimationFrame(() => setTimeout(() => resolve(performance.now()), 0));
  });
  o.observe(document.body, {subtree: true, childList: true});
}); }"""

# Milliseconds from the end of api/locate's answer to that frame.
ELAPSED_JS = """async () => {
  const t = await window.drawnAt;
  const e = performance.getEntriesByType('resource').filter(x => x.name.includes('/api/locate')).pop();
  return t - e.responseEnd;
}"""


def many_neighbours(n: int, seed: int = 0) -> dict[str, Any]:
    """A prediction in the shape of POST /api/locate's with ``n`` neighbours, all with thumbnails: a tight cluster
    of 200 at the estimate, the rest spread over Europe in 20 clusters and noise."""
    import random

    rng = random.Random(seed)
    lat, lon = 47.39, 12.64
    neighbours = []
    for i in range(n):
        if i < 200:
            nlat, nlon, cluster = lat + rng.gauss(0, 0.05), lon + rng.gauss(0, 0.07), 0
        else:
            nlat, nlon, cluster = rng.uniform(36, 60), rng.uniform(-10, 30), rng.randrange(-1, 20)
        neighbours.append(
            {
                "image": f"g/{i}.jpg",
                "lat": nlat,
                "lon": nlon,
                "similarity": round(0.9 - 0.5 * i / n, 4),
                "cluster": cluster,
                "row": i,
                "thumbnail": True,
            }
        )
    poly = [[46.0, 11.0], [46.0, 14.5], [48.5, 14.5], [48.5, 11.0]]
    return {
        "image": "kauai.png",
        "lat": lat,
        "lon": lon,
        "confidence": 0.4,
        "method": "swc",
        "cell": "477",
        "cell_probability": 0.2,
        "top_cells": [{"token": "477", "lat": lat, "lon": lon, "probability": 0.2, "polygon": poly}],
        "neighbors": neighbours,
        "cluster": 0,
        "fallback": False,
        "place": {
            "name": "Saalbach",
            "admin1": "Salzburg",
            "admin2": "",
            "country_code": "AT",
            "country": "Austria",
            "lat": 47.39,
            "lon": 12.64,
            "distance_km": 0.5,
        },
        "exif": None,
        "cell_polygon": poly,
        "signals": {},
        "within_km": {"1": 0.01, "25": 0.3, "200": 0.6, "750": 0.8, "2500": 0.95},
        "localizable": True,
    }


@pytest.mark.slow
def test_thousands_of_neighbours_render_fast_with_few_thumbnail_requests(
    chromium: str, server: str, tmp_path: Path
) -> None:
    """A result with 5,000 neighbours (POST api/locate stubbed in the browser) is drawn in under 2 s and loads at
    most 24 thumbnails, a few at a time."""
    import io

    pred = many_neighbours(5000)
    buf = io.BytesIO()
    Image.new("RGB", (96, 72), (90, 140, 200)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    body = json.dumps([pred])
    asked: list[str] = []

    def locate(route: Any) -> None:
        route.fulfill(status=200, content_type="application/json", body=body)

    def thumbnail(route: Any) -> None:
        asked.append(route.request.url)
        route.fulfill(status=200, content_type="image/jpeg", body=jpeg)

    page_errors: list[str] = []
    with ready_page(chromium, server, page_errors, console=True) as page:
        page.route("**/api/locate*", locate)
        page.route("**/api/thumbnails/*", thumbnail)
        page.evaluate(DRAWN_AT_JS)
        page.set_input_files("#file", [str(KAUAI)])
        page.wait_for_selector(".geoswc-estimate", timeout=30_000)
        # In the browser's own clock: from the end of the answer's download to the next frame after the estimate
        # marker appeared (the main thread free again).
        elapsed = page.evaluate(ELAPSED_JS) / 1000
        render_ms = page.evaluate("geoswc.state.renderMs")
        log.info("5000 neighbours: %.2f s from the answer to drawn, %.0f ms to render", elapsed, render_ms)
        assert elapsed < 2.0, f"{elapsed:.2f} s from the answer to the result drawn"
        assert page.locator("#details .evidence-strip").count() == 1
        assert drawn(page, "geoswc-neighbor") == 5000
        shown = min(MAX_THUMBNAIL_REQUESTS, len(pred["neighbors"]))
        page.wait_for_function(
            "n => [...document.querySelectorAll('.evidence-strip img')].filter(i => i.complete && "
            "i.naturalWidth > 0).length === n",
            arg=shown,
            timeout=15_000,
        )
        page.wait_for_timeout(1000)  # any late requests
        assert len(asked) <= MAX_THUMBNAIL_REQUESTS, f"{len(asked)} thumbnail requests"
        assert len(set(asked)) == len(asked), "a thumbnail was requested twice"
        assert page.locator(".evidence-strip li").count() == shown
        assert "24 most similar of 5,000" in page.inner_text("#details .evidence h3")
        requests, in_flight = page.evaluate(IN_FLIGHT_JS)
        assert requests == len(asked) and in_flight <= 4, (requests, in_flight)
        page.wait_for_timeout(300)
        shot = tmp_path / "many_neighbours.png"
        page.screenshot(path=str(shot))
        # The dots are on screen (a canvas, no elements to count): pixels of the estimate's cluster colour.
        pink = colour_pixels(shot, "#e64980")
        assert pink > 200, f"{pink} pixels of the cluster's colour"
        # A click on a dot beyond the 24 shown loads that photo's thumbnail on demand, in a popup.
        far = pred["neighbors"][4000]
        pt = page.evaluate(
            "n => { const m = geoswc.state.map; m.setView([n.lat, n.lon], 9, {animate: false}); "
            "const p = m.latLngToContainerPoint([n.lat, n.lon]), r = m.getContainer().getBoundingClientRect(); "
            "return [r.left + p.x, r.top + p.y]; }",
            far,
        )
        page.wait_for_timeout(200)
        page.mouse.click(pt[0], pt[1])
        page.wait_for_selector(".neighbor-popup img", timeout=5_000)
        page.wait_for_function("document.querySelector('.neighbor-popup img').naturalWidth > 0", timeout=5_000)
        assert asked[-1].endswith("/api/thumbnails/4000")
    assert not page_errors, page_errors
    keep_screenshots(shot)
