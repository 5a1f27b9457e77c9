"""The Python API's parameters are checked where they come in, with errors that name them; one reader keeps
input order whatever the decoding workers do; a result prints on one line. On the embedded model (no data)."""

from __future__ import annotations

import io
import json
import logging
import math

import pytest
from PIL import Image

from geoswc import Geolocator
from geoswc.core.errors import InputError, SettingError
from geoswc.prediction.results import Prediction, PredictionWriter
from geoswc.training.features import cost_estimate

from .conftest import KAUAI, jpeg_bytes


@pytest.fixture(scope="module")
def geo():
    return Geolocator.load()


@pytest.mark.parametrize(
    ("search", "error", "named"),
    [
        ({"k": 5.5}, SettingError, "k must be a whole number, got 5.5"),
        ({"k": "5"}, SettingError, "k must be a whole number, got '5'"),
        ({"k": True}, SettingError, "k must be a whole number"),
        ({"eps_km": "1"}, SettingError, "eps_km must be a number"),
        ({"bogus": 1}, SettingError, "search has no setting 'bogus'; the settings are k, eps_km"),
        ("k=5", TypeError, "search must be a SearchConfig or a dict of its fields"),
        ({"k": 0}, SettingError, "k must be in 1..10000"),
    ],
)
def test_search_settings_are_checked_at_load_naming_the_field(search, error, named):
    with pytest.raises(error, match=named.replace(".", r"\.").replace("(", r"\(")):
        Geolocator.load(search=search)


def test_a_changed_search_setting_is_named_with_its_two_values(caplog):
    with caplog.at_level(logging.WARNING, logger="geoswc"):
        Geolocator.load(search={"k": 5})
    (warning,) = [r.getMessage() for r in caplog.records if "calibrator was fitted" in r.getMessage()]
    assert "(k 10 -> 5)" in warning and "eps_km" not in warning and "{" not in warning


@pytest.mark.parametrize("row", [1.5, "3", True, None])
def test_thumbnail_rows_must_be_row_numbers(geo, row):
    with pytest.raises(TypeError, match="row must be a gallery row number"):
        geo.thumbnail(row)


def test_names_and_batch_sizes_are_checked(geo):
    with pytest.raises(TypeError, match="names must be strings, got 123"):
        geo.locate(KAUAI, name=123)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InputError, match="batch_size must be a positive integer"):
            list(geo.locate_batch([KAUAI], batch_size=bad))


def test_results_come_in_input_order_whatever_the_workers_deliver(geo):
    """Two decoding workers each take every other batch: the reader puts the results back in input order, the
    unreadable ones at their places."""
    photos = [jpeg_bytes((40 + 7 * i, 48), color=(20 * i, 90, 200 - 15 * i)) for i in range(9)]
    photos[4] = b"not a photo"
    names = [f"p{i}" for i in range(9)]
    out = list(geo.locate_batch(photos, names=names, with_place=False, batch_size=2, num_workers=2))
    assert [r.image for r in out] == names
    assert [type(r).__name__ for r in out].count("LocateFailure") == 1 and not isinstance(out[4], Prediction)
    one = list(geo.locate_batch(photos, names=names, with_place=False, batch_size=3))
    assert [(r.image, getattr(r, "lat", None)) for r in one] == [(r.image, getattr(r, "lat", None)) for r in out]


def test_a_pil_image_is_located_as_given(geo):
    (a,) = geo.locate_batch([Image.open(KAUAI).convert("RGB")], with_place=False)
    b = geo.locate(KAUAI, with_place=False)
    assert isinstance(a, Prediction) and a.image == "<image>" and (a.cell, a.lat, a.lon) == (b.cell, b.lat, b.lon)


def test_a_prediction_prints_on_one_line(geo):
    p = geo.locate(KAUAI)
    text = repr(p)
    assert "\n" not in text and len(text) < 250 and text.startswith("Prediction(image=") and "near=" in text
    assert "polygon" not in text and len(str(p.to_dict())) > 10 * len(text)  # the details stay on request


def test_the_cost_of_an_extraction_is_said_in_time():
    assert (
        cost_estimate(6000, 5, 32, 3.2)
        == "features: about 10 min more for 6,000 photos x 5 view(s) (10.0 photos/s on this batch)"
    )
    assert "about 50 s more" in cost_estimate(500, 1, 10, 1.0)
    assert "about 2.8 h more" in cost_estimate(100_000, 1, 10, 1.0)


def test_json_output_is_strict_json_whatever_the_numbers(geo):
    p = geo.locate(KAUAI, with_place=False)
    p.confidence, p.signals["top_similarity"] = math.nan, math.inf
    for fmt in ("jsonl", "geojson"):
        out = io.StringIO()
        with PredictionWriter(out, fmt) as w:
            w.write(p)
        text = out.getvalue()
        assert "NaN" not in text and "Infinity" not in text
        data = json.loads(text, parse_constant=lambda c: pytest.fail(f"wrote {c}"))
        assert data is not None
