"""Do people agree with each other, and where do people and machines part ways?

A *question* here is what several subjects were asked alike: one query item in one direction
under one pair type (the candidates of a pair type are fixed per query, except R, which is
random). All functions need the `item` column.
"""

import numpy as np
import pandas as pd
from statsmodels.stats.inter_rater import fleiss_kappa

from .machine import MACHINE_PREFIX, machine_labels
from .preference import ordered_pair_types, takes_answers

QUESTION = ["pair_type", "direction", "item"]


def _need_items(d):
    if "item" not in d.columns:
        raise ValueError("agreement needs an 'item' column (the query id)")


@takes_answers
def item_agreement(d: pd.DataFrame) -> pd.DataFrame:
    """Per question: `n` answers, `first_share` (percent preferring the first kind) and
    `agreement` (percent of answers that side with the majority, 50–100)."""
    _need_items(d)
    out = d.groupby(QUESTION, observed=True)["prefers_first"].agg(n="size", first="mean")
    out["first_share"] = 100.0 * out.pop("first")
    out["agreement"] = np.maximum(out["first_share"], 100.0 - out["first_share"])
    return out.reset_index()


@takes_answers
def comparison_kappa(d: pd.DataFrame) -> pd.DataFrame:
    """Fleiss' kappa per pair type (both directions' questions together).

    Fleiss' kappa needs the same number of raters r for every question; questions were answered
    by different numbers of subjects, so r is chosen to use the most answers (r × the questions
    with at least r answers), and each such question's first r answers (in subject order) count.
    Columns: `kappa`, `raters` (r), `questions`.
    """
    _need_items(d)
    d = d.sort_values(["subject", "position"] if "position" in d else "subject")
    rows = []
    for pair_type in ordered_pair_types(d["pair_type"].unique()):
        cell = d[d["pair_type"] == pair_type]
        questions = cell.groupby(QUESTION[1:], observed=True)
        sizes = questions.size()
        candidates = np.arange(2, sizes.max() + 1) if len(sizes) and sizes.max() >= 2 else []
        if len(candidates) == 0:
            rows.append({"pair_type": pair_type, "kappa": np.nan, "raters": 0, "questions": 0})
            continue
        # r × the questions with at least r answers, for each r at once
        at_least = np.bincount(sizes)[::-1].cumsum()[::-1]
        r = int(candidates[int(np.argmax(candidates * at_least[candidates]))])
        # Each question's first r answers, of those with at least r (in whole columns: a
        # group at a time took most of the report's time).
        first_r = cell[
            (questions["prefers_first"].transform("size") >= r) & (questions.cumcount() < r)
        ]
        counts = first_r.groupby(QUESTION[1:], observed=True)["prefers_first"].agg(["sum", "size"])
        table = np.column_stack([counts["sum"], counts["size"] - counts["sum"]])
        # Every answer the same: chance agreement is 1 and kappa 0/0, undefined (NaN).
        with np.errstate(divide="ignore", invalid="ignore"):
            kappa = float(fleiss_kappa(table, method="fleiss"))
        rows.append(
            {
                "pair_type": pair_type,
                "kappa": kappa,
                "raters": r,
                "questions": len(table),
            }
        )
    return pd.DataFrame(rows, columns=["pair_type", "kappa", "raters", "questions"]).set_index(
        "pair_type"
    )


@takes_answers
def disagreements(d: pd.DataFrame, top: int | None = 20) -> pd.DataFrame:
    """Per machine, the questions where people and the machine disagree most.

    Rows: machine, pair_type, direction, item, n, `human_first` and `machine_first` (percent of
    answers / machine judgements preferring the first kind) and `gap` = |difference|, the
    largest gaps first (ties: more answers first), at most `top` per machine.
    """
    _need_items(d)
    parts = []
    for label in machine_labels(d):
        judged = d[d[MACHINE_PREFIX + label].notna()].assign(
            machine_prefers=lambda x, c=MACHINE_PREFIX + label: x[c] == x["first"]
        )
        per = judged.groupby(QUESTION, observed=True).agg(
            n=("prefers_first", "size"),
            human_first=("prefers_first", "mean"),
            machine_first=("machine_prefers", "mean"),
        )
        per[["human_first", "machine_first"]] *= 100.0
        per["gap"] = (per["human_first"] - per["machine_first"]).abs()
        per = per.reset_index().sort_values(["gap", "n"], ascending=False, kind="stable")
        parts.append(per.head(top) if top else per)
    columns = ["machine", *QUESTION, "n", "human_first", "machine_first", "gap"]
    if not parts:
        return pd.DataFrame(columns=columns)
    labels = machine_labels(d)
    return pd.concat(
        [p.assign(machine=label) for p, label in zip(parts, labels, strict=True)],
        ignore_index=True,
    )[columns]
