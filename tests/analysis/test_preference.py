import numpy as np
import pandas as pd
import pytest

from analysis.preference import (
    answers,
    ordered_pair_types,
    preference_table,
    split_pair_type,
    subject_preferences,
)

from .frames import exact_answers

# Two subjects, ten answers per cell: every cell's pooled share is known exactly.
SPEC = {
    (1, "GR", "V2M"): (9, 10),
    (2, "GR", "V2M"): (7, 10),
    (1, "GR", "M2V"): (8, 10),
    (2, "GR", "M2V"): (8, 10),
    (1, "GS", "V2M"): (6, 10),
    (2, "GS", "V2M"): (5, 10),
    (1, "GS", "M2V"): (7, 10),
    (2, "GS", "M2V"): (6, 10),
    (1, "SR", "V2M"): (7, 10),
    (2, "SR", "V2M"): (8, 10),
    (1, "SR", "M2V"): (3, 10),
    (2, "SR", "M2V"): (10, 10),
}


def test_split_pair_type_reads_both_spellings():
    assert split_pair_type("GR") == ("G", "R")
    assert split_pair_type("SR") == ("S", "R")
    assert split_pair_type("GS1") == ("G", "S1")
    assert split_pair_type("G-S1") == ("G", "S1")
    assert split_pair_type("S1-S2") == ("S1", "S2")
    assert split_pair_type("S10-R") == ("S10", "R")
    for bad in ["G", "GRS", "S1-", "x-y", "gr", "G-R-S"]:
        with pytest.raises(ValueError):
            split_pair_type(bad)


def test_table_iv_every_cell_is_the_pooled_share():
    table = preference_table(exact_answers(SPEC))
    expected = pd.DataFrame(
        {
            "V2M": [80.0, 55.0, 75.0],
            "M2V": [80.0, 65.0, 65.0],
            "Total": [80.0, 60.0, 70.0],
        },
        index=pd.Index(["GR", "GS", "SR"], name="pair_type"),
    )
    pd.testing.assert_frame_equal(table, expected)


def test_pooled_means_weighted_by_answers_not_subjects():
    # 1 of 2 and 10 of 10: pooled 11/12, not the mean of 50% and 100%.
    df = exact_answers({(1, "GR", "V2M"): (1, 2), (2, "GR", "V2M"): (10, 10)})
    assert preference_table(df).loc["GR", "V2M"] == pytest.approx(100 * 11 / 12)


def test_subject_rows_one_per_subject_pair_type_direction():
    rows = subject_preferences(exact_answers(SPEC))
    assert len(rows) == len(SPEC)
    for (subject, pair_type, direction), (k, n) in SPEC.items():
        row = rows[
            (rows.subject == subject)
            & (rows.pair_type == pair_type)
            & (rows.direction == direction)
        ]
        assert len(row) == 1
        assert row.iloc[0][["n", "preferred"]].tolist() == [n, k]
        assert row.iloc[0]["preference"] == pytest.approx(100 * k / n)
    # Ordered as the table: GR, GS, SR; V2M before M2V.
    assert rows.pair_type.tolist()[:4] == ["GR"] * 4
    assert rows.direction.tolist()[:4] == ["V2M", "V2M", "M2V", "M2V"]


def test_subject_totals_pool_a_subjects_directions():
    rows = subject_preferences(exact_answers(SPEC), with_total=True)
    total = rows[(rows.subject == 2) & (rows.pair_type == "SR") & (rows.direction == "Total")]
    assert total.iloc[0][["n", "preferred"]].tolist() == [20, 18]


def test_pair_type_without_answers_is_an_empty_row():
    spec = {key: value for key, value in SPEC.items() if key[1] != "GS"}
    table = preference_table(exact_answers(spec))
    assert table.index.tolist() == ["GR", "GS", "SR"]
    assert table.loc["GS"].isna().all()
    assert table.loc["GR", "Total"] == 80.0


def test_subject_with_one_direction_only():
    spec = {**SPEC, (3, "GR", "V2M"): (0, 10)}  # subject 3 stopped after the first block
    table = preference_table(exact_answers(spec))
    assert table.loc["GR", "V2M"] == pytest.approx(100 * 16 / 30)
    assert table.loc["GR", "M2V"] == 80.0
    assert table.loc["GR", "Total"] == pytest.approx(100 * 32 / 50)
    rows = subject_preferences(exact_answers(spec))
    assert rows[rows.subject == 3].direction.tolist() == ["V2M"]


def test_one_direction_missing_altogether_gives_nan_column():
    spec = {key: value for key, value in SPEC.items() if key[2] == "V2M"}
    table = preference_table(exact_answers(spec))
    assert table["M2V"].isna().all()
    assert (table["Total"] == table["V2M"]).all()


def test_catch_questions_are_left_out():
    df = exact_answers(SPEC)
    catch = exact_answers({(1, "GR", "V2M"): (0, 50)}).assign(is_catch=True)
    both = pd.concat([df.assign(is_catch=False), catch], ignore_index=True)
    pd.testing.assert_frame_equal(preference_table(both), preference_table(df))


def test_first_second_derived_when_absent():
    df = exact_answers(SPEC).drop(columns=["first", "second"])
    assert preference_table(df).loc["SR", "Total"] == 70.0


def test_multi_system_comparisons_prefer_first_column():
    df = exact_answers(
        {
            (1, "S1-S2", "V2M"): (3, 4),
            (1, "G-S1", "V2M"): (1, 4),
            (1, "GR", "V2M"): (4, 4),
            (1, "S2-R", "V2M"): (2, 4),
            (1, "G-S2", "V2M"): (0, 4),
        }
    )
    table = preference_table(df)
    assert table.index.tolist() == ["GR", "G-S1", "G-S2", "S2-R", "S1-S2"]
    assert table["V2M"].tolist() == [100.0, 25.0, 0.0, 50.0, 75.0]
    # Chosen matches `first` even where the kinds have several letters.
    assert answers(df).query("pair_type == 'S1-S2'").prefers_first.sum() == 3


def test_ordered_pair_types_shows_paper_rows_for_one_system():
    assert ordered_pair_types(["SR"]) == ["GR", "GS", "SR"]
    assert ordered_pair_types(["S1-S2", "GR"]) == ["GR", "S1-S2"]


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="chosen"):
        preference_table(pd.DataFrame({"subject": [1], "direction": ["V2M"], "pair_type": ["GR"]}))


def test_empty_frame_gives_empty_cells():
    empty = pd.DataFrame(columns=["subject", "direction", "pair_type", "chosen", "first", "second"])
    table = preference_table(empty)
    assert table.index.tolist() == ["GR", "GS", "SR"]
    assert np.isnan(table.to_numpy()).all()


def test_an_answer_of_neither_item_or_an_unknown_direction_is_refused():
    """A table made elsewhere: a missing choice counted silently for the second item."""
    df = exact_answers({(1, "GR", "V2M"): (3, 4)})
    bad = df.assign(chosen=df["chosen"].where(df.index > 0, None))
    with pytest.raises(ValueError, match="1 answers chose neither item .* in a GR question"):
        preference_table(bad)
    with pytest.raises(ValueError, match=r"directions must be V2M or M2V, not \['v2m'\]"):
        preference_table(df.assign(direction="v2m"))
