"""Preference shares (the paper's Table IV), pooled over answers and per subject.

The input (the contract other tools rely on): one row per answer with `study, subject,
position, direction ('V2M'|'M2V'), pair_type, chosen, response_ms`, plus `first` and
`second` (the two kinds compared, e.g. 'G' and 'R' for pair type 'GR'). The preference for
a pair type is the share of answers whose `chosen` kind equals `first`. Optional columns:
`item` (query id), `is_catch` (catch questions are left out), `machine_<label>`.
"""

import functools
import re

import pandas as pd

DIRECTIONS = ["V2M", "M2V"]
COLUMNS = [*DIRECTIONS, "Total"]
PAPER_PAIR_TYPES = ["GR", "GS", "SR"]

_KIND = re.compile(r"[A-Z]\d*")


def split_pair_type(pair_type: str) -> tuple[str, str]:
    """The two kinds a pair type compares, in order: 'GR' → ('G', 'R'), 'GS1' → ('G', 'S1'),
    'S1-S2' → ('S1', 'S2')."""
    parts = pair_type.split("-") if "-" in pair_type else _KIND.findall(pair_type)
    valid = all(_KIND.fullmatch(part) for part in parts)
    if len(parts) != 2 or not valid or "".join(parts) != pair_type.replace("-", ""):
        raise ValueError(f"not a pair type of two kinds: {pair_type!r}")
    return parts[0], parts[1]


def _order_key(pair_type: str):
    """Paper order: G-R first, then ground truth vs systems, systems vs random, systems."""
    first, second = split_pair_type(pair_type)
    if (first, second) == ("G", "R"):
        group = 0
    elif first == "G":
        group = 1
    elif second == "R":
        group = 2
    else:
        group = 3
    return group, pair_type


def ordered_pair_types(pair_types) -> list[str]:
    """The pair types in the paper's order; the paper's three always shown for a one-system study."""
    present = set(pair_types)
    if present <= set(PAPER_PAIR_TYPES):
        present |= set(PAPER_PAIR_TYPES)
    return sorted(present, key=_order_key)


def answers(df: pd.DataFrame) -> pd.DataFrame:
    """The answers that count: catch questions dropped, `first`/`second` filled in from the
    pair type where missing, and `prefers_first` (bool) added."""
    missing = {"subject", "direction", "pair_type", "chosen"} - set(df.columns)
    if missing:
        raise ValueError(f"responses lack columns: {sorted(missing)}")
    d = df
    if "is_catch" in d.columns:
        d = d[~d["is_catch"].fillna(False).astype(bool)]
    d = d.reset_index(drop=True)  # a copy, with unique labels (concatenated tables repeat them)
    if "first" not in d.columns or "second" not in d.columns:
        kinds = d["pair_type"].map(split_pair_type)
        d["first"] = kinds.str[0]
        d["second"] = kinds.str[1]
    # A choice of neither item counted for the second, silently (a table made elsewhere).
    if bad := sorted(set(d.loc[~d["direction"].isin(DIRECTIONS), "direction"].astype(str))):
        raise ValueError(f"directions must be {' or '.join(DIRECTIONS)}, not {bad[:5]}")
    neither = (d["chosen"] != d["first"]) & (d["chosen"] != d["second"])
    if neither.any():
        row = d[neither].iloc[0]
        raise ValueError(
            f"{int(neither.sum())} answers chose neither item of their pair type, e.g. "
            f"{row['chosen']!r} in a {row['pair_type']} question"
        )
    d["prefers_first"] = d["chosen"] == d["first"]
    return d


def takes_answers(function):
    """`function(d, …)` of the answers that count (`answers`) as a function of a responses
    frame, `function(df, …)`; `function.of_answers(d, …)` takes answers already made, so that
    a report makes them once for all its parts (0.1-0.3 s each at 100,000 answers)."""

    @functools.wraps(function)
    def of_responses(df, *args, **kwargs):
        return function(answers(df), *args, **kwargs)

    of_responses.of_answers = function
    return of_responses


def _shares(d: pd.DataFrame, by: list[str], column: str = "prefers_first") -> pd.Series:
    return d.groupby(by, observed=True)[column].mean() * 100.0


@takes_answers
def preference_table(d: pd.DataFrame, pair_types=None) -> pd.DataFrame:
    """Table IV: percent of answers preferring the first-named kind, per pair type (rows) and
    direction (`V2M`, `M2V`, `Total`), pooled over answers. Empty cells are NaN."""
    rows = ordered_pair_types(d["pair_type"].unique()) if pair_types is None else list(pair_types)
    table = _shares(d, ["pair_type", "direction"]).unstack("direction")
    table = table.reindex(index=rows, columns=DIRECTIONS)
    table["Total"] = _shares(d, ["pair_type"]).reindex(rows)
    table.index.name, table.columns.name = "pair_type", None
    return table.astype(float)


@takes_answers
def subject_preferences(d: pd.DataFrame, with_total: bool = False) -> pd.DataFrame:
    """One row per subject × pair type × direction: `n` answers, `preferred` (answers choosing
    the first kind) and `preference` in percent. `with_total` adds direction 'Total' rows
    (a subject's answers of both directions pooled)."""
    parts = [d]
    if with_total:
        parts.append(d.assign(direction="Total"))
    d = pd.concat(parts, ignore_index=True)
    grouped = d.groupby(["subject", "pair_type", "direction"], observed=True)["prefers_first"]
    out = grouped.agg(n="size", preferred="sum").reset_index()
    out["preferred"] = out["preferred"].astype(int)
    out["preference"] = 100.0 * out["preferred"] / out["n"]
    order = {p: i for i, p in enumerate(ordered_pair_types(out["pair_type"].unique()))}
    ranks = out["pair_type"].map(order) * len(COLUMNS) + out["direction"].map(COLUMNS.index)
    return out.iloc[ranks.argsort(kind="stable")].reset_index(drop=True)
