"""The metric code against hand-computed cases: it must reproduce published numbers from predictions."""

import numpy as np
import pytest

from geoswc.core.sphere import EARTH_RADIUS_KM
from geoswc.evaluation.metrics import accuracy_at, errors_km, median_km, summarize

ONE_DEG_KM = np.radians(1.0) * EARTH_RADIUS_KM  # 111.195 km along a meridian


def test_accuracy_hand_computed():
    # Predictions displaced along the meridian by known amounts.
    true_lat = np.zeros(5)
    pred_lat = np.array([0.005, 0.1, 1.0, 5.0, 30.0])  # 0.56, 11.1, 111.2, 556.0, 3335.8 km
    e = errors_km(true_lat, np.zeros(5), pred_lat, np.zeros(5))
    assert e == pytest.approx(pred_lat * ONE_DEG_KM)
    acc = accuracy_at(e)
    assert acc == {"1": 0.2, "25": 0.4, "200": 0.6, "750": 0.8, "2500": 0.8}
    assert median_km(e) == pytest.approx(ONE_DEG_KM)


def test_threshold_is_inclusive_and_keys_are_the_literature_s():
    acc = accuracy_at([25.0, 25.0001, 0.0, 2500.0])
    assert list(acc) == ["1", "25", "200", "750", "2500"]
    assert acc["1"] == 0.25 and acc["25"] == 0.5 and acc["2500"] == 1.0


def test_published_style_example():
    # 10 photos; errors chosen so the expected table is easy to verify by hand.
    e = [0.3, 0.9, 12, 24, 150, 600, 700, 1800, 5000, 12000]
    s = summarize(e)
    assert s["n"] == 10
    assert s["accuracy"] == {"1": 0.2, "25": 0.4, "200": 0.5, "750": 0.7, "2500": 0.8}
    assert s["median_km"] == pytest.approx((150 + 600) / 2)  # 5th and 6th of the sorted ten


def test_empty():
    assert accuracy_at([]) == {"1": 0.0, "25": 0.0, "200": 0.0, "750": 0.0, "2500": 0.0}
    assert np.isnan(median_km([]))
