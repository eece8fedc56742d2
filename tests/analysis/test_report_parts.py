"""A report makes the counted answers once and computes each part faster, with the very
numbers (to the bit) its public functions give on the raw frame."""

import gc
import io

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from analysis import agreement, export, machine, plots, preference, stats
from analysis.preference import answers, split_pair_type

PAIR_TYPES = ["GR", "G-S1", "G-S2", "S1-R", "S2-R", "S1-S2"]


def random_frame(seed=0, subjects=40, items=12):
    """Answers as the loader gives them: two machines that judge some questions, catch
    questions, answers given while a medium failed, and questions answered by different
    numbers of subjects (each subject meets a random share of the items)."""
    rng = np.random.default_rng(seed)
    rows = []
    for subject in range(subjects):
        position = 0
        lean = rng.normal(0, 1)
        for direction in ["V2M", "M2V"]:
            for pair_type in PAIR_TYPES:
                first, second = split_pair_type(pair_type)
                for item in rng.choice(items, size=rng.integers(1, items), replace=False):
                    position += 1
                    share = 1 / (1 + np.exp(-(lean + item / items - 0.5)))
                    row = {
                        "study": "s",
                        "subject": subject,
                        "position": position,
                        "direction": direction,
                        "pair_type": pair_type,
                        "first": first,
                        "second": second,
                        "chosen": first if rng.random() < share else second,
                        "response_ms": 1000.0 + position,
                        "item": f"item{item:02d}",
                        "is_catch": False,
                        "media_errors": int(rng.random() < 0.05),
                    }
                    for label in ["S1", "S2"]:
                        judged = rng.random() < 0.8
                        row[f"machine_{label}"] = (
                            (first if rng.random() < 0.6 else second) if judged else None
                        )
                    rows.append(row)
        position += 1  # a catch question: G against broken media, never counted
        rows.append({**rows[-1], "position": position, "pair_type": "GX", "first": "G",
                     "second": "X", "chosen": "X", "is_catch": True})  # fmt: skip
    return pd.DataFrame(rows)


PARTS = {
    "table": export.results_table,
    "machine": export.machine_coverage,
    "statistics": stats.cell_statistics,
    "subjects": preference.subject_preferences,
    "agreement": machine.machine_agreement,
    "kappa": agreement.comparison_kappa,
}


@pytest.mark.parametrize("heard_only", [False, True])
def test_report_parts_are_the_functions_of_the_raw_frame(heard_only):
    df = random_frame()
    report = export.build_report(df, heard_only=heard_only)
    counted = df[df["media_errors"] == 0] if heard_only else df
    assert report.unheard == export.unheard_answers(df) > 0
    pd.testing.assert_frame_equal(report.answers, answers(counted), check_exact=True)
    for name, function in PARTS.items():
        pd.testing.assert_frame_equal(
            getattr(report, name), function(counted), check_exact=True, obj=name
        )
        # The same numbers from answers made beforehand
        pd.testing.assert_frame_equal(
            function.of_answers(answers(counted)), function(counted), check_exact=True
        )
    assert report.n_answers == len(answers(counted))


def test_a_report_makes_the_counted_answers_once(monkeypatch):
    """They were made anew by each part: ten times a report, 0.1-0.3 s each at 100,000."""
    df = random_frame()
    made = []

    def counting(frame):
        made.append(len(frame))
        return answers(frame)

    monkeypatch.setattr(preference, "answers", counting)
    monkeypatch.setattr(export, "answers", counting)
    export.build_report(df)
    assert made == [len(df)]
    made.clear()
    export.build_report(df, heard_only=True)  # and once more without the unheard answers
    assert made == [len(df), int((df["media_errors"] == 0).sum())]


def kappa_by_groups(df):
    """Fleiss' kappa per pair type as comparison_kappa documents it, a question at a time."""
    from statsmodels.stats.inter_rater import fleiss_kappa

    d = answers(df).sort_values(["subject", "position"])
    rows = {}
    for pair_type in preference.ordered_pair_types(d["pair_type"].unique()):
        cell = d[d["pair_type"] == pair_type]
        sizes = cell.groupby(["direction", "item"]).size()
        candidates = range(2, sizes.max() + 1)
        used = [r * int((sizes >= r).sum()) for r in candidates]
        r = candidates[int(np.argmax(used))]
        kept = cell.groupby(["direction", "item"]).filter(lambda g, r=r: len(g) >= r)
        first_r = kept.groupby(["direction", "item"]).head(r)
        counts = first_r.groupby(["direction", "item"])["prefers_first"].agg(["sum", "size"])
        table = np.column_stack([counts["sum"], counts["size"] - counts["sum"]])
        rows[pair_type] = (float(fleiss_kappa(table, method="fleiss")), r, len(table))
    return rows


@pytest.mark.parametrize("seed", range(4))
def test_kappa_takes_each_questions_first_r_answers(seed):
    df = random_frame(seed, subjects=25 + 10 * seed, items=6 + seed)
    kappa = agreement.comparison_kappa(df)
    expected = kappa_by_groups(df)
    assert list(kappa.index) == list(expected)
    for pair_type, (value, raters, questions) in expected.items():
        row = kappa.loc[pair_type]
        assert (row["kappa"], row["raters"], row["questions"]) == (value, raters, questions)


def test_holm_is_statsmodels_holm_to_the_bit(monkeypatch):
    # statsmodels collects all garbage at each call (why stats.holm no longer calls it):
    # 0.3 s each in a test process
    monkeypatch.setattr(gc, "collect", lambda generation=2: 0)
    rng = np.random.default_rng(1)
    for i in range(500):
        p = rng.random(rng.integers(1, 30)) ** rng.integers(1, 6)
        if i % 3 == 0:
            p = np.round(p, 2)  # ties
        if i % 5 == 0:
            p[rng.random(len(p)) < 0.3] = np.nan  # tests not made
        if i % 7 == 0:
            p[:] = 0.9  # adjusted above 1, cut to 1
        tested = ~np.isnan(p)
        expected = np.full(len(p), np.nan)
        if tested.any():
            expected[tested] = multipletests(p[tested], method="holm")[1]
        assert np.array_equal(stats.holm(p), expected, equal_nan=True)


def test_the_reports_plot_is_the_plot_of_its_answers():
    df = random_frame()
    report = export.build_report(df, title="T")
    out = io.BytesIO()
    plots.preference_boxplot(df, out, title="T", format="png")
    assert export.render(report, "png") == out.getvalue()
