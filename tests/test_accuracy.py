"""The one accuracy module: scores with unified edge cases, the report's per-class intervals, and
Olofsson et al. (2014)'s area-weighted estimator on the paper's own numerical example."""

import math

import numpy as np
import pytest

from sitsflow.accuracy import area_weighted, confusion, evaluate, scores, wilson


def test_empty_matrix_has_nan_scores():
    got = scores(np.zeros((3, 3)))
    assert all(math.isnan(v) for v in got.values())


def test_single_class_and_perfect_agreement():
    single = scores(np.array([[7]]))
    assert single["oa"] == 1.0 and single["kappa"] == 1.0 and single["fscore"] == 1.0
    perfect = scores(np.diag([3, 4, 5]))
    assert perfect["oa"] == 1.0 and perfect["kappa"] == 1.0
    assert perfect["fscore"] == 1.0 and perfect["fscore_weighted"] == 1.0
    # the report's path agrees: codes in, the same measures out
    r = evaluate(np.array([2, 2, 2]), np.array([2, 2, 2]), {2: "forest"})
    assert r["overall_accuracy"] == 1.0 and r["kappa"] == 1.0 and r["fscore_macro"] == 1.0


def test_absent_class_is_not_averaged_and_never_predicted_scores_zero():
    cm = np.array([[5, 1, 0], [2, 2, 0], [0, 0, 0]])  # class 3 nowhere; class 2 half right
    got = scores(cm)
    f1, f2 = 2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6), 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)
    assert got["fscore"] == pytest.approx((f1 + f2) / 2)
    assert got["fscore_weighted"] == pytest.approx((6 * f1 + 4 * f2) / 10)
    never = scores(np.array([[4, 0], [3, 0]]))  # class 2 is never predicted: precision 0, F 0
    assert never["fscore"] == pytest.approx((2 * (4 / 7) / (4 / 7 + 1)) / 2)


def test_report_leaves_unclassified_out_of_macro_and_gives_wilson_intervals():
    labels = np.array([1, 1, 1, 1, 2, 2])
    preds = np.array([1, 1, 1, 0, 2, 1])
    r = evaluate(labels, preds, {1: "a", 2: "b"})
    assert r["classes"] == [0, 1, 2]
    f1, f2 = 2 * 0.75 * 0.75 / 1.5, 2 * 1.0 * 0.5 / 1.5
    assert r["fscore_macro"] == pytest.approx((f1 + f2) / 2)
    assert r["fscore_weighted"] == pytest.approx((4 * f1 + 2 * f2) / 6)
    lo, hi = r["per_class"]["1"]["producers_accuracy_ci95"]
    # Wilson score interval of 3/4 (z = 1.96): 0.3006 .. 0.9544
    assert (lo, hi) == pytest.approx((0.3006, 0.9544), abs=5e-4)
    assert r["per_class"]["1"]["users_accuracy_ci95"] == pytest.approx(list(wilson(3, 4)))
    assert wilson(0, 0) != wilson(0, 0)  # NaN: no sample, no interval
    assert r["per_class"]["0"]["users_accuracy_ci95"] == [None, None] or r["per_class"]["0"]["predicted_samples"]


# Olofsson et al. (2014), section 5 (Tables 8-10): four map classes (1 deforestation, 2 forest gain,
# 3 stable forest, 4 stable non-forest) on 10,000,000 Landsat pixels (0.09 ha each); sample counts
# n_ij with rows = map class, columns = reference class.
OLOFSSON_N = np.array([[66, 0, 5, 4], [0, 55, 8, 12], [1, 0, 153, 11], [2, 1, 9, 313]])
OLOFSSON_MAP_PIXELS = {1: 200_000, 2: 150_000, 3: 3_200_000, 4: 6_450_000}


def test_area_weighted_estimates_reproduce_olofsson_2014_example():
    cm = OLOFSSON_N.T  # sitsflow's matrices have reference rows
    got = area_weighted(cm, [1, 2, 3, 4], OLOFSSON_MAP_PIXELS, pixel_area=0.09)
    oa = got["overall_accuracy"]
    # the paper: overall accuracy 0.947 ± 0.018 (eq. 1 and 5, 95 % interval)
    assert oa["estimate"] == pytest.approx(0.9465, abs=5e-4) and oa["ci95"] == pytest.approx(0.018, abs=5e-4)
    pc = got["per_class"]
    # user's accuracies 0.88 ± 0.07, 0.73 ± 0.10, 0.93 ± 0.04, 0.96 ± 0.02 (eq. 2 and 6)
    for code, (ua, ci) in {"1": (0.88, 0.07), "2": (0.73, 0.10), "3": (0.93, 0.04), "4": (0.96, 0.02)}.items():
        assert pc[code]["users_accuracy"]["estimate"] == pytest.approx(ua, abs=0.005)
        assert pc[code]["users_accuracy"]["ci95"] == pytest.approx(ci, abs=0.005)
    # producer's accuracy of deforestation 0.75 ± 0.21 (eq. 3 and 7)
    assert pc["1"]["producers_accuracy"]["estimate"] == pytest.approx(0.75, abs=0.005)
    assert pc["1"]["producers_accuracy"]["ci95"] == pytest.approx(0.21, abs=0.005)
    # forest gain, by hand from eq. 3 and 7: only map class 4 holds omitted gain (1 of 325 samples)
    n2, n4 = 75, 325
    pa = (0.015 * 55 / n2) / (0.015 * 55 / n2 + 0.645 * 1 / n4)
    ua = 55 / n2
    n_ref = 150_000 * 55 / n2 + 6_450_000 * 1 / n4
    var = (150_000**2 * (1 - pa) ** 2 * ua * (1 - ua) / (n2 - 1)
           + pa**2 * 6_450_000**2 * (1 / n4) * (1 - 1 / n4) / (n4 - 1)) / n_ref**2
    assert pc["2"]["producers_accuracy"]["estimate"] == pytest.approx(pa)
    assert pc["2"]["producers_accuracy"]["se"] == pytest.approx(math.sqrt(var))
    # deforestation area 21,158 ± 6,158 ha (eq. 9-11)
    assert pc["1"]["area"]["estimate"] == pytest.approx(21_158, abs=1)
    assert pc["1"]["area"]["ci95"] == pytest.approx(6_158, abs=2)
    # by hand from eq. 4 and 9: p_.1 = 0.02*66/75 + 0.32*1/165 + 0.645*2/325
    assert pc["1"]["area"]["estimate"] == pytest.approx((0.02 * 66 / 75 + 0.32 / 165 + 0.645 * 2 / 325) * 900_000)
    assert got["unsampled"] == [] and got["excluded_samples"] == 0


def test_area_weighted_with_unsampled_map_class_unmapped_reference_class_and_unclassified_samples():
    labels = np.array([1, 1, 1, 2, 2, 2, 1, 4])
    preds = np.array([1, 1, 2, 2, 2, 2, 0, 2])
    classes = [0, 1, 2, 4]
    got = area_weighted(confusion(labels, preds, classes), classes, {1: 50, 2: 50, 3: 10})
    assert got["unsampled"] == [3] and got["excluded_samples"] == 1 and got["strata"] == [1, 2]
    # W = 0.5, 0.5 over the sampled strata (n_1. = 2, n_2. = 5); OA = 0.5 * 2/2 + 0.5 * 3/5
    assert got["overall_accuracy"]["estimate"] == pytest.approx(0.8)
    # class 4 is never mapped: producer's accuracy 0, its area is estimated from map class 2's samples
    c4 = got["per_class"]["4"]
    assert c4["map_area"] == 0 and c4["users_accuracy"]["estimate"] is None
    assert c4["producers_accuracy"]["estimate"] == 0.0
    assert c4["area"]["estimate"] == pytest.approx(0.5 * 1 / 5 * 100)
    assert sum(e["area"]["estimate"] for e in got["per_class"].values()) == pytest.approx(100)
