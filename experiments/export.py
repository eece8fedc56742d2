"""A study's answers as rows, one per answer: what `export_responses` and the admin write.

`COLUMNS` names every column with its meaning (the data dictionary, `dictionary_rows`).
`response_rows(study, anonymise=True)` replaces the subject's token and external id with a
stable pseudonym (an HMAC of the study and the subject under the site's SECRET_KEY): the
same subject gets the same pseudonym in every export, and nobody without the key can go back.

`spreadsheet_safe` is what every CSV download of participant data passes each cell through:
participants choose their external id (PROLIFIC_PID, workerId … in the join link), and a
spreadsheet would run one starting with `=` as a formula.
"""

import hashlib
import hmac
import re
from collections.abc import Iterator

from django.conf import settings

from experiments.models import Response, Study

COLUMNS = {
    "study": "The study's slug.",
    "subject": "The subject: their private link token (anonymised: a stable pseudonym).",
    "subject_ordinal": "The subject's number within the study (0, 1, …): the `subject` of the "
    "analysis outputs (preference_report's subjects CSV, the report's Subjects sheet and JSON "
    "`subjects`); join on it.",
    "external_id": "The recruiting platform's participant id, e.g. PROLIFIC_PID or MTurk "
    "workerId (anonymised: a stable pseudonym; empty where none was given).",
    "subject_completed": "Whether the subject answered every question.",
    "subject_outcome": "completed, failed_attention (below the catch-score threshold), "
    "failed_sound, no_consent, or empty while in progress.",
    "catch_score": "Share of the subject's catch questions answered correctly (empty "
    "without catch questions).",
    "position": "The question's position in the subject's plan (1-based).",
    "direction": "V2M: a video query with music candidates; M2V: music query, video candidates.",
    "pair_type": "The comparison asked: GR, GS, SR (one system), G-S1, S1-S2 … (several), GX "
    "(a catch question).",
    "is_catch": "Whether the question is an attention check (ground truth against broken "
    "media); excluded from the preference analysis.",
    "query": "The query item's pair key.",
    "option_a": "Candidate A's pair key.",
    "option_b": "Candidate B's pair key.",
    "kind_a": "Candidate A's kind: G (ground truth), R (random), a system label, X (broken).",
    "kind_b": "Candidate B's kind.",
    "chosen_item": "The chosen candidate's pair key.",
    "chosen": "The chosen candidate's kind (G, R, a system label or X).",
    "response_ms": "Milliseconds from showing the question to the answer (measured in the "
    "browser; empty without JavaScript).",
    "answered_at": "When the answer was stored (ISO 8601, UTC).",
    "first_play_ms": "Milliseconds from showing the question to the first play of any item.",
    "plays_query": "How often the query was started.",
    "plays_a": "How often candidate A was started.",
    "plays_b": "How often candidate B was started.",
    "listened_a_ms": "How long candidate A played in all (milliseconds).",
    "listened_b_ms": "How long candidate B played in all (milliseconds).",
    "blur": "How often the window lost focus during the question.",
    "focus": "How often the window regained focus.",
    "hidden": "How often the page was hidden (another tab, app or locked screen).",
    "media_errors": "Media that failed to load, as role:reason (error or timeout), ';'-separated.",
    "media_retries": "How often the subject pressed Retry after a load failure.",
}
MACHINE_COLUMN = "The kind that system {label}'s machine judge chose (empty where it cannot tell)."


def column_names(study: Study) -> list[str]:
    """The exported columns in order: COLUMNS, then one `machine_<label>` per system."""
    return [*COLUMNS, *(f"machine_{label}" for label in _labels(study))]


def dictionary_rows(study: Study) -> list[dict]:
    """One row per exported column: its name and meaning."""
    columns = [{"column": name, "meaning": meaning} for name, meaning in COLUMNS.items()]
    return columns + [
        {"column": f"machine_{label}", "meaning": MACHINE_COLUMN.format(label=label)}
        for label in _labels(study)
    ]


# A formula's first character, at the cell's start, after leading blanks, or after a ";" or
# "," where a spreadsheet splits cells on them (German and other locales split on ";").
FORMULA = re.compile(r"(?:^|[;,])\s*[=+\-@\t\r]|^[\t\r]")


def spreadsheet_safe(value):
    """A CSV cell that no spreadsheet runs as a formula (OWASP's CSV injection advice): a
    string with =, +, -, @, tab or carriage return at its start, after leading blanks or
    after a ";" or "," (where a spreadsheet splits the cell there) gets a leading single
    quote; anything else, numbers (negative ones too) included, is returned unchanged."""
    if isinstance(value, str) and FORMULA.search(value):
        return "'" + value
    return value


def pseudonym(study: Study, value: str) -> str:
    """A stable, keyed pseudonym of `value` within `study` ('' stays '')."""
    if not value:
        return ""
    message = f"{study.pk}:{value}".encode()
    digest = hmac.new(settings.SECRET_KEY.encode(), message, hashlib.sha256).hexdigest()
    return "p" + digest[:16]


def response_rows(study: Study, anonymise: bool = False) -> Iterator[dict]:
    labels = _labels(study)
    responses = (
        Response.objects.filter(subject__study=study)
        .select_related("subject", "question__query", "question__option_a", "question__option_b")
        .order_by("subject__ordinal", "question__position")
    )
    for response in responses.iterator(chunk_size=2000):
        q, subject = response.question, response.subject
        kinds = {"a": q.kind_a, "b": q.kind_b}
        log = response.behaviour if isinstance(response.behaviour, dict) else {}
        subject_id, external_id = subject.token, subject.external_id
        if anonymise:
            subject_id = pseudonym(study, subject.token)
            external_id = pseudonym(study, subject.external_id)
        yield {
            "study": study.slug,
            "subject": subject_id,
            "subject_ordinal": subject.ordinal,
            "external_id": external_id,
            "subject_completed": subject.completed_at is not None,
            "subject_outcome": subject.outcome,
            "catch_score": subject.catch_score,
            "position": q.position,
            "direction": q.direction,
            "pair_type": q.pair_type,
            "is_catch": q.is_catch,
            "query": q.query.key,
            "option_a": q.option_a.key,
            "option_b": q.option_b.key,
            "kind_a": q.kind_a,
            "kind_b": q.kind_b,
            "chosen_item": (q.option_a if response.choice == "a" else q.option_b).key,
            "chosen": response.chosen_kind,
            "response_ms": response.response_ms,
            "answered_at": response.answered_at.isoformat(),
            **behaviour_columns(log),
            **{f"machine_{label}": kinds.get(q.machine.get(label), "") for label in labels},
        }


def behaviour_columns(log: dict) -> dict:
    """The behaviour log's exported fields; '' where the page did not report one."""

    def number(value):
        return value if isinstance(value, int | float) and not isinstance(value, bool) else ""

    def per_role(key, role):
        values = log.get(key)
        return number(values.get(role)) if isinstance(values, dict) else ""

    errors = log.get("errors") if isinstance(log.get("errors"), list) else []
    return {
        "first_play_ms": number(log.get("first_play_ms")),
        "plays_query": per_role("plays", "query"),
        "plays_a": per_role("plays", "a"),
        "plays_b": per_role("plays", "b"),
        "listened_a_ms": per_role("listened_ms", "a"),
        "listened_b_ms": per_role("listened_ms", "b"),
        "blur": number(log.get("blur")),
        "focus": number(log.get("focus")),
        "hidden": number(log.get("hidden")),
        "media_errors": ";".join(  # only the page's own words: the log is the browser's
            f"{_known(e.get('role'), MEDIA_ROLES)}:{_known(e.get('reason'), LOAD_FAILURES)}"
            for e in errors
            if isinstance(e, dict)
        ),
        "media_retries": number(log.get("retries")),
    }


MEDIA_ROLES = ("query", "a", "b")
LOAD_FAILURES = ("error", "timeout")


def _known(value, words) -> str:
    return value if value in words else "?"


def _labels(study: Study) -> list[str]:
    return sorted(study.studysystem_set.values_list("label", flat=True))
