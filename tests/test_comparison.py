"""Rank statistics of the comparison study, against values worked out by hand and Demšar's (2006) tables."""

import math

import numpy as np
import pytest

from medfusionnet.evaluation.comparison import (
    complete_blocks,
    friedman_test,
    holm,
    nemenyi_critical_difference,
    nemenyi_pairs,
    ranks,
    wilcoxon_holm,
)


def test_ranks_best_first_with_ties_averaged():
    np.testing.assert_array_equal(ranks(np.array([[0.9, 0.8, 0.8], [0.1, 0.3, 0.2]])), [[1, 2.5, 2.5], [3, 1, 2]])


def test_friedman_by_hand():
    # A beats B beats C in all 4 blocks: mean ranks 1, 2, 3;
    # chi2 = 12 N / (k (k + 1)) * sum(R_j^2) - 3 N (k + 1) = 4 * 14 - 48 = 8; p = exp(-8 / 2) for 2 degrees of freedom
    scores = np.array([[0.9, 0.8, 0.7], [0.8, 0.7, 0.6], [0.95, 0.9, 0.5], [0.7, 0.65, 0.6]])
    result = friedman_test(scores, ["A", "B", "C"])
    assert result["statistic"] == pytest.approx(8.0) and result["p_value"] == pytest.approx(math.exp(-4))
    assert result["mean_ranks"] == {"A": 1.0, "B": 2.0, "C": 3.0} and result["rank_sums"]["C"] == 12.0
    with pytest.raises(ValueError, match="at least 3 models"):
        friedman_test(scores[:, :2], ["A", "B"])


@pytest.mark.parametrize("k, q", [(3, 2.343), (4, 2.569), (5, 2.728), (10, 3.164)])
def test_nemenyi_critical_values_match_demsar_table(k, q):
    # CD = q_0.05 sqrt(k (k + 1) / (6 N)); with N = k (k + 1) / 6 the square root is 1
    assert nemenyi_critical_difference(k, k * (k + 1) / 6) == pytest.approx(q, abs=1e-3)


def test_nemenyi_pairs_against_the_critical_difference():
    result = nemenyi_pairs({"A": 1.0, "B": 2.0, "C": 3.0}, num_blocks=4)
    assert result["critical_difference"] == pytest.approx(2.343 * math.sqrt(12 / 24), abs=1e-3)  # 1.657
    significant = {(p["a"], p["b"]): p["significant"] for p in result["pairs"]}
    assert significant == {("A", "B"): False, ("A", "C"): True, ("B", "C"): False}


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, 0.04, made monotone -> 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])


def test_wilcoxon_holm_pairs():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.8, size=30)
    scores = np.stack([base + 0.1, base + rng.normal(0, 0.01, 30), base], axis=1)
    pairs = {(p["a"], p["b"]): p for p in wilcoxon_holm(scores, ["A", "B", "C"])}
    assert pairs["A", "C"]["significant"] and pairs["A", "C"]["median_difference"] == pytest.approx(0.1)
    assert pairs["A", "C"]["p_holm"] >= pairs["A", "C"]["p_value"]
    same = wilcoxon_holm(np.stack([base, base, base + 0.1], axis=1), ["A", "B", "C"])
    assert same[0]["p_value"] == 1.0 and not same[0]["significant"]


def test_incomplete_blocks_are_left_out():
    scores = np.array([[0.9, 0.8, 0.7], [np.nan, 0.7, 0.6], [0.8, 0.9, 0.7]])
    assert complete_blocks(scores).shape == (2, 3)
    assert friedman_test(scores, ["A", "B", "C"])["blocks"] == 2
