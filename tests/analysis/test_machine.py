import numpy as np
import pandas as pd

from analysis.export import results_table
from analysis.machine import machine_agreement, machine_gr_counts

from .frames import exact_answers

SPEC = {
    (1, "GR", "V2M"): (8, 10),
    (1, "GR", "M2V"): (6, 10),
    (1, "GS", "V2M"): (5, 10),
    (1, "GS", "M2V"): (5, 10),
}
MACHINE = {
    ("GR", "V2M"): (7, 10),
    ("GR", "M2V"): (9, 10),
    ("GS", "V2M"): (2, 10),
    ("GS", "M2V"): (4, 10),
}


def test_the_machine_row_of_table_iv_is_the_share_of_gr_questions_choosing_g():
    table = results_table(exact_answers(SPEC, MACHINE))
    assert table.loc[("Machine", "GR")].tolist() == [70.0, 90.0, 80.0]
    assert "Machine" not in results_table(exact_answers(SPEC)).index.get_level_values("judge")


def test_unjudged_questions_do_not_count():
    df = exact_answers(SPEC, MACHINE)
    df.loc[(df.pair_type == "GR") & (df.direction == "V2M"), "machine_S"] = None
    row = results_table(df).loc[("Machine", "GR")]
    assert np.isnan(row["V2M"]) and row["Total"] == 90.0


def test_human_machine_agreement_per_comparison():
    # GR V2M: humans choose G in rows 0-7, the machine in rows 0-6 → agree on 0-6 and 8-9 = 9.
    agreement = machine_agreement(exact_answers(SPEC, MACHINE))
    assert agreement.loc[("S", "GR"), "V2M"] == 90.0
    # GR M2V: humans G in 0-5, machine G in 0-8 → agree on 0-5 and 9 = 7.
    assert agreement.loc[("S", "GR"), "M2V"] == 70.0
    assert agreement.loc[("S", "GR"), "Total"] == 80.0
    assert agreement.loc[("S", "GR"), "n_answers"] == 20


def test_machine_gr_counts_say_how_many_questions_were_judged():
    """A system from uploaded ranked results judges only questions with a candidate in its
    top-k; its share is over the judged questions, and the counts say how many those were."""
    df = exact_answers(SPEC, MACHINE)
    gr_v2m = df.index[(df.pair_type == "GR") & (df.direction == "V2M")]
    df.loc[gr_v2m[2:], "machine_S"] = None  # judged 2 of 10: both chose G (rows 0-1)
    counts = machine_gr_counts(df)
    assert counts.index.tolist() == [("S", "V2M"), ("S", "M2V"), ("S", "Total")]
    assert counts.columns.tolist() == [
        "percent",
        "preferred",
        "n_judged",
        "n_questions",
        "coverage",
    ]
    assert counts.loc[("S", "V2M")].tolist() == [100.0, 2, 2, 10, 20.0]
    assert counts.loc[("S", "M2V")].tolist() == [90.0, 9, 10, 10, 100.0]
    assert counts.loc[("S", "Total")].tolist() == [11 / 12 * 100, 11, 12, 20, 60.0]
    assert counts["n_judged"].dtype == "Int64" and counts["n_questions"].dtype == "Int64"
    # The share is the G-R row's, over judged questions.
    assert counts["percent"].tolist() == results_table(df).loc[("Machine", "GR")].tolist()


def test_tables_joined_with_repeated_row_labels_give_the_same_figures():
    df = exact_answers(SPEC, MACHINE)
    half = len(df) // 2
    joined = pd.concat([df.iloc[:half], df.iloc[half:].reset_index(drop=True)])  # labels repeat
    assert not joined.index.is_unique
    pd.testing.assert_frame_equal(machine_gr_counts(joined), machine_gr_counts(df))
    pd.testing.assert_frame_equal(machine_agreement(joined), machine_agreement(df))


def test_machine_gr_counts_of_a_machine_that_judged_nothing():
    df = exact_answers(SPEC, MACHINE)
    df.loc[df.pair_type == "GR", "machine_S"] = None
    counts = machine_gr_counts(df)
    assert counts.loc[("S", "Total"), "n_judged"] == 0
    assert counts.loc[("S", "Total"), "n_questions"] == 20
    assert counts.loc[("S", "Total"), "coverage"] == 0.0
    assert np.isnan(counts.loc[("S", "Total"), "percent"])
    assert machine_gr_counts(exact_answers(SPEC)).empty
