"""Scaling-law fits on synthetic curves with known parameters; envelopes, ranking, crossings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from studies.scaling import (
    ScalingPoint,
    crossings,
    family_envelope,
    fit_power_law,
    frontier,
    scaling_report,
)


def law(E, A, alpha):
    return lambda c: E + A * np.asarray(c, dtype=float) ** -alpha


@pytest.mark.parametrize(("E", "A", "alpha"), [
    (1.7, 400.0, 0.3), (0.0, 50.0, 0.1), (2.5, 1e5, 0.5), (0.5, 3.0, 0.05), (3.0, 2e3, 0.34),
])
@pytest.mark.parametrize("budgets", [(1e11, 3e11, 1e12), tuple(np.geomspace(1e9, 1e13, 6))])
def test_recovers_known_parameters(E, A, alpha, budgets):
    fit = fit_power_law(budgets, law(E, A, alpha)(budgets))
    assert fit.E == pytest.approx(E, rel=1e-6, abs=1e-9)
    assert fit.A == pytest.approx(A, rel=1e-5)
    assert fit.alpha == pytest.approx(alpha, rel=1e-6)
    assert fit.rmse_log < 1e-9 and fit.max_rel_err < 1e-9
    assert fit.n == len(budgets) and fit.budgets == (min(budgets), max(budgets))
    if len(budgets) > 3:
        assert fit.holdout_rel_err < 1e-6
    else:
        assert fit.holdout_rel_err is None
    assert fit.predict(1e15) == pytest.approx(law(E, A, alpha)(1e15), rel=1e-6)


def test_noisy_points_report_an_error_of_the_noise_size():
    rng = np.random.default_rng(0)
    budgets = np.repeat(np.geomspace(1e10, 1e13, 7), 3)  # three seeds per budget
    noise = 0.01
    losses = law(1.5, 300.0, 0.25)(budgets) * np.exp(rng.normal(0, noise, budgets.size))
    fit = fit_power_law(budgets, losses)
    assert 0.5 * noise < fit.rmse_log < 1.5 * noise
    assert fit.predict(1e12) == pytest.approx(law(1.5, 300.0, 0.25)(1e12), rel=0.01)
    assert fit.holdout_rel_err is not None and fit.holdout_rel_err < 0.05


def test_too_few_budgets_and_bad_points_are_refused():
    with pytest.raises(ValueError, match=r"needs losses at >= 3 distinct budgets, got 2"):
        fit_power_law([1e11, 1e11, 3e11], [3.0, 2.9, 2.5])
    with pytest.raises(ValueError, match=r">= 3 distinct budgets, got 2"):
        fit_power_law([1e11, 3e11, 1e12], [3.0, 2.5, math.nan])


def test_family_envelope_is_the_least_loss_per_budget():
    pts = [ScalingPoint(0, "mlr", 1e11, 3.0), ScalingPoint(1, "mlr", 1e11, 2.8),
           ScalingPoint(1, "mlr", 3e11, 2.5), ScalingPoint(2, "dense", 1e11, 2.9),
           ScalingPoint(3, "mlr", 3e11, math.nan)]
    assert family_envelope(pts) == {"dense": [(1e11, 2.9)], "mlr": [(1e11, 2.8), (3e11, 2.5)]}


def test_crossing_of_two_known_curves():
    # 1 + 10 C^-0.1 = 1 + 1000 C^-0.3  at  C = (1000 / 10) ** (1 / 0.2) = 1e10
    budgets = np.geomspace(1e8, 1e12, 5)
    fits = {"fast": fit_power_law(budgets, law(1.0, 1000.0, 0.3)(budgets)),
            "slow": fit_power_law(budgets, law(1.0, 10.0, 0.1)(budgets))}
    (x,) = crossings(fits, 1e6, 1e15)
    assert x["budget"] == pytest.approx(1e10, rel=1e-6)
    assert x["loss"] == pytest.approx(1.0 + 10.0 * 1e10 ** -0.1, rel=1e-8)
    assert (x["below"], x["above"]) == ("slow", "fast")
    assert crossings(fits, 1e11, 1e15) == []
    front = frontier(fits, [1e9, 1e11])
    assert [f["name"] for f in front] == ["slow", "fast"]


def test_report_ranks_structures_at_a_target_and_finds_where_families_cross():
    """Family "mlr" leads at small budgets and "dense" at large ones (as in the text evidence,
    where MLR led at 1e12 and lost its lead at 3e12)."""
    budgets = [1e11, 3e11, 1e12, 3e12]
    curves = {("a", "mlr"): law(2.0, 60.0, 0.15), ("b", "mlr"): law(2.1, 80.0, 0.15),
              ("c", "dense"): law(1.5, 6e3, 0.3), ("d", "dense"): law(1.6, 6e3, 0.3)}
    pts = [ScalingPoint(k, fam, b, float(f(b))) for (k, fam), f in curves.items()
           for b in budgets]
    pts.append(ScalingPoint("e", "mlr", 1e11, 3.5))  # one rung only: skipped
    report = scaling_report(pts, target=1e15)
    assert [c.name for c in report.architectures] == ["a", "b", "c", "d"]
    assert [c.name for c in report.families] == ["dense", "mlr"]
    assert report.skipped == ({"name": "e", "family": "mlr", "budgets": 1},)
    assert report.best["name"] == "c" and report.best["family"] == "dense"
    assert report.best["predicted_loss"] == pytest.approx(float(curves["c", "dense"](1e15)),
                                                          rel=1e-5)
    assert report.best["extrapolation"] == pytest.approx(1e15 / 3e12)
    # the family curves are the envelopes a and c: 2 + 60 C^-.15 = 1.5 + 6e3 C^-.3 at the crossing
    (x,) = report.crossings
    c = x["budget"]
    assert 2.0 + 60.0 * c ** -0.15 == pytest.approx(1.5 + 6e3 * c ** -0.3, rel=1e-6)
    assert (x["below"], x["above"]) == ("mlr", "dense") and 1e11 < c < 1e15
    data = report.to_dict()
    assert data["best"]["name"] == "c" and len(data["families"]) == 2
