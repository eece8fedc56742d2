"""Significance of each Table IV cell (pair type × direction, and Total).

Per cell, first what respects that one subject's answers are related (a subject's answers
lean the same way: counted as independent they overstate the evidence), then what does not:
- counts: `n_answers`, `n_subjects`, `preferred`;
- `subject_ci_low/high`: an interval of the pooled share with the answers clustered by subject
  (`subject_interval`);
- `wilcoxon_p`: two-sided Wilcoxon signed-rank test of the per-subject preferences against 50%
  (`wilcoxon_test`: exact given the ties; subjects at exactly 50% drop out, as in Wilcoxon's
  original test);
- `binom_p`: two-sided exact binomial test of the pooled answers against 50%
  (scipy.stats.binomtest), with its Clopper–Pearson interval `binom_ci_low/high`, which count
  every answer as independent: right only where subjects do not differ (an audit's simulated
  studies, 30 subjects whose log-odds spread 0.8: a true 50% rejected in 25% of them at 5%,
  its "95%" interval covering 73-79%; `subject_ci` 96%, Wilcoxon 4.5%).
All shares are in percent. Both tests treat the study's query items as fixed; the mixed model
(`analysis.mixed`) lets items differ too.

Multiple comparisons: a table tests many cells at once (each pair type in V2M, M2V and Total),
so each raw p-value has a Holm-adjusted one next to it, `binom_p_holm` and `wilcoxon_p_holm`
(Holm's step-down method, which controls the family-wise error rate under any dependence
between the tests, as between a Total cell and its two directions). The family is every cell
of the table that has a p-value for that test; cells without one (no answers; every subject at
exactly 50% for Wilcoxon) are not tested and get no adjusted value. Compare `wilcoxon_p_holm`
with the plain level (say 0.05) to claim a cell differs from 50% while testing them all.
"""

import numpy as np
import pandas as pd
from scipy import stats

from .preference import COLUMNS, ordered_pair_types, subject_preferences, takes_answers

STAT_COLUMNS = [
    "n_answers",
    "n_subjects",
    "preferred",
    "percent",
    "subject_ci_low",
    "subject_ci_high",
    "subject_median",
    "wilcoxon_stat",
    "wilcoxon_p",
    "wilcoxon_p_holm",
    "binom_p",
    "binom_p_holm",
    "binom_ci_low",
    "binom_ci_high",
]
# Up to this many subjects Wilcoxon's p-value is exact (the sums of 2^n sign flips, counted
# in n · n(n + 1) steps); beyond, the normal approximation is as good as exact.
EXACT_WILCOXON_MAX = 200


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values; NaN (a test not made) stays NaN
    and is not counted in the family.

    Computed as statsmodels' multipletests(method="holm") computes it, to the bit, without
    the full garbage collection it runs each time (0.1-0.6 s in a web server's process)."""
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(p.shape, np.nan)
    tested = ~np.isnan(p)
    if tested.any():
        family = p[tested]
        order = np.argsort(family)
        stepped = np.maximum.accumulate(family[order] * np.arange(len(family), 0, -1))
        stepped[stepped > 1] = 1
        adjusted[np.flatnonzero(tested)[order]] = stepped
    return adjusted


def subject_interval(preferred, n, confidence=0.95) -> tuple[float, float]:
    """Interval (%) of the pooled share sum(preferred) / sum(n) of k ≥ 2 subjects' answers.

    Answers of one subject are related, so they count for fewer independent ones: Wilson's
    interval on the effective number of answers (Kish's design effect, from the
    cluster-robust CR1 variance of the pooled share over subjects, at least 1), with the
    t quantile of k − 1 degrees of freedom in place of the normal one (Korn and Graubard's
    adjustment for few clusters). It stays within 0–100 and is never of zero width.

    Why not a bootstrap over subjects: simulated studies (20 answers a subject, subjects'
    true shares Beta-distributed around 50–75% with a spread of 5–25 points) found the
    percentile bootstrap covering 86–88% at 6 subjects and 91–92% at 12 for a nominal 95%
    (BCa 0.5–2 points better, and undefined when all subjects agree), this interval 94–99%
    and 94–97% (Student's t on the subjects' shares 93–95% and 94–95%).
    """
    preferred, n = np.asarray(preferred, dtype=np.float64), np.asarray(n, dtype=np.float64)
    k, total = len(n), n.sum()
    share = preferred.sum() / total
    between = k / (k - 1) * np.sum((preferred - share * n) ** 2) / total**2
    binomial = share * (1 - share) / total
    effective = total / max(1.0, between / binomial) if binomial > 0 else total
    t = stats.t.ppf(0.5 + confidence / 2, k - 1)
    # Wilson's interval with t for the normal quantile. (statsmodels' takes a level, and the
    # level whose normal quantile is t underflows to 0 beyond t ≈ 38: 99% with 2 subjects.)
    shrink = 1 + t * t / effective
    centre = (share + t * t / (2 * effective)) / shrink
    half = t / shrink * np.sqrt(share * (1 - share) / effective + t * t / (4 * effective**2))
    low = 0.0 if share == 0 else max(0.0, centre - half)  # exact at the ends, not rounded
    high = 1.0 if share == 1 else min(1.0, centre + half)
    return 100.0 * low, 100.0 * high


def wilcoxon_test(differences) -> tuple[float, float]:
    """Wilcoxon's signed-rank test of non-zero `differences` against 0, two-sided:
    (min(T+, T−), p), with mid-ranks for ties.

    p is exact given the ties: the distribution of T+ over all 2^n sign flips, mid-ranks
    doubled to whole numbers. Subjects' shares tie nearly always (20 answers a cell take 21
    values), and scipy then uses its normal approximation without a continuity correction
    from 14 subjects on: up to 0.06 from the exact p. Beyond EXACT_WILCOXON_MAX differences,
    scipy's approximation with tie and continuity corrections.
    """
    d = np.asarray(differences, dtype=np.float64)
    ranks = stats.rankdata(np.abs(d))
    plus = float(ranks[d > 0].sum())
    statistic = min(plus, float(ranks.sum()) - plus)
    if len(d) > EXACT_WILCOXON_MAX:
        return statistic, float(stats.wilcoxon(d, correction=True, method="approx").pvalue)
    doubled = np.rint(2 * ranks).astype(np.int64)
    chances = np.zeros(doubled.sum() + 1)  # of each doubled T+
    chances[0] = 1.0
    for rank in doubled:  # positive or negative, each with chance 1/2
        flipped = np.zeros_like(chances)
        flipped[rank:] = chances[:-rank]
        chances = 0.5 * (chances + flipped)
    t = int(round(2 * plus))
    return statistic, float(min(1.0, 2 * min(chances[: t + 1].sum(), chances[t:].sum())))


def cell_test(subjects: pd.DataFrame, confidence=0.95) -> dict:
    """The statistics of one cell from its per-subject rows (`n`, `preferred`, `preference`)."""
    n_answers, preferred = int(subjects["n"].sum()), int(subjects["preferred"].sum())
    out = dict.fromkeys(STAT_COLUMNS, np.nan)
    out.update(n_answers=n_answers, n_subjects=len(subjects), preferred=preferred)
    if n_answers == 0:
        return out
    binom = stats.binomtest(preferred, n_answers, 0.5)
    ci = binom.proportion_ci(confidence, method="exact")
    out.update(
        percent=100.0 * preferred / n_answers,
        binom_p=binom.pvalue,
        binom_ci_low=100.0 * ci.low,
        binom_ci_high=100.0 * ci.high,
        subject_median=float(subjects["preference"].median()),
    )
    # Rounded: 100·2/3 − 50 and 50 − 100·1/3 differ in the last bit, and Wilcoxon's ranks
    # must see such mirror-image shares as the ties they are.
    differences = np.round(subjects["preference"].to_numpy() - 50.0, 9)
    if np.count_nonzero(differences):
        w = wilcoxon_test(differences[differences != 0])
        out["wilcoxon_stat"], out["wilcoxon_p"] = w
    if len(subjects) >= 2:  # one subject: how subjects differ is unknown
        out["subject_ci_low"], out["subject_ci_high"] = subject_interval(
            subjects["preferred"], subjects["n"], confidence
        )
    return out


@takes_answers
def cell_statistics(d: pd.DataFrame, confidence=0.95, pair_types=None) -> pd.DataFrame:
    """One row per pair type × direction (V2M, M2V, Total), columns STAT_COLUMNS; the `_holm`
    columns adjust the p-values over this table's tested cells."""
    subjects = subject_preferences.of_answers(d, with_total=True)
    if pair_types is None:
        pair_types = ordered_pair_types(d["pair_type"].unique())
    rows = {}
    for pair_type in pair_types:
        for direction in COLUMNS:
            cell = subjects[
                (subjects["pair_type"] == pair_type) & (subjects["direction"] == direction)
            ]
            rows[(pair_type, direction)] = cell_test(cell, confidence)
    index = pd.MultiIndex.from_tuples(rows, names=["pair_type", "direction"])
    table = pd.DataFrame(list(rows.values()), index=index, columns=STAT_COLUMNS)
    for test in ("binom", "wilcoxon"):
        table[f"{test}_p_holm"] = holm(table[f"{test}_p"].to_numpy(dtype=np.float64))
    return table
