import warnings

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.inter_rater import fleiss_kappa

from analysis.agreement import comparison_kappa, disagreements, item_agreement


def _answers(choices, pair_type="GR", machine=None):
    """choices[item] = the kinds chosen by subjects 0, 1, … on that item (V2M)."""
    first, second = pair_type
    rows = []
    for item, chosen in choices.items():
        for subject, kind in enumerate(chosen):
            row = {
                "subject": subject,
                "position": len(rows),
                "direction": "V2M",
                "pair_type": pair_type,
                "first": first,
                "second": second,
                "chosen": kind,
                "item": item,
            }
            if machine is not None:
                row["machine_S"] = machine[item]
            rows.append(row)
    return pd.DataFrame(rows)


CHOICES = {"q1": "GGGG", "q2": "GGGR", "q3": "GRRR", "q4": "GGRR"}


def test_item_agreement_shares():
    out = item_agreement(_answers(CHOICES)).set_index("item")
    assert out["n"].tolist() == [4, 4, 4, 4]
    assert out["first_share"].tolist() == [100.0, 75.0, 25.0, 50.0]
    assert out["agreement"].tolist() == [100.0, 75.0, 75.0, 50.0]


def test_fleiss_kappa_matches_statsmodels_with_equal_raters():
    table = np.array([[4, 0], [3, 1], [1, 3], [2, 2]])
    kappa = comparison_kappa(_answers(CHOICES)).loc["GR"]
    assert kappa["kappa"] == pytest.approx(fleiss_kappa(table, method="fleiss"))
    assert kappa["raters"] == 4 and kappa["questions"] == 4


def test_fleiss_kappa_with_unequal_raters_uses_the_best_common_count():
    # Raters per item 4, 4, 4, 2: r = 4 on 3 items (12 answers) beats r = 2 on 4 (8).
    choices = {**CHOICES, "q4": "GR"}
    kappa = comparison_kappa(_answers(choices)).loc["GR"]
    assert kappa["raters"] == 4 and kappa["questions"] == 3
    table = np.array([[4, 0], [3, 1], [1, 3]])
    assert kappa["kappa"] == pytest.approx(fleiss_kappa(table, method="fleiss"))


def test_perfect_agreement_on_split_items_gives_kappa_one():
    kappa = comparison_kappa(_answers({"q1": "GGG", "q2": "RRR"})).loc["GR", "kappa"]
    assert kappa == pytest.approx(1.0)


def test_kappa_is_undefined_without_a_warning_when_every_answer_is_the_same():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the report's output stays clean
        kappa = comparison_kappa(_answers({"q1": "GGG", "q2": "GGG"})).loc["GR", "kappa"]
    assert np.isnan(kappa)


def test_disagreements_rank_questions_by_gap():
    machine = {"q1": "R", "q2": "G", "q3": "G", "q4": "G"}
    out = disagreements(_answers(CHOICES, machine=machine), top=3)
    assert out["item"].tolist() == ["q1", "q3", "q4"]
    assert out["gap"].tolist() == [100.0, 75.0, 50.0]
    assert out.iloc[0][["human_first", "machine_first", "n"]].tolist() == [100.0, 0.0, 4]
    assert set(out["machine"]) == {"S"}


def test_agreement_needs_items():
    df = _answers(CHOICES).drop(columns="item")
    with pytest.raises(ValueError, match="item"):
        item_agreement(df)
