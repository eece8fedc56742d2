"""The machine as a subject: a retrieval system "prefers" the candidate nearer to the query in
its embedding space (cosine similarity). The platform stores each system's choice per
question; in the analysis frame a column `machine_<label>` holds the kind it chose (like
`chosen` for the human), e.g. `machine_S` in a one-system study.

A machine need not judge every question: a system known only by uploaded ranked results
cannot tell two candidates apart when neither is in its top-k for the query (its column is
empty there). Its shares are over the questions it judged (no 50% is made up for the rest);
`machine_gr_counts` says how many those were out of how many, so that "100%" can be read as
"100% of the 10 judged, out of 100".
"""

import numpy as np
import pandas as pd

from .preference import COLUMNS, DIRECTIONS, ordered_pair_types, takes_answers

MACHINE_PREFIX = "machine_"
GR_COUNT_COLUMNS = ["percent", "preferred", "n_judged", "n_questions", "coverage"]


def machine_labels(df: pd.DataFrame) -> list[str]:
    """The labels of the machine judges present in the frame ('S', 'S1', …)."""
    return [c.removeprefix(MACHINE_PREFIX) for c in df.columns if c.startswith(MACHINE_PREFIX)]


@takes_answers
def machine_gr_counts(d: pd.DataFrame) -> pd.DataFrame:
    """The machine G-R row with its coverage: rows (machine, direction) for V2M, M2V and Total;
    columns `percent` (of the judged G-R questions, choosing G: the machine's row of Table
    IV), `preferred` (judged questions choosing G), `n_judged` (G-R
    questions the machine judged), `n_questions` (G-R questions answered) and `coverage`
    (percent of them judged). Counts are pandas' nullable Int64."""
    gr = d[d["pair_type"] == "GR"]
    rows = {}
    for label in machine_labels(d):
        column = gr[MACHINE_PREFIX + label]
        for direction in COLUMNS:
            in_cell = column if direction == "Total" else column[gr["direction"] == direction]
            judged = in_cell.dropna()
            prefers = judged == gr.loc[judged.index, "first"]
            rows[(label, direction)] = {
                "percent": prefers.mean() * 100.0 if len(judged) else np.nan,
                "preferred": int(prefers.sum()),
                "n_judged": len(judged),
                "n_questions": len(in_cell),
                "coverage": 100.0 * len(judged) / len(in_cell) if len(in_cell) else np.nan,
            }
    index = pd.MultiIndex.from_tuples(list(rows), names=["machine", "direction"])
    out = pd.DataFrame(list(rows.values()), index=index, columns=GR_COUNT_COLUMNS)
    counts = ["preferred", "n_judged", "n_questions"]
    out[counts] = out[counts].astype("Int64")
    out[["percent", "coverage"]] = out[["percent", "coverage"]].astype(float)
    return out


@takes_answers
def machine_agreement(d: pd.DataFrame) -> pd.DataFrame:
    """Human–machine agreement per comparison: rows (machine, pair_type), columns V2M, M2V,
    Total, the percent of answers in which the subject chose what the machine chose."""
    pair_types = ordered_pair_types(d["pair_type"].unique())
    rows = []
    for label in machine_labels(d):
        judged = d[d[MACHINE_PREFIX + label].notna()]
        agree = (judged[MACHINE_PREFIX + label] == judged["chosen"]) * 100.0
        for pair_type in pair_types:
            cell = agree[judged["pair_type"] == pair_type]
            where = judged.loc[cell.index, "direction"]
            row = {"machine": label, "pair_type": pair_type, "n_answers": len(cell)}
            row.update({direction: cell[where == direction].mean() for direction in DIRECTIONS})
            row["Total"] = cell.mean()
            rows.append(row)
    columns = ["machine", "pair_type", *COLUMNS, "n_answers"]
    return pd.DataFrame(rows, columns=columns).set_index(["machine", "pair_type"])
