import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit

from analysis.mixed import fit_preference_model
from analysis.preference import preference_table

PLANTED = 0.70  # a typical subject on a typical item prefers G in 70% of G-S answers
SUBJECT_SD, ITEM_SD = 1.0, 0.8


def simulate(seed, subjects=30, items=40, per_subject=20):
    rng = np.random.default_rng(seed)
    u, v = rng.normal(0, SUBJECT_SD, subjects), rng.normal(0, ITEM_SD, items)
    rows = []
    for s in range(subjects):
        for i in rng.choice(items, per_subject, replace=False):
            first = rng.random() < expit(logit(PLANTED) + u[s] + v[i])
            direction = "V2M" if i % 2 else "M2V"
            rows.append(
                {
                    "subject": s,
                    "item": f"q{i}",
                    "direction": direction,
                    "pair_type": "GS",
                    "first": "G",
                    "second": "S",
                    "chosen": "G" if first else "S",
                }
            )
    return pd.DataFrame(rows)


def test_recovers_planted_preference_and_spreads():
    df = simulate(seed=2)
    fit = fit_preference_model(df, "GS")
    assert fit.n_answers == 600 and fit.n_subjects == 30 and fit.n_items == 40
    assert fit.ci_low < 100 * PLANTED < fit.ci_high
    assert fit.ci_low < fit.preference < fit.ci_high
    # Subject and item spread are found, roughly their planted size.
    assert 0.5 * SUBJECT_SD < fit.subject_sd < 1.6 * SUBJECT_SD
    assert 0.4 * ITEM_SD < fit.item_sd < 1.6 * ITEM_SD
    # The pooled share is pulled towards 50% by the spread; the model's estimate is not.
    pooled = preference_table(df).loc["GS", "Total"]
    assert abs(fit.preference - 100 * PLANTED) < abs(pooled - 100 * PLANTED) + 3


def test_interval_is_honest_not_mean_field_narrow():
    # fit_vb's own sd of β0 is ~0.1 here; the sampling sd of β0 is ~0.24.
    fit = fit_preference_model(simulate(seed=5), "GS")
    assert 0.15 < fit.log_odds_sd < 0.4


def test_one_direction_and_errors():
    df = simulate(seed=2)
    fit = fit_preference_model(df, "GS", direction="V2M")
    assert fit.n_answers == (df["direction"] == "V2M").sum()
    with pytest.raises(ValueError, match="no answers"):
        fit_preference_model(df, "GR")
    with pytest.raises(ValueError, match="item"):
        fit_preference_model(df.drop(columns="item"), "GS")
