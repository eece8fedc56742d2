import itertools

import numpy as np
import pytest
from scipy import stats

from analysis.stats import (
    EXACT_WILCOXON_MAX,
    STAT_COLUMNS,
    cell_statistics,
    subject_interval,
    wilcoxon_test,
)

from .frames import exact_answers

SPEC = {
    (1, "GR", "V2M"): (9, 10),
    (2, "GR", "V2M"): (6, 10),
    (3, "GR", "V2M"): (8, 12),
    (4, "GR", "V2M"): (5, 10),  # exactly 50%: drops out of Wilcoxon's test
    (1, "GR", "M2V"): (4, 10),
    (2, "GR", "M2V"): (7, 10),
    (3, "GR", "M2V"): (10, 10),
}


@pytest.fixture(scope="module")
def table():
    return cell_statistics(exact_answers(SPEC))


def test_counts_and_exact_binomial_match_scipy(table):
    cell = table.loc[("GR", "V2M")]
    assert cell[["n_answers", "n_subjects", "preferred"]].tolist() == [42, 4, 28]
    expected = stats.binomtest(28, 42, 0.5)
    assert cell["binom_p"] == pytest.approx(expected.pvalue, rel=1e-12)
    ci = expected.proportion_ci(0.95, method="exact")
    assert cell[["binom_ci_low", "binom_ci_high"]].tolist() == pytest.approx(
        [100 * ci.low, 100 * ci.high]
    )
    assert cell["percent"] == pytest.approx(100 * 28 / 42)


def test_wilcoxon_of_subject_preferences_matches_scipy(table):
    v2m = np.array([90.0, 60.0, 100 * 8 / 12])  # subject 4 at 50% drops out
    expected = stats.wilcoxon(v2m - 50.0)
    assert table.loc[("GR", "V2M"), "wilcoxon_p"] == pytest.approx(expected.pvalue)
    assert table.loc[("GR", "V2M"), "wilcoxon_stat"] == pytest.approx(expected.statistic)
    assert table.loc[("GR", "V2M"), "subject_median"] == pytest.approx(np.median([*v2m, 50.0]))


def test_total_pools_each_subjects_directions(table):
    total = table.loc[("GR", "Total")]
    assert total[["n_answers", "n_subjects", "preferred"]].tolist() == [72, 4, 49]
    subject_totals = np.array([13 / 20, 13 / 20, 18 / 22, 5 / 10]) * 100 - 50
    assert total["wilcoxon_p"] == pytest.approx(stats.wilcoxon(subject_totals).pvalue)


def wilson_by_hand(preferred, n, confidence=0.95):
    """The interval from its definition: Wilson's formula with the t quantile of k - 1
    degrees of freedom, on the answers divided by the design effect (cluster-robust
    variance of the pooled share over the binomial one, at least 1)."""
    preferred, n = np.asarray(preferred, float), np.asarray(n, float)
    k, total = len(n), n.sum()
    p = preferred.sum() / total
    robust = k / (k - 1) * np.sum((preferred - p * n) ** 2) / total**2
    m = total / max(1.0, robust / (p * (1 - p) / total)) if 0 < p < 1 else total
    c = stats.t.ppf(0.5 + confidence / 2, k - 1)
    centre = (p + c * c / (2 * m)) / (1 + c * c / m)
    half = c / (1 + c * c / m) * np.sqrt(p * (1 - p) / m + c * c / (4 * m * m))
    return [100 * max(0.0, centre - half), 100 * min(1.0, centre + half)]


def test_subject_interval_follows_its_definition_and_brackets_the_share(table):
    m2v = table.loc[("GR", "M2V")]
    expected = wilson_by_hand([4, 7, 10], [10, 10, 10])
    assert [m2v["subject_ci_low"], m2v["subject_ci_high"]] == pytest.approx(expected, rel=1e-9)
    for key in [("GR", "V2M"), ("GR", "M2V"), ("GR", "Total")]:
        cell = table.loc[key]
        assert 0 <= cell["subject_ci_low"] < cell["percent"] < cell["subject_ci_high"] <= 100
    # Subjects this far apart: wider than the binomial interval, which counts every answer.
    assert m2v["subject_ci_high"] - m2v["subject_ci_low"] > (
        m2v["binom_ci_high"] - m2v["binom_ci_low"]
    )


@pytest.mark.parametrize("preferred", [[20, 20, 20], [0, 0], [15, 15, 15, 15]])
def test_subjects_who_all_agree_still_get_an_interval(preferred):
    n = [20] * len(preferred)
    low, high = subject_interval(preferred, n)
    assert [low, high] == pytest.approx(wilson_by_hand(preferred, n), abs=1e-9)
    share = 100 * sum(preferred) / sum(n)
    assert 0 <= low <= share <= high <= 100 and high - low > 5


def test_subject_interval_matches_statsmodels_wilson_and_holds_at_any_level():
    from statsmodels.stats.proportion import proportion_confint

    preferred, n = [4, 7, 10, 6], [10, 10, 10, 12]
    low, high = subject_interval(preferred, n)
    share = sum(preferred) / sum(n)
    robust = (
        4 / 3 * sum((p - share * m) ** 2 for p, m in zip(preferred, n, strict=True)) / sum(n) ** 2
    )
    effective = sum(n) / max(1.0, robust / (share * (1 - share) / sum(n)))
    t = stats.t.ppf(0.975, 3)
    expected = proportion_confint(
        share * effective, effective, alpha=2 * stats.norm.sf(t), method="wilson"
    )
    assert [low, high] == pytest.approx([100 * x for x in expected], rel=1e-9)
    # Two subjects at 99%: t is 63.7, whose normal tail underflows; still an interval.
    low, high = subject_interval([15, 12], [20, 20], confidence=0.99)
    assert 0 <= low < 67.5 < high <= 100


def test_subject_interval_covers_at_its_level_with_few_subjects():
    """Simulated studies of 6 subjects, 20 answers each, whose true shares differ (Beta, mean
    60%, sd 15 points): a 95% interval must contain the population's share in about 95% of
    them. (A percentile bootstrap over subjects covered 88% here.)"""
    rng = np.random.default_rng(11)
    mean, sd, k, n = 0.6, 0.15, 6, 20
    strength = mean * (1 - mean) / sd**2 - 1
    covered = 0
    studies = 2000
    for _ in range(studies):
        p = rng.beta(mean * strength, (1 - mean) * strength, k)
        low, high = subject_interval(rng.binomial(n, p), np.full(k, n))
        covered += low <= 100 * mean <= high
    assert covered / studies >= 0.94


def test_empty_cells_and_single_subjects_give_nan_not_errors(table):
    assert list(table.columns) == STAT_COLUMNS
    gs = table.loc[("GS", "V2M")]
    assert gs["n_answers"] == 0 and gs["n_subjects"] == 0
    assert np.isnan(gs["binom_p"]) and np.isnan(gs["subject_ci_low"])
    one = cell_statistics(exact_answers({(1, "GR", "V2M"): (10, 10)}))
    cell = one.loc[("GR", "V2M")]
    assert cell["binom_p"] == pytest.approx(2 * 0.5**10)
    assert np.isnan(cell["subject_ci_low"])  # one subject: how subjects differ is unknown


def test_wilcoxon_sees_mirror_image_shares_as_ties():
    # 4 of 6 and 2 of 6: +16.67 and -16.67 points, equal in size however floats round them.
    df = exact_answers({(s, "GR", "V2M"): (4 if s % 2 else 2, 6) for s in range(4)})
    cell = cell_statistics(df).loc[("GR", "V2M")]
    assert cell["wilcoxon_p"] == pytest.approx(stats.wilcoxon([1, -1, 1, -1]).pvalue)  # 1.0
    assert cell["wilcoxon_stat"] == pytest.approx(5.0)


def test_every_subject_at_chance_gives_no_wilcoxon_p():
    df = exact_answers({(s, "GR", "V2M"): (5, 10) for s in range(4)})
    cell = cell_statistics(df).loc[("GR", "V2M")]
    assert np.isnan(cell["wilcoxon_p"])
    assert cell["binom_p"] == pytest.approx(1.0)
    assert cell["subject_ci_low"] < 50.0 < cell["subject_ci_high"]


def _holm_reference(p):
    """Holm's step-down adjustment, from its definition: the i-th smallest of m p-values times
    (m - i + 1), made monotone and capped at 1."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p)
    scaled = (len(p) - np.arange(len(p))) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def test_holm_adjusted_p_values_sit_next_to_the_raw_ones(table):
    columns = list(table.columns)
    for test in ["binom", "wilcoxon"]:
        assert columns.index(f"{test}_p_holm") == columns.index(f"{test}_p") + 1
        raw = table[f"{test}_p"]
        tested = raw.notna()
        # The family: every cell of the table with a p-value (empty cells are not tested).
        assert table.loc[tested, f"{test}_p_holm"].tolist() == pytest.approx(
            _holm_reference(raw[tested].to_numpy()).tolist()
        )
        assert table.loc[~tested, f"{test}_p_holm"].isna().all()
        assert (table.loc[tested, f"{test}_p_holm"] >= raw[tested]).all()


def test_holm_leaves_untested_cells_out_of_the_family():
    from analysis.stats import holm

    p = np.array([0.01, 0.04, np.nan, 0.03, 0.005, 0.5, 0.04])
    adjusted = holm(p)
    assert np.isnan(adjusted[2])
    tested = ~np.isnan(p)
    assert adjusted[tested].tolist() == pytest.approx(_holm_reference(p[tested]).tolist())
    assert holm([]).size == 0 and np.isnan(holm([np.nan])).all()


def test_holm_family_is_the_whole_table_not_each_pair_type():
    from statsmodels.stats.multitest import multipletests

    spec = dict(SPEC)
    spec.update(
        {
            (1, "GS", "V2M"): (8, 10),
            (2, "GS", "V2M"): (3, 10),
            (3, "GS", "V2M"): (9, 10),
            (1, "GS", "M2V"): (7, 10),
            (2, "GS", "M2V"): (10, 10),
        }
    )
    table = cell_statistics(exact_answers(spec))
    assert set(table.index.get_level_values("pair_type")) >= {"GR", "GS"}
    for test in ["binom", "wilcoxon"]:
        raw = table[f"{test}_p"]
        tested = raw.notna()
        assert {pair_type for pair_type, _ in raw[tested].index} == {"GR", "GS"}
        expected = multipletests(raw[tested].to_numpy(), method="holm")[1]
        assert table.loc[tested, f"{test}_p_holm"].tolist() == pytest.approx(expected.tolist())


def every_sign_flip(differences) -> float:
    """Two-sided p of Wilcoxon's T+ over all 2^n sign flips, counted one by one."""
    ranks = stats.rankdata(np.abs(differences))
    observed = ranks[np.asarray(differences) > 0].sum()
    sums = np.array(
        [
            ranks[np.array(signs, bool)].sum()
            for signs in itertools.product([0, 1], repeat=len(ranks))
        ]
    )
    tail = min(np.mean(sums <= observed + 1e-9), np.mean(sums >= observed - 1e-9))
    return min(1.0, 2 * tail)


def test_wilcoxon_is_exact_given_the_ties_subjects_shares_always_have():
    """20 answers a cell give shares in steps of 5 points: ties. From 14 subjects on scipy
    then takes its normal approximation without continuity correction, up to 0.06 off."""
    rng = np.random.default_rng(3)
    for n in (14, 16):
        differences = rng.choice([-20, -15, -10, -5, 5, 10, 15, 20, 25, 30, 35, 40], n) * 1.0
        statistic, p = wilcoxon_test(differences)
        assert p == pytest.approx(every_sign_flip(differences), rel=1e-12)
        assert statistic == stats.wilcoxon(differences).statistic
        assert abs(p - stats.wilcoxon(differences).pvalue) > 1e-3  # what scipy says instead
    untied = rng.normal(0.4, 1, size=20)
    assert wilcoxon_test(untied)[1] == pytest.approx(stats.wilcoxon(untied, method="exact").pvalue)
    many = rng.choice([-10, -5, 5, 10, 15], EXACT_WILCOXON_MAX + 1) * 1.0
    expected = stats.wilcoxon(many, correction=True, method="approx").pvalue
    assert wilcoxon_test(many)[1] == pytest.approx(expected)
