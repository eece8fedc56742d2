"""One study's results in every format a paper or a spreadsheet wants.

`build_report(df)` computes everything once; `render(report, fmt)` writes it as markdown, csv,
json, latex or xlsx; `zip_all(report)` bundles every format with the box plot (PNG, SVG)
and the per-subject preferences.
"""

import io
import json
import zipfile
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import agreement, machine, plots, stats
from .mixed import fit_preference_model
from .preference import COLUMNS, answers, preference_table, subject_preferences, takes_answers

# format → (file extension, content type)
FORMATS = {
    "markdown": ("md", "text/markdown; charset=utf-8"),
    "csv": ("csv", "text/csv; charset=utf-8"),
    "json": ("json", "application/json"),
    "latex": ("tex", "application/x-tex; charset=utf-8"),
    "xlsx": ("xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
    "png": ("png", "image/png"),
    "svg": ("svg", "image/svg+xml"),
    "zip": ("zip", "application/zip"),
}
TEXT_FORMATS = ("markdown", "csv", "json", "latex")
KAPPA_NOTE = (
    "Over questions that at least two subjects answered: the same query, direction and pair "
    "type, so the same G and S; R is drawn for each subject, so in G-R and S-R questions they "
    "weighed the same G or S against different random items. raters 0 and no kappa where "
    "no question was asked twice: each subject's plan asks other questions. "
    "Statistics read NaN where a test cannot be made (e.g. Wilcoxon when every subject is at "
    "exactly 50%)."
)


def statistics_note(n_subjects: int) -> str:
    """What the tests assume, and what so few subjects can show."""
    note = (
        "Claim a cell differs from 50% with wilcoxon_p_holm (the subjects' shares against 50%, "
        "exact given ties; Holm-adjusted over the table) and subject_ci (answers clustered by "
        "subject). binom_p and binom_ci count every answer as independent, but one subject's "
        "answers are related: where subjects differ they overstate the evidence. Both treat "
        "the query items as fixed; the mixed model lets them differ too."
    )
    if n_subjects:
        smallest = 2.0 ** (1 - n_subjects)
        note += f" With {n_subjects} subjects no wilcoxon_p can be below {smallest:.3g}."
    return note


MACHINE_NOTE = (
    "The machine's share is over the G-R questions it judged (n_judged); a system known by "
    "ranked results judges only questions with a candidate in its top-k. coverage = percent of "
    "the G-R questions (n_questions) judged. The questions are the counted subjects': one asked "
    "of several subjects counts once for each."
)


@dataclass
class Report:
    title: str
    responses: pd.DataFrame = field(repr=False)
    table: pd.DataFrame  # Table IV: index (judge, pair_type), columns V2M, M2V, Total
    machine: pd.DataFrame  # the machine G-R rows' coverage: index (judge, direction)
    statistics: pd.DataFrame  # analysis.stats.cell_statistics
    subjects: pd.DataFrame  # analysis.preference.subject_preferences
    agreement: pd.DataFrame  # human–machine agreement per comparison
    kappa: pd.DataFrame | None  # Fleiss' kappa per comparison (needs `item`)
    mixed: pd.DataFrame | None  # mixed-model preference per comparison (optional)
    n_subjects: int
    n_answers: int
    systems: dict = field(default_factory=dict)  # label (S1, …) -> the system's name
    left_out: dict = field(default_factory=dict)  # reason (LEFT_OUT) -> subjects
    unheard: int = 0  # answers given while a candidate (or the query) could not be loaded
    heard_only: bool = False  # those answers left out
    answers: pd.DataFrame | None = field(default=None, repr=False)  # analysis.answers(responses)

    @property
    def counts(self) -> dict:
        return {
            "subjects": self.n_subjects, "answers": self.n_answers,
            "answers_with_media_errors": self.unheard,
        }  # fmt: skip


# Counts in the long form (`cells`): pandas' nullable integers, blank where they do not apply.
COUNT_COLUMNS = ["n_answers", "n_subjects", "preferred", "n_questions"]


def _machine_judge(label: str, n_machines: int) -> str:
    return "Machine" if n_machines == 1 else f"Machine {label}"


@takes_answers
def results_table(d: pd.DataFrame) -> pd.DataFrame:
    """Table IV as in the paper: the human rows, then a "Machine" GR row per machine judge
    (its share over the G-R questions it judged; how many: `machine_coverage`)."""
    human = preference_table.of_answers(d)
    parts = {"Human": human}
    gr = machine.machine_gr_counts.of_answers(d)["percent"].unstack("direction")
    for label, row in gr.iterrows():
        parts[_machine_judge(label, len(gr))] = row.to_frame("GR").T
    table = pd.concat(parts, names=["judge", "pair_type"])
    return table[COLUMNS]


@takes_answers
def machine_coverage(d: pd.DataFrame) -> pd.DataFrame:
    """The machine G-R rows of `results_table` with their counts: index (judge, direction),
    columns percent, preferred, n_judged, n_questions, coverage (analysis.machine_gr_counts)."""
    counts = machine.machine_gr_counts.of_answers(d)
    labels = counts.index.get_level_values("machine")
    judges = [_machine_judge(label, labels.nunique()) for label in labels]
    directions = counts.index.get_level_values("direction")
    counts.index = pd.MultiIndex.from_arrays([judges, directions], names=["judge", "direction"])
    return counts


LEFT_OUT = {
    "not_finished": "yet to finish",  # no verb: one or many alike
    "failed_attention": "who failed the attention checks",
    "cannot_pass": "who can no longer pass the attention checks",
}


def sample_notes(
    systems: dict, left_out: dict, unheard: int = 0, heard_only: bool = False
) -> list[str]:
    """What the system labels stand for, who is not counted and which answers were given
    without all their media, and whether they count (`Report`), as sentences."""
    notes = []
    if systems:
        named = ", ".join(f"{label} = {name}" for label, name in systems.items())
        notes.append(f"Systems: {named}.")
    if left_out:
        parts = [f"{n} subject{'s' * (n != 1)} {LEFT_OUT[r]}" for r, n in left_out.items()]
        notes.append(f"Left out: {' and '.join(parts)}.")
    if unheard:
        notes.append(
            f"{unheard} answer{'s were' if unheard != 1 else ' was'} given while a medium could "
            "not be loaded (`media_errors` in the export); they are "
            + ("left out." if heard_only else "counted.")
        )
    return notes


def _notes(report: Report) -> list[str]:
    return sample_notes(report.systems, report.left_out, report.unheard, report.heard_only)


@takes_answers
def unheard_answers(d: pd.DataFrame) -> int:
    """The answers that count given while a medium could not be loaded (a guess, maybe)."""
    return int((d["media_errors"] > 0).sum()) if "media_errors" in d.columns else 0


def build_report(
    df: pd.DataFrame,
    title="Human preference test",
    mixed=False,
    systems=None,
    left_out=None,
    heard_only=False,
) -> Report:
    """Everything the exports show. `mixed=True` also fits the mixed model per comparison.
    `systems` (label -> name) and `left_out` (reason -> subjects) are told in the notes;
    `heard_only` leaves out the answers given while a medium could not be loaded (counted
    by default: an answer given without hearing a candidate leans towards 50%)."""
    d = answers(df)  # once, for every part below
    unheard = unheard_answers.of_answers(d)
    if heard_only and unheard:
        df = df[df["media_errors"].fillna(0) == 0]
        d = answers(df)
    has_items = "item" in d.columns and d["item"].notna().all() and len(d) > 0
    fits = None
    if mixed and has_items:
        fits = pd.DataFrame(
            [
                _mixed_row(df, d, p)
                for p in preference_table.of_answers(d).index
                if (d["pair_type"] == p).any()
            ]
        )
    return Report(
        title=title,
        responses=df,
        table=results_table.of_answers(d),
        machine=machine_coverage.of_answers(d),
        statistics=stats.cell_statistics.of_answers(d),
        subjects=subject_preferences.of_answers(d),
        agreement=machine.machine_agreement.of_answers(d),
        kappa=agreement.comparison_kappa.of_answers(d) if has_items else None,
        mixed=fits,
        n_subjects=int(d["subject"].nunique()),
        n_answers=len(d),
        systems=dict(systems or {}),
        left_out=dict(left_out or {}),
        unheard=unheard,
        heard_only=heard_only,
        answers=d,
    )


def _mixed_row(df: pd.DataFrame, d: pd.DataFrame, pair_type: str) -> dict:
    """The model's fit for one comparison; unanimous answers leave nothing to estimate (and
    statsmodels refuses them), so their row has its counts only."""
    answered = d[d["pair_type"] == pair_type]
    if answered["prefers_first"].nunique() < 2:
        return {"comparison": pair_type, "direction": "Total", "n_answers": len(answered)}
    return fit_preference_model(df, pair_type).as_dict()


def cells(report: Report) -> pd.DataFrame:
    """Long form: one row per judge × pair type × direction, the share and its statistics.

    `n_questions` is the cell's questions and `coverage` the percent of them the judge
    decided: all of them for humans (an answer is a judgement), for a machine those it could
    judge, which are its `n_answers` (its `percent` is over them). The tests against 50% are
    the humans'; a machine row leaves them blank. Counts are integers (nullable Int64)."""
    long = report.table.stack(future_stack=True).rename("percent").reset_index()
    long = long.rename(columns={"level_2": "direction"})
    keys = ["judge", "pair_type", "direction"]
    human = report.statistics.drop(columns="percent").reset_index().assign(judge="Human")
    human["n_questions"] = human["n_answers"]
    human["coverage"] = np.where(human["n_answers"] > 0, 100.0, np.nan)
    parts = [human]
    if len(report.machine):
        machines = report.machine.drop(columns="percent").rename(columns={"n_judged": "n_answers"})
        parts.append(machines.reset_index().assign(pair_type="GR"))
    per_judge = pd.concat(parts, ignore_index=True)
    merged = long.merge(per_judge, on=keys, how="left")
    merged[COUNT_COLUMNS] = merged[COUNT_COLUMNS].astype("Int64")
    columns = [c for c in stats.STAT_COLUMNS if c != "percent"] + ["n_questions", "coverage"]
    return merged[[*keys, "percent", *columns]]


# Captions are LaTeX as given (pandas escapes only the cells): names and notes have _ and %.
LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}  # fmt: skip


def escape_latex(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(c, c) for c in text)


def _records(frame: pd.DataFrame | None):
    """Rows as JSON objects, numbers in full (p-values of 1e-9 are common) and NaN as null."""
    if frame is None:
        return None
    table = frame.reset_index() if frame.index.names != [None] else frame
    rows = table.astype(object).where(table.notna(), None).to_dict(orient="records")
    return json.loads(json.dumps(rows, default=_plain))


def _plain(value):
    """A numpy number or a timestamp as JSON can hold it."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value.item()


def _markdown(frame: pd.DataFrame, floatfmt: str) -> str:
    named = frame.index.names != [None]
    return (frame.reset_index() if named else frame).to_markdown(index=False, floatfmt=floatfmt)


def render(report: Report, fmt: str) -> str | bytes:
    """The report as text (markdown, csv, json, latex) or bytes (xlsx, png, svg, zip)."""
    if fmt == "markdown":
        parts = [
            f"# {report.title}",
            f"Subjects: {report.n_subjects}, answers: {report.n_answers}",
            *_notes(report),
            "## Preference (%, Table IV)",
            _markdown(report.table, ".2f"),
        ]
        if len(report.machine):
            parts += [
                "## Machine G-R: questions judged",
                MACHINE_NOTE,
                _markdown(report.machine, ".2f"),
            ]
        parts += [
            "## Statistics (per cell; tests against 50%; `_holm`: Holm-adjusted over the table)",
            statistics_note(report.n_subjects),
            _markdown(report.statistics, ".4g"),
        ]
        if len(report.agreement):
            parts += [
                "## Human–machine agreement (%)",
                _markdown(report.agreement, ".2f"),
            ]
        if report.kappa is not None:
            parts += [
                "## Agreement among subjects (Fleiss' kappa)",
                KAPPA_NOTE,
                _markdown(report.kappa, ".3f"),
            ]
        if report.mixed is not None:
            parts += [
                "## Mixed-effects logistic model",
                _markdown(report.mixed, ".3f"),
            ]
        return "\n\n".join(parts) + "\n"
    if fmt == "csv":
        return cells(report).to_csv(index=False)
    if fmt == "json":
        payload = {
            "title": report.title,
            "counts": report.counts,
            "systems": report.systems,
            "left_out": report.left_out,
            "notes": [*_notes(report), statistics_note(report.n_subjects)],
            "table": _records(report.table),
            "machine": _records(report.machine),
            "statistics": _records(report.statistics),
            "agreement": _records(report.agreement),
            "kappa": _records(report.kappa),
            "mixed": _records(report.mixed),
            "subjects": _records(report.subjects),
        }
        return json.dumps(payload, indent=2)
    if fmt == "latex":
        table = report.table.to_latex(
            float_format="%.2f",
            na_rep="--",
            escape=True,
            caption=escape_latex(
                " ".join(
                    [
                        f"{report.title}: percent of answers preferring the first-named item.",
                        *_notes(report),
                    ]
                )
            ),  # fmt: skip
            label="tab:preference",
        )
        statistics = report.statistics.to_latex(
            float_format="%.4g",
            na_rep="--",
            escape=True,
            caption="Tests against 50\\% per cell (\\_holm: Holm-adjusted over the table). "
            + escape_latex(statistics_note(report.n_subjects)),
        )
        if not len(report.machine):
            return table + "\n" + statistics
        coverage = report.machine.to_latex(
            float_format="%.2f",
            na_rep="--",
            escape=True,
            caption="Machine G-R: percent of the questions judged (n\\_judged) choosing G; "
            "coverage: percent of the G-R questions (n\\_questions) judged.",
        )
        return table + "\n" + coverage + "\n" + statistics
    if fmt == "xlsx":
        out = io.BytesIO()
        with pd.ExcelWriter(out, engine="openpyxl") as writer:
            report.table.to_excel(writer, sheet_name="Table IV")
            if len(report.machine):
                report.machine.reset_index().to_excel(writer, sheet_name="Machine G-R", index=False)
            report.statistics.to_excel(writer, sheet_name="Statistics")
            report.subjects.to_excel(writer, sheet_name="Subjects", index=False)
            notes = [*_notes(report), statistics_note(report.n_subjects)]
            pd.DataFrame({"note": notes}).to_excel(writer, sheet_name="Notes", index=False)
            report.agreement.to_excel(writer, sheet_name="Human-machine")
            if report.kappa is not None:
                report.kappa.to_excel(writer, sheet_name="Fleiss kappa")
            if report.mixed is not None:
                report.mixed.to_excel(writer, sheet_name="Mixed model", index=False)
        return out.getvalue()
    if fmt in ("png", "svg"):
        out = io.BytesIO()
        plots.preference_boxplot(
            report.responses, out, title=report.title, format=fmt, subjects=report.subjects
        )
        return out.getvalue()
    if fmt == "zip":
        return zip_all(report)
    raise ValueError(f"unknown format {fmt!r}; one of {sorted(FORMATS)}")


def zip_all(report: Report) -> bytes:
    """Every format, the box plot as PNG and SVG, and the per-subject preferences."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for fmt in [*TEXT_FORMATS, "xlsx", "png", "svg"]:
            zf.writestr(f"preference.{FORMATS[fmt][0]}", render(report, fmt))
        zf.writestr("subjects.csv", report.subjects.to_csv(index=False))
    return out.getvalue()
