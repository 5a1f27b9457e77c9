"""The picture of the map page in the README and the docs: ``geoswc serve`` on the embedded model, the example
photo located through the page in headless Chromium, a screenshot saved.

    python scripts/map_screenshot.py                       # -> docs/images/map-page.png
    python scripts/map_screenshot.py --photo P --out F --chromium /path/to/chromium

Needs playwright (the ``dev`` extra) and a Chromium: Debian's /usr/bin/chromium or playwright's own
(``python -m playwright install chromium``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the load test's server starter: `geoswc serve` until it answers
from load_test import serve  # noqa: E402


def find_chromium(given: str | None) -> str | None:
    for path in (given, "/usr/bin/chromium"):
        if path and Path(path).is_file() and os.access(path, os.X_OK):
            return path
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        bundled = pw.chromium.executable_path
    return bundled if bundled and Path(bundled).is_file() else None


def screenshot(url: str, photo: Path, out: Path, chromium: str) -> None:
    """Open the page, upload ``photo`` through its file input, wait for the estimate, save the page to ``out``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url)
            page.wait_for_selector("body[data-ready=true]", timeout=15_000)
            page.wait_for_selector("#map[data-basemap=ready]", timeout=30_000)
            page.set_input_files("#file", [str(photo)])
            page.wait_for_selector(".geoswc-estimate", timeout=120_000)
            page.wait_for_selector("#details .place-name", timeout=10_000)
            page.wait_for_timeout(800)  # let fitBounds' animation settle
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photo", type=Path, default=ROOT / "examples" / "kauai.png")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "map-page.png")
    p.add_argument("--chromium", help="a Chromium executable (default: /usr/bin/chromium, else playwright's own)")
    a = p.parse_args(argv)
    chromium = find_chromium(a.chromium)
    if chromium is None:
        print("no Chromium: install Debian's chromium or run `python -m playwright install chromium`", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="map-shot-") as tmp, serve([], Path(tmp) / "serve.log", "default") as srv:
        screenshot(f"http://127.0.0.1:{srv.port}/", a.photo, a.out, chromium)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
