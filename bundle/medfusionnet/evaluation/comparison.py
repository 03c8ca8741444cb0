"""Rank statistics for comparing several models over the same blocks (seeds x findings, or folds), following
Demšar (2006), "Statistical comparisons of classifiers over multiple data sets", JMLR 7:1-30: the Friedman test on
the ranks, the Nemenyi critical difference of mean ranks, and pairwise Wilcoxon signed-rank tests with Holm's
step-down correction.

``scores`` is always a ``(blocks, models)`` array in which higher is better; rank 1 is the best model of a block,
tied models share the mean of their ranks.
"""

from __future__ import annotations

import logging
from itertools import combinations
from typing import Sequence

import numpy as np
from scipy import stats

logger = logging.getLogger(__name__)


def complete_blocks(scores: np.ndarray) -> np.ndarray:
    """The rows of ``scores`` with a value for every model (a finding without positives in a test set has no AUC);
    the number dropped is logged."""
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (blocks, models); got shape {scores.shape}")
    keep = np.isfinite(scores).all(axis=1)
    if (~keep).any():
        logger.warning("%d of %d blocks left out: a model has no score there", int((~keep).sum()), len(scores))
    return scores[keep]


def ranks(scores: np.ndarray) -> np.ndarray:
    """Rank of each model within each block, 1 = highest score, ties averaged: ``(blocks, models)``."""
    return np.apply_along_axis(lambda row: stats.rankdata(-row), 1, np.asarray(scores, dtype=float))


def friedman_test(scores: np.ndarray, names: Sequence[str]) -> dict:
    """Friedman's chi-square test that all models rank alike, with the mean rank and rank sum of each model.

    Raises:
        ValueError: with fewer than 3 models or 2 complete blocks (the test is undefined).
    """
    scores = complete_blocks(scores)
    n, k = scores.shape
    if k != len(names):
        raise ValueError(f"{k} score columns but {len(names)} model names")
    if k < 3 or n < 2:
        raise ValueError(f"the Friedman test needs at least 3 models and 2 complete blocks; got {k} and {n}")
    r = ranks(scores)
    statistic, p_value = stats.friedmanchisquare(*scores.T)
    return {
        "blocks": int(n),
        "models": list(names),
        "statistic": float(statistic),
        "p_value": float(p_value),
        "mean_ranks": dict(zip(names, r.mean(axis=0).tolist())),
        "rank_sums": dict(zip(names, r.sum(axis=0).tolist())),
    }


def nemenyi_critical_difference(num_models: int, num_blocks: int, alpha: float = 0.05) -> float:
    """The difference of mean ranks above which two of ``num_models`` models differ (Nemenyi test):
    ``q_alpha * sqrt(k (k + 1) / (6 N))``, with ``q_alpha`` the studentized range quantile over sqrt(2)."""
    q = stats.studentized_range.ppf(1 - alpha, num_models, np.inf) / np.sqrt(2)
    return float(q * np.sqrt(num_models * (num_models + 1) / (6.0 * num_blocks)))


def nemenyi_pairs(mean_ranks: dict, num_blocks: int, alpha: float = 0.05) -> dict:
    """Every pair of models with its mean-rank difference and whether it exceeds the critical difference."""
    cd = nemenyi_critical_difference(len(mean_ranks), num_blocks, alpha)
    pairs = [
        {
            "a": a,
            "b": b,
            "rank_difference": abs(mean_ranks[a] - mean_ranks[b]),
            "significant": bool(abs(mean_ranks[a] - mean_ranks[b]) > cd),
        }
        for a, b in combinations(mean_ranks, 2)
    ]
    return {"alpha": alpha, "critical_difference": cd, "pairs": pairs}


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (monotone, capped at 1), in the order given."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.maximum.accumulate(np.minimum((m - np.arange(m)) * p[order], 1.0))
    out = np.empty(m)
    out[order] = adjusted
    return out


def wilcoxon_holm(scores: np.ndarray, names: Sequence[str], alpha: float = 0.05) -> list[dict]:
    """Two-sided Wilcoxon signed-rank test for every pair of models over the blocks, Holm-adjusted."""
    scores = complete_blocks(scores)
    pairs = list(combinations(range(len(names)), 2))
    raw = []
    for i, j in pairs:
        diff = scores[:, i] - scores[:, j]
        raw.append(1.0 if np.allclose(diff, 0) else float(stats.wilcoxon(scores[:, i], scores[:, j]).pvalue))
    adjusted = holm(raw)
    return [
        {
            "a": names[i],
            "b": names[j],
            "p_value": p,
            "p_holm": float(q),
            "significant": bool(q < alpha),
            "median_difference": float(np.median(scores[:, i] - scores[:, j])),
        }
        for (i, j), p, q in zip(pairs, raw, adjusted)
    ]


def rank_statistics(scores: np.ndarray, names: Sequence[str], alpha: float = 0.05) -> dict:
    """The comparison of ``names`` over the blocks of ``scores``: ``friedman`` and ``nemenyi`` with 3 or more models,
    ``wilcoxon_holm`` with 2 or more (a test that needs more models is left out, with a log line)."""
    scores = np.asarray(scores, dtype=float)
    stats_: dict = {}
    if len(names) >= 3:
        stats_["friedman"] = friedman_test(scores, names)
        stats_["nemenyi"] = nemenyi_pairs(stats_["friedman"]["mean_ranks"], stats_["friedman"]["blocks"], alpha)
    else:
        logger.warning("the Friedman test needs 3 or more models; pairwise tests only")
    if len(names) >= 2:
        stats_["wilcoxon_holm"] = wilcoxon_holm(scores, names, alpha)
    return stats_


def rank_lines(stats_: dict, blocks: str) -> list[str]:
    """Markdown lines for `rank_statistics`: the Friedman result and, per pair, the Nemenyi verdict and the
    Holm-adjusted Wilcoxon p (``*`` where it is below alpha); ``blocks`` says what a block is."""
    lines: list[str] = []
    if "friedman" in stats_:
        f, n = stats_["friedman"], stats_["nemenyi"]
        lines += [
            f"Friedman test over {f['blocks']} blocks ({blocks}): chi2 = {f['statistic']:.3f}, "
            f"p = {f['p_value']:.3g}. Nemenyi critical difference of mean ranks at alpha "
            f"{n['alpha']}: {n['critical_difference']:.3f}.",
            "",
            "| pair | rank difference | Nemenyi | Wilcoxon p (Holm) |",
            "|---|---|---|---|",
        ]
        wilcoxon = {(p["a"], p["b"]): p for p in stats_["wilcoxon_holm"]}
        for p in n["pairs"]:
            w = wilcoxon[p["a"], p["b"]]
            lines.append(
                f"| {p['a']} vs {p['b']} | {p['rank_difference']:.3f} | "
                f"{'differ' if p['significant'] else 'n.s.'} | {w['p_holm']:.3g}"
                f"{' *' if w['significant'] else ''} |"
            )
    elif "wilcoxon_holm" in stats_:
        lines += [f"Wilcoxon signed-rank test over {blocks}:", "", "| pair | Wilcoxon p (Holm) |", "|---|---|"]
        lines += [
            f"| {w['a']} vs {w['b']} | {w['p_holm']:.3g}{' *' if w['significant'] else ''} |"
            for w in stats_["wilcoxon_holm"]
        ]
    return lines


def plot_mean_ranks(stats_: dict, path: str, title: str | None = None) -> None:
    """A PNG of each model's mean rank (best first) with bars spanning the Nemenyi critical difference."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    ranks_ = stats_["friedman"]["mean_ranks"]
    cd = stats_["nemenyi"]["critical_difference"]
    order = sorted(ranks_, key=ranks_.get)
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(order)))
    ax.errorbar([ranks_[m] for m in order], range(len(order)), xerr=cd / 2, fmt="o", capsize=4)
    ax.set_yticks(range(len(order)), order)
    ax.invert_yaxis()
    ax.set_xlabel(f"mean rank (1 = best); bars span the Nemenyi CD = {cd:.2f}")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
