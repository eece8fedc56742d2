"""The one bridge from the database to the analysis: a study's answers as the analysis frame.

The only module of `analysis` that imports Django; everything else works on the DataFrame.
"""

import json

import pandas as pd
from django.db.models import Count, F, Q, TextField
from django.db.models.fields.json import KeyTransform
from django.db.models.functions import Cast

from experiments.models import Response, Study, StudySystem, Subject

from .machine import MACHINE_PREFIX
from .preference import split_pair_type

FRAME_COLUMNS = [
    "study",
    "subject",
    "position",
    "direction",
    "pair_type",
    "first",
    "second",
    "chosen",
    "response_ms",
    "item",
    "option_a",
    "option_b",
    "query_id",
    "is_catch",
    "external_id",
    "answered_at",
    "media_errors",  # media that failed to load while the question was shown
]


def get_study(ref: "Study | int | str") -> Study:
    """A study by instance, id or slug (Study.DoesNotExist when there is none)."""
    if isinstance(ref, Study):
        return ref
    if isinstance(ref, int) or str(ref).isdigit():
        found = Study.objects.filter(pk=int(ref)).first()
        if found is not None:
            return found
    return Study.objects.get(slug=str(ref))


def system_names(study: "Study | int | str") -> dict[str, str]:
    """The system each of the study's labels (S, or S1, S2, …) stands for, by name."""
    links = StudySystem.objects.filter(study=get_study(study)).select_related("system")
    return {link.label: link.system.name for link in links.order_by("label")}


# Why `responses_frame` leaves a subject who answered out (analysis.export.LEFT_OUT words
# it), and the option that counts them.
LEFT_OUT_OPTION = {
    "not_finished": "include_incomplete",
    "failed_attention": "include_failed",
    "cannot_pass": "include_failed",
}


def left_out(
    study: "Study | int | str", include_incomplete: bool = False, include_failed: bool = False
) -> dict[str, int]:
    """How many subjects who answered `responses_frame` leaves out, by reason
    (`LEFT_OUT_OPTION`); reasons with none are not named."""
    reasons = _left_out(get_study(study), include_incomplete, include_failed)
    counts = {r: q.filter(responses__isnull=False).distinct().count() for r, q in reasons.items()}
    return {reason: n for reason, n in counts.items() if n}


def _left_out(study, include_incomplete: bool, include_failed: bool) -> dict:
    """The subjects `responses_frame` leaves out, as a query per reason (`LEFT_OUT_OPTION`):
    one rule for the frame and for the counts that say who is not in it."""
    subjects = Subject.objects.filter(study=study)
    reasons = {}
    if not include_incomplete:
        reasons["not_finished"] = subjects.filter(completed_at__isnull=True)
    if not include_failed:
        reasons["failed_attention"] = subjects.filter(outcome=Subject.Outcome.FAILED_ATTENTION)
        threshold = study.catch_pass_threshold
        if include_incomplete and study.attention_checks and threshold is not None:
            # the finished are judged by their outcome; without include_incomplete these are
            # not finished anyway
            reasons["cannot_pass"] = subjects.filter(pk__in=_cannot_pass(study, threshold))
    return reasons


def _cannot_pass(study, threshold: float) -> list[int]:
    """Subjects in progress whose failed catch questions already keep their final share
    (passed of all their catch questions) below `threshold`."""
    in_progress = Subject.objects.filter(study=study, completed_at__isnull=True).annotate(
        n_catch=Count("questions", filter=Q(questions__is_catch=True), distinct=True),
        failed=Count(
            "responses",
            filter=Q(responses__question__is_catch=True) & ~Q(responses__chosen_kind="G"),
            distinct=True,
        ),
    )
    return [
        pk
        for pk, n_catch, failed in in_progress.values_list("pk", "n_catch", "failed")
        if n_catch and (n_catch - failed) / n_catch < threshold
    ]


def responses_frame(
    study: "Study | int | str", include_incomplete: bool = False, include_failed: bool = False
) -> pd.DataFrame:
    """One row per answer of `study` (the analysis contract), plus `item` (the query's pair
    key), `option_a`/`option_b` (candidate keys), `query_id` (the query pair's id, for admin
    links) and one `machine_<label>` column per machine judge holding the kind it chose.

    Only subjects who completed the study count unless `include_incomplete`; subjects who
    failed the attention checks (`Subject.outcome == "failed_attention"`) are left out unless
    `include_failed`, and so are, in a study with attention checks and a pass threshold,
    subjects still in progress who have failed so many catch questions that they can no
    longer reach it (the outcome is set only at the end). Catch questions are flagged in
    `is_catch`; the analysis leaves them out.
    """
    study = get_study(study)
    responses = Response.objects.filter(subject__study=study)
    for subjects in _left_out(study, include_incomplete, include_failed).values():
        responses = responses.exclude(subject__in=subjects)
    # Tuples, and of each answer's behaviour log only its media errors: dicts of whole logs
    # held 250 MB for 117,000 answers, to count errors. JSON and times come as text, read
    # a column at once (JSON once per distinct text): row by row they took 2/3 of the time.
    columns = {
        "response_ms": F("response_ms"),
        "answered_at": Cast("answered_at", TextField()),
        "errors": Cast(KeyTransform("errors", "behaviour"), TextField()),
        "subject_ordinal": F("subject__ordinal"),
        "external_id": F("subject__external_id"),
        "position": F("question__position"),
        "direction": F("question__direction"),
        "pair_type": F("question__pair_type"),
        "chosen": F("chosen_kind"),
        "kind_a": F("question__kind_a"),
        "kind_b": F("question__kind_b"),
        "item": F("question__query__key"),
        "query_id": F("question__query_id"),
        "option_a": F("question__option_a__key"),
        "option_b": F("question__option_b__key"),
        "machine": Cast(F("question__machine"), TextField()),
        "is_catch": F("question__is_catch"),
    }
    ordered = responses.order_by("subject__ordinal", "question__position")
    rows = ordered.values_list(*columns.values()).iterator(chunk_size=5000)
    df = pd.DataFrame.from_records(list(rows), columns=list(columns))
    if df.empty:
        return pd.DataFrame(columns=FRAME_COLUMNS)
    df["study"] = study.slug
    # ISO 8601 (PostgreSQL's DateStyle ISO, which psycopg needs anyway; SQLite's text, in UTC)
    df["answered_at"] = pd.to_datetime(df["answered_at"], utc=True, format="ISO8601").astype(
        "datetime64[us, UTC]"
    )
    # Equal texts as one object: the analysis compares and groups these columns twice as
    # fast (by identity, each hash computed once).
    one = {}
    for column in ["direction", "pair_type", "chosen", "kind_a", "kind_b", "item"]:
        shared = [one.setdefault(text, text) for text in df[column].to_numpy(dtype=object)]
        df[column] = pd.Series(shared, index=df.index, dtype=df[column].dtype)
    errors = df.pop("errors")
    counts = {
        text: len(found) if isinstance(found, list) else 0 for text, found in _decoded(errors)
    }
    df["media_errors"] = errors.map(counts).fillna(0).astype("int64")
    df["subject"] = df.pop("subject_ordinal")
    # Per distinct pair type, not per answer (a few against 100,000).
    kinds = {p: split_pair_type(p) for p in df["pair_type"].unique()}
    df["first"] = df["pair_type"].map({p: k[0] for p, k in kinds.items()}).astype(object)
    df["second"] = df["pair_type"].map({p: k[1] for p, k in kinds.items()}).astype(object)
    df["response_ms"] = df["response_ms"].astype("Float64")
    machine = df.pop("machine")
    judges = {text: judged or {} for text, judged in _decoded(machine)}
    labels = sorted({label for judged in judges.values() for label in judged})
    for label in labels:
        choice = machine.map({text: judged.get(label) for text, judged in judges.items()})
        df[MACHINE_PREFIX + label] = (
            df["kind_a"].where(choice == "a", df["kind_b"]).where(choice.notna())
        )
    df = df.drop(columns=["kind_a", "kind_b"])
    return df[FRAME_COLUMNS + [MACHINE_PREFIX + label for label in labels]]


def _decoded(texts: pd.Series) -> list[tuple[str, object]]:
    """(text, value) for each distinct JSON text of `texts`, read as Django's JSONField reads
    it (a text that is no JSON as itself)."""
    decoded = []
    for text in texts.dropna().unique():
        try:
            decoded.append((text, json.loads(text)))
        except json.JSONDecodeError:
            decoded.append((text, text))
    return decoded
