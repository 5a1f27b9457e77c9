"""GeoScore, administrative-level accuracy, the per-country breakdown and the errors map: hand-made cases with
known answers (border towns, the antimeridian, open sea, the poles), and the blocks they add to ``metrics.json``
and ``compare``."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from geoswc.evaluation.compare import compare_systems, markdown, read_system, write_comparison
from geoswc.evaluation.errors_map import antimeridian_segments, outline_arcs, plot_errors_map
from geoswc.evaluation.evaluate import MethodResult, format_metrics, write_evaluation
from geoswc.evaluation.metrics import GEOSCORE_SCALE_KM, geoscore, geoscore_block
from geoswc.evaluation.regions import (
    BREAKDOWN_COLUMNS,
    COUNTRY_CONTINENT,
    admin_block,
    admin_hits,
    admin_labels,
    breakdown,
    breakdown_csv,
    continent_of,
    format_breakdown,
)
from geoswc.prediction.geolocator import Geolocator
from geoswc.prediction.results import Prediction

STRASBOURG, KEHL = (48.5734, 7.7521), (48.5728, 7.8156)
GENEVA, ANNEMASSE = (46.2044, 6.1432), (46.1934, 6.2342)
PARIS, VERSAILLES = (48.8566, 2.3522), (48.8049, 2.1204)
VANUA_LEVU_EAST, TAVEUNI_EAST = (-16.8, 179.95), (-16.8, -179.95)  # Fiji, on both sides of 180 degrees
MID_PACIFIC = (-30.0, -140.0)


def _labels(points: list[tuple[float, float]]):
    return admin_labels([p[0] for p in points], [p[1] for p in points])


def test_geoscore_known_values() -> None:
    assert geoscore([0.0])[0] == 5000.0
    assert geoscore([GEOSCORE_SCALE_KM])[0] == pytest.approx(5000 / math.e)
    block = geoscore_block([0.0, GEOSCORE_SCALE_KM, 1e9])
    assert block["mean"] == pytest.approx((5000 + 5000 / math.e) / 3)
    assert block["median"] == pytest.approx(5000 / math.e)


def test_border_towns_are_different_countries() -> None:
    truth = _labels([STRASBOURG, GENEVA, PARIS])
    estimate = _labels([KEHL, ANNEMASSE, PARIS])
    assert [t.country for t in truth] == ["FR", "CH", "FR"]
    assert [e.country for e in estimate] == ["DE", "FR", "FR"]
    labelled, hits = admin_hits(truth, estimate)
    assert labelled.all()
    assert hits.tolist() == [[False] * 4, [False] * 4, [True] * 4]
    near = admin_block(_labels([PARIS]), _labels([VERSAILLES]))
    assert near["country"] == 1.0 and near["admin1"] == 1.0 and near["city"] == 0.0


def test_the_antimeridian_keeps_fiji_together() -> None:
    truth, estimate = _labels([VANUA_LEVU_EAST]), _labels([TAVEUNI_EAST])
    assert truth[0].country == estimate[0].country == "FJ"  # without the wrap: Wallis and Futuna, 338 km away
    assert admin_block(truth, estimate)["country"] == 1.0


def test_open_sea_and_poles_are_unlabelled_and_counted() -> None:
    truth = _labels([MID_PACIFIC, (89.9, 0.0), (-89.9, 120.0), PARIS])
    assert truth[0] is None and truth[1] is None and truth[2] is None and truth[3].country == "FR"
    block = admin_block(truth, _labels([MID_PACIFIC, (89.9, 0.0), (-89.9, 120.0), VERSAILLES]))
    assert block["labelled"] == 1 and block["unlabelled"] == 3 and block["country"] == 1.0
    sea_estimate = admin_block(_labels([PARIS]), _labels([MID_PACIFIC]))  # an estimate at sea matches nothing
    assert sea_estimate["country"] == 0.0 and sea_estimate["labelled"] == 1
    assert admin_block([None], [None])["country"] is None


def test_every_country_has_a_continent() -> None:
    import pycountry

    assert not [c.alpha_2 for c in pycountry.countries if c.alpha_2 not in COUNTRY_CONTINENT]
    assert continent_of("FR") == "EU" and continent_of("FJ") == "OC" and continent_of("BR") == "SA"
    assert continent_of("ZZ") == ""


def test_breakdown_counts_and_pools_small_countries() -> None:
    points = [PARIS] * 12 + [GENEVA] * 3 + [MID_PACIFIC] * 2
    truth = _labels(points)
    errors = np.array([10.0] * 6 + [1000.0] * 6 + [3000.0] * 3 + [100.0] * 2)
    hit = np.array([True] * 12 + [False] * 5)
    block = breakdown(truth, errors, hit, min_photos=10)
    countries = {r["code"]: r for r in block["countries"]}
    assert [r["code"] for r in block["countries"]] == ["FR", "CH", "unlabelled"]
    fr = countries["FR"]
    assert fr["photos"] == 12 and fr["accuracy"]["25"] == 0.5 and fr["accuracy"]["750"] == 0.5
    assert fr["accuracy"]["2500"] == 1.0 and fr["country_accuracy"] == 1.0 and fr["median_km"] == 505.0
    assert countries["CH"]["country_accuracy"] == 0.0 and countries["unlabelled"]["country_accuracy"] is None
    assert [(r["code"], r["photos"]) for r in block["countries_pooled"]] == [("FR", 12), ("other", 5)]
    assert {r["code"]: r["photos"] for r in block["continents"]} == {"EU": 15, "unlabelled": 2}
    rows = list(csv.reader(io.StringIO(breakdown_csv(block))))
    assert rows[0] == BREAKDOWN_COLUMNS and len(rows) == 1 + 2 + 3
    assert rows[1][:4] == ["continent", "EU", "Europe", "15"] and rows[3][:4] == ["country", "FR", "France", "12"]
    text = format_breakdown(block)
    assert "other" in text and "Switzerland" not in text and "France" in text


def test_antimeridian_segments_split() -> None:
    segs, idx = antimeridian_segments([0.0, 0.0], [179.0, 10.0], [10.0, 5.0], [-179.0, 20.0])
    assert idx.tolist() == [0, 1, 0]
    assert segs[0].tolist() == [[179.0, 0.0], [180.0, 5.0]] and segs[2].tolist() == [[-180.0, 5.0], [-179.0, 10.0]]
    assert segs[1].tolist() == [[10.0, 0.0], [20.0, 5.0]]


def test_errors_map_is_written(tmp_path) -> None:
    assert len(outline_arcs()) > 100  # the bundled Natural Earth outlines are found
    path = tmp_path / "errors_map.png"
    plot_errors_map(
        [48.8, -16.8, 0.0], [2.3, 179.9, -140.0], [50.0, -16.8, 5.0], [8.0, -179.9, -150.0], ["FR", "FJ", ""], path
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def _prediction(image: str, lat: float, lon: float) -> Prediction:
    return Prediction(image, lat, lon, 0.5, "swc", "89c25", 0.25, [])


def test_evaluation_writes_geoscore_admin_breakdown_and_map(tmp_path) -> None:
    truth = [STRASBOURG, GENEVA, PARIS, MID_PACIFIC]
    estimate = [KEHL, ANNEMASSE, VERSAILLES, MID_PACIFIC]
    names = [f"{i}.jpg" for i in range(4)]
    lat, lon = np.array([p[0] for p in truth]), np.array([p[1] for p in truth])
    results = [
        MethodResult("swc", names, lat, lon, [_prediction(n, *p) for n, p in zip(names, estimate, strict=True)]),
        MethodResult(
            "classification", names, lat, lon, [_prediction(n, *p) for n, p in zip(names, truth, strict=True)]
        ),
    ]
    metrics = write_evaluation(tmp_path / "ev", Geolocator.load(), results, [], {"title": "tiny"})
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["admin_labels"].startswith("nearest GeoNames place") and "denominators" in saved["admin_note"]
    assert saved["admin"] == {
        "country": 1 / 3,
        "admin1": 1 / 3,
        "admin2": 0.0,
        "city": 0.0,
        "labelled": 3,
        "unlabelled": 1,
    }
    assert saved["methods"]["classification"]["admin"]["city"] == 1.0
    assert saved["methods"]["classification"]["geoscore"] == {"mean": 5000.0, "median": 5000.0}
    assert 0 < saved["geoscore"]["mean"] < 5000 and saved["geoscore"] == metrics["geoscore"]
    assert {r["code"] for r in saved["breakdown"]["countries"]} == {"FR", "CH", "unlabelled"}
    assert (tmp_path / "ev" / "breakdown.csv").read_text().startswith(",".join(BREAKDOWN_COLUMNS))
    assert (tmp_path / "ev" / "errors_map.png").stat().st_size > 10_000
    text = format_metrics(saved)
    assert "GeoScore" in text and "same country" in text and "1 unlabelled" in text and "by country" in text


GEO_HEADER = "img_id,gt_lat,predicted_lat,gt_long,predicted_long"  # no distance column: recomputed


def test_compare_has_country_accuracy_and_geoscore_with_intervals(tmp_path) -> None:
    truth = [STRASBOURG, GENEVA, PARIS, VANUA_LEVU_EAST, MID_PACIFIC]
    a_est = [STRASBOURG, GENEVA, PARIS, TAVEUNI_EAST, MID_PACIFIC]  # all right
    b_est = [KEHL, ANNEMASSE, VERSAILLES, TAVEUNI_EAST, (0.0, 0.0)]  # two countries wrong
    files = []
    for name, est in (("a", a_est), ("b", b_est)):
        rows = "".join(
            f"{i}.jpg,{t[0]},{e[0]},{t[1]},{e[1]}\n" for i, (t, e) in enumerate(zip(truth, est, strict=True))
        )
        (tmp_path / f"{name}.csv").write_text(GEO_HEADER + "\n" + rows)
        files.append(read_system(tmp_path / f"{name}.csv"))
    result = compare_systems(files, resamples=200, seed=0)
    a, b = result["systems"]
    assert result["labelled"] == 4 and result["unlabelled"] == 1
    assert a["admin"]["country"] == 1.0 and b["admin"]["country"] == 0.5
    assert a["admin_diff_ci"]["country"] == [0.0, 0.0]
    lo, hi = b["admin_diff_ci"]["country"]
    assert -1.0 <= lo <= -0.5 <= hi <= 0.0
    assert 4990 < a["geoscore"]["mean"] < 5000.0 and b["geoscore"]["mean"] < 4000.0  # b: one estimate 3,300 km off
    assert a["geoscore_diff_ci"] == [0.0, 0.0] and b["geoscore_diff_ci"][1] < 0
    md = markdown(result)
    assert "| country | GeoScore |" in md and "GeoScore (points)" in md
    assert "| b | 5 | 0 |" in md and "| 50.0 |" in md and "-50.0 [" in md
    write_comparison(tmp_path / "out", files, resamples=50)
    with Image.open(tmp_path / "out" / "errors_maps.png") as im:  # one map of errors per system, side by side
        assert im.size[0] > im.size[1] >= 400
