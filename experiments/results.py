"""The admin's results page of one study: Table IV, Fig. 7, the machine's G-R row, counts,
human–machine disagreements, and every export (`?download=<format>`).

Hooked into the admin by StudyAdmin.get_urls as `admin:experiments_study_results`.
"""

import base64
import dataclasses
import hashlib
from urllib.parse import urlencode

import pandas as pd
from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.http import HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, reverse
from django.utils.html import escape
from django.utils.safestring import mark_safe

from analysis.agreement import disagreements
from analysis.export import FORMATS, build_report, render, sample_notes, unheard_answers
from analysis.load import left_out, responses_frame, system_names
from analysis.preference import COLUMNS, answers

from .models import Study

DISAGREEMENTS_SHOWN = 10
FORMATTED = ["n", "human_first", "machine_first"]  # the disagreements' numbers


@staff_member_required
def study_results(request, study_id):
    # As the study's other pages (its change page, responses CSV, power): staff status alone
    # is no permission to read its results, nor to download them with per-subject rows.
    # Checked first, so that no study's existence shows either (403, never 404).
    if not (
        request.user.has_perm("experiments.view_study")
        or request.user.has_perm("experiments.change_study")
    ):
        raise PermissionDenied
    study = get_object_or_404(Study, pk=study_id)
    # Who and what is counted: each a query parameter, "1" for the non-default choice.
    options = {
        name: request.GET.get(name) == "1" for name in ("incomplete", "failed", "heard_only")
    }
    include_incomplete, include_failed, heard_only = options.values()
    df = responses_frame(study, include_incomplete, include_failed)
    sample = {
        "systems": system_names(study),
        "left_out": left_out(study, include_incomplete, include_failed),
        "heard_only": heard_only,
    }
    fmt = request.GET.get("download")
    if fmt is not None and fmt not in FORMATS:
        return HttpResponseBadRequest(f"unknown download format; one of {', '.join(FORMATS)}")
    found = _cached_analysis(df, study.name, sample)
    has_answers, unheard = found["has_answers"], found["unheard"]
    if fmt is not None:
        if not has_answers:
            return HttpResponseBadRequest("this study has no answers to export yet")
        content = found["plot_png"] if fmt == "png" else render(found["report"], fmt)
        extension, content_type = FORMATS[fmt]
        response = HttpResponse(content, content_type=content_type)
        suffix = (
            "-incomplete" * include_incomplete
            + "-with-failed" * include_failed
            + "-heard-only" * heard_only
        )
        filename = f"{study.slug}-preference{suffix}.{extension}"
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        return response

    context = {
        **admin.site.each_context(request),
        "title": f"Results of {study}",
        "study": study,
        "opts": Study._meta,
        "include_incomplete": include_incomplete,
        "include_failed": include_failed,
        "heard_only": heard_only,
        "unheard": unheard,
        # The page with one choice changed and the others kept.
        "toggled": {
            name: urlencode({k: 1 for k, v in {**options, name: not on}.items() if v})
            for name, on in options.items()
        },
        "has_attention_checks": study.attention_checks,
        "notes": sample_notes(**sample, unheard=unheard),
        "has_answers": has_answers,
        "columns": COLUMNS,
        "formats": [f for f in FORMATS if f != "markdown"] + ["markdown"],
        "sample_query": "".join(f"&{name}=1" for name, on in options.items() if on),
    }
    if has_answers:
        report = found["report"]
        context.update(
            n_subjects=report.n_subjects,
            n_answers=report.n_answers,
            table_rows=_rows(report.table),
            machine_coverage=[
                {"judge": judge, **row}
                for (judge, direction), row in _blank_nan(report.machine).to_dict("index").items()
                if direction == "Total"
            ],
            statistics_rows=_rows(report.statistics),
            # Long names may wrap after an underscore, which keeps the table narrow.
            statistics_columns=[
                mark_safe("_<wbr>".join(map(escape, c.split("_"))))
                for c in report.statistics.columns
            ],
            agreement_rows=_rows(report.agreement),
            kappa_rows=_rows(report.kappa) if report.kappa is not None else [],
            plot_png=base64.b64encode(found["plot_png"]).decode("ascii"),
            disagreements=found["disagreements"],
        )
    return TemplateResponse(request, "admin/experiments/results.html", context)


def _cached_analysis(df: pd.DataFrame, title: str, sample: dict) -> dict:
    """`_analyse`'s results, kept in Django's cache under a digest of all they are made from:
    every value of the frame (pandas' 64-bit hash of each row), its columns and types, the
    title and the sample's notes. A kept one is what computing it anew gives, whatever
    changed in the database and however (counts and last ids would miss an answer corrected
    in place). Each page and download still reads the frame (1 s at 100,000 answers); the
    report and its plot (1-2 s more) are made once for the page and all its downloads.
    Not in the key: the code; a shared cache that outlives a deploy wants clearing then."""
    digest = hashlib.sha256(repr((list(df.columns), [str(t) for t in df.dtypes])).encode())
    digest.update(pd.util.hash_pandas_object(df).to_numpy().tobytes())
    digest.update(repr((title, sample)).encode())
    return cache.get_or_set(f"results:{digest.hexdigest()}", lambda: _analyse(df, title, sample))


def _analyse(df: pd.DataFrame, title: str, sample: dict) -> dict:
    """Whether any answers count and how many were given unheard; where some count, the
    report without its frames (`responses` and `answers` None: 0.5 MB to keep at 1,000
    subjects, not tens of MB), its plot (PNG) and the disagreements shown."""
    counted = answers(df)
    found = {"has_answers": not counted.empty, "unheard": unheard_answers.of_answers(counted)}
    if found["has_answers"]:
        report = build_report(df, title=title, **sample)
        found.update(
            report=dataclasses.replace(report, responses=None, answers=None),
            plot_png=render(report, "png"),
            disagreements=_disagreement_rows(report),
        )
    return found


# One style per kind of number, in every table of the page: counts as integers, p-values with
# three decimals (below 0.001: "< 0.001"), and every other column (shares, intervals and
# medians, all in percent) with one decimal, except the statistics named here.
COUNTS = {"n_answers", "n_subjects", "preferred", "raters", "questions", "n"}
P_VALUES = {"binom_p", "binom_p_holm", "wilcoxon_p", "wilcoxon_p_holm"}
OTHER_FORMATS = {"kappa": "{:.3f}", "wilcoxon_stat": "{:.1f}"}


def number(column: str, value) -> str:
    """`value` of `column` as the page shows it; a missing value reads "–", never "nan"."""
    if value is None or pd.isna(value):
        return "–"
    if column in COUNTS:
        return f"{int(value)}"
    if column in P_VALUES:
        return "< 0.001" if value < 0.001 else f"{value:.3f}"
    return OTHER_FORMATS.get(column, "{:.1f}").format(value)


def _rows(frame):
    """(index labels, formatted values) per row, for a template to lay out without pandas'
    HTML."""
    return [
        (
            key if isinstance(key, tuple) else (key,),
            [number(column, value) for column, value in zip(frame.columns, values, strict=True)],
        )
        for key, values in zip(frame.index, _blank_nan(frame).to_numpy(), strict=True)
    ]


def _blank_nan(frame):
    return frame.astype(object).where(frame.notna(), None)


def _disagreement_rows(report):
    """The questions where people and each machine disagree most, with a link to the query."""
    df = report.responses
    if "item" not in df.columns or df["item"].isna().any():
        return []
    top = disagreements.of_answers(report.answers, top=DISAGREEMENTS_SHOWN)
    query_ids = df.drop_duplicates("item").set_index("item")["query_id"]
    rows = []
    for row in top.itertuples(index=False):
        try:
            link = reverse("admin:experiments_pair_change", args=[query_ids[row.item]])
        except NoReverseMatch:  # pairs not in the admin
            link = None
        shown = {column: number(column, getattr(row, column)) for column in FORMATTED}
        rows.append({**row._asdict(), **shown, "link": link})
    return rows
