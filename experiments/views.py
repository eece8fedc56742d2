"""Participant pages.

A subject has one URL, `/s/<token>/`. As in oTree, the server decides which step is current
(welcome → sound check where the study has one → questions, with a break between the blocks →
done; or an early end: no consent, failed sound check), and every GET of that URL shows it, so refresh, Back and a repeated POST are harmless. Each POST names what it answers (the
step, or the question's position); a POST for a step that is no longer current changes nothing
and redirects to the current one. Answers are written under a lock on the subject row; the
one-to-one constraint on `Response.question` is the last line.
"""

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import IntegrityError, connection, transaction
from django.db.models import Q
from django.http import (
    Http404,
    HttpResponse,
    HttpResponseNotModified,
    JsonResponse,
    StreamingHttpResponse,
)
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone, translation
from django.utils.crypto import salted_hmac
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods

from study_site.client import client_address

from . import checks
from .forms import AnswerForm, SoundCheckForm, StartForm
from .models import Direction, Pair, Question, Response, Study, Subject
from .plans import PlanError
from .subjects import create_subject

logger = logging.getLogger(__name__)

# Query parameters that crowd-sourcing platforms append to a study link, kept on entry.
ENTRY_PARAMS = (
    *("PROLIFIC_PID", "STUDY_ID", "SESSION_ID"),
    *("workerId", "assignmentId", "hitId", "turkSubmitTo"),
)
EXTERNAL_ID_PARAMS = ("PROLIFIC_PID", "workerId")  # who the participant is, where unconfigured
JOINED = "joined"  # marks, in a subject's meta, one made by the join link (its cap counts them)
# A keyed hash of the address a subject joined from, in its meta until it starts: the join
# link's limit counts those that have not started (a script fetching the link again and again
# would fill the study's cap, or the database, with subjects nobody takes part as).
JOINED_FROM = "joined_from"
LOAD_TIMEOUT_MS = 20_000  # media not loaded by then: the page offers a retry
# End pages go back to the recruiting platform after this long unless the participant stays:
# time to read the page and reach "Stay" (WCAG 2.2.1 asks for at least 20 s).
ONWARD_AFTER_S = 20
ENDED = (Subject.Outcome.FAILED_SOUND, Subject.Outcome.NO_CONSENT)
JOIN_HOLD = timedelta(minutes=30)  # a joined subject holds a place this long before starting
LAST_SEEN_EVERY_S = 60  # a GET refreshes `last_seen` at most this often (no write per view)
STALE = ()  # what `_apply` changed for a POST that is not for the current step: nothing


def home(request):
    return render(request, "experiments/home.html")


# --- Which step is current ---------------------------------------------------------------


@dataclass
class Step:
    """What the subject should see now: 'closed', 'welcome', 'sound', 'question', 'break',
    'done' (all answered) or 'ended' (stopped early: no consent, failed sound check)."""

    name: str
    question: Question | None = None
    answered: int = 0
    total: int = 0
    following: Question | None = None  # the next question (its media are prefetched)
    nearby: dict | None = None  # position → question, around the current one

    def after_answer(self, subject: Subject) -> "Step":
        """The step once this question is answered, from the questions already read (the
        answered positions are always 1..n, so the next one is the following position)."""
        if self.answered + 1 == self.total:
            return Step("done", answered=self.total, total=self.total)
        position = self.question.position + 1
        return _question_step(subject, self.nearby, position, self.answered + 1, self.total)


def break_key(question: Question) -> str:
    return f"break:{question.position}"


# The queries every page and every answer makes are written out: building them with the
# ORM costs more CPU than PostgreSQL takes to run them (issue 8 counts ~1-2 ms an answer).


class _Columns:
    """A model's concrete columns in a hand-written SELECT, and instances made from them
    with the conversions the ORM applies (JSON, and SQLite's dates and booleans)."""

    def __init__(self, model, alias: str, names: tuple[str, ...] = ()):
        self.model = model
        self.fields = [model._meta.get_field(n) for n in names] or model._meta.concrete_fields
        self.sql = ", ".join(f"{alias}.{field.column}" for field in self.fields)
        self.attnames = [field.attname for field in self.fields]
        self._converters = {}

    def __len__(self):
        return len(self.fields)

    def instance(self, values):
        values = list(values)
        for i, convert, column in self._for(connection):
            values[i] = convert(values[i], column, connection)
        return self.model.from_db(connection.alias, self.attnames, values)

    def _for(self, conn):
        if conn.vendor not in self._converters:
            found = []
            for i, field in enumerate(self.fields):
                column = field.get_col(self.model._meta.db_table)
                for convert in conn.ops.get_db_converters(column) + field.get_db_converters(conn):
                    found.append((i, convert, column))
            self._converters[conn.vendor] = found
        return self._converters[conn.vendor]


_SUBJECT, _STUDY = _Columns(Subject, "s"), _Columns(Study, "t")
_QUESTION = _Columns(
    Question, "n", ("id", "subject", "position", "direction", "kind_a", "kind_b", "is_catch")
)
_TOKENS = ("query_video", "query_music", "a_video", "a_music", "b_video", "b_music")
_Q, _R, _P = Question._meta.db_table, Response._meta.db_table, Pair._meta.db_table
SUBJECT_SQL = f"""
    SELECT {_SUBJECT.sql}, {_STUDY.sql}
    FROM {Subject._meta.db_table} s JOIN {Study._meta.db_table} t ON t.id = s.study_id
    WHERE s.token = %s"""
# The plan's state (questions, answered, the first unanswered position) with the questions
# around that position and their media tokens: the one before (a change of direction starts
# a block) and two after (the next question, and the one it prefetches once this is answered).
# Responses are matched by subject too, so that no plan reads other subjects' answers (one
# made while the table was small and unanalysed would scan all of them).
STEP_SQL = f"""
    WITH progress AS (
        SELECT COUNT(q.id) AS total, COUNT(r.id) AS answered,
            MIN(CASE WHEN r.id IS NULL THEN q.position END) AS current_position
        FROM {_Q} q LEFT JOIN {_R} r ON r.question_id = q.id AND r.subject_id = %s
        WHERE q.subject_id = %s)
    SELECT p.total, p.answered, p.current_position, {_QUESTION.sql},
        {", ".join(f"n.{name}" for name in _TOKENS)}
    FROM progress p LEFT JOIN (
        SELECT q.*, pq.video_token AS query_video, pq.music_token AS query_music,
            pa.video_token AS a_video, pa.music_token AS a_music,
            pb.video_token AS b_video, pb.music_token AS b_music
        FROM {_Q} q
            JOIN {_P} pq ON pq.id = q.query_id
            JOIN {_P} pa ON pa.id = q.option_a_id
            JOIN {_P} pb ON pb.id = q.option_b_id
        WHERE q.subject_id = %s
    ) n ON n.position BETWEEN p.current_position - 1 AND p.current_position + 2"""


_ANSWER = [
    Response._meta.get_field(name)
    for name in (
        "question", "subject", "choice", "chosen_kind", "response_ms", "behaviour", "answered_at"
    )
]  # fmt: skip
# The fields' own conversions (`get_db_prep_save`), without the ORM's per-call SQL compiling.
INSERT_ANSWER_SQL = f"""
    INSERT INTO {_R} ({", ".join(field.column for field in _ANSWER)})
    VALUES ({", ".join(["%s"] * len(_ANSWER))})"""


def subject_with_study(token: str, lock: bool = False) -> Subject:
    """The subject behind `token` with its study, in one query (404 if none). With `lock`,
    the subject's row (not its study's: subjects answer in parallel) stays locked until the
    transaction ends, so that its current step is decided once at a time."""
    sql = SUBJECT_SQL
    if lock and connection.features.has_select_for_update:
        sql += " FOR UPDATE OF s" if connection.features.has_select_for_update_of else " FOR UPDATE"
    with connection.cursor() as cursor:
        cursor.execute(sql, [token])
        row = cursor.fetchone()
    if row is None:
        raise Http404("No such subject.")
    subject = _SUBJECT.instance(row[: len(_SUBJECT)])
    subject.study = _STUDY.instance(row[len(_SUBJECT) :])
    return subject


def current_step(subject: Subject) -> Step:
    """The subject's current step, in one query (every page and answer asks): the current
    question is the first unanswered one."""
    with connection.cursor() as cursor:
        cursor.execute(STEP_SQL, [subject.pk] * 3)
        rows = cursor.fetchall()
    total, answered, current = rows[0][:3]
    if subject.outcome in ENDED:
        return Step("ended", answered=answered, total=total)
    if subject.completed_at or (total and current is None):
        return Step("done", answered=answered, total=total)
    if subject.study.status != Study.Status.OPEN or not total:
        return Step("closed", answered=answered, total=total)
    if subject.consented_at is None:
        return Step("welcome", answered=answered, total=total)
    if subject.study.sound_check and "passed" not in subject.meta.get("sound_check", {}):
        return Step("sound", answered=answered, total=total)
    nearby = {}
    for row in rows:
        question = _QUESTION.instance(row[3 : 3 + len(_QUESTION)])
        question.media_tokens = dict(zip(_TOKENS, row[3 + len(_QUESTION) :], strict=True))
        nearby[question.position] = question
    return _question_step(subject, nearby, current, answered, total)


def _question_step(subject: Subject, nearby: dict, position: int, answered: int, total: int):
    """The question at `position`, or the break before it where it starts a block."""
    question, previous = nearby[position], nearby.get(position - 1)
    starts_block = previous is not None and previous.direction != question.direction
    passed = subject.meta.get("steps", {})
    name = "break" if starts_block and break_key(question) not in passed else "question"
    following = nearby.get(position + 1)
    return Step(name, question, answered, total, following=following, nearby=nearby)


def subject_path(subject: Subject) -> str:
    return reverse("subject", args=[subject.token])


# --- The subject's page ------------------------------------------------------------------


@never_cache
@csrf_exempt  # the link's secret token is the credential; a cross-site POST is refused below
@require_http_methods(["GET", "HEAD", "POST"])
def subject_page(request, token):
    """A subject's current step, and its answers. Needs no cookie: inside MTurk's frame, a
    browser that blocks third-party cookies (Safari, private windows) takes part too. A
    cookie would add nothing against forged requests here: whoever can forge one knows the
    token, and with it can answer anyway; posts from other sites are refused by `Origin`."""
    if request.method == "POST":
        if not _same_origin(request):
            raise PermissionDenied("a POST from another site")
        return _subject_post(request, token)
    subject = subject_with_study(token)
    _capture_external_id(request, subject)
    now = timezone.now()
    if _stale(subject.last_seen, now):
        Subject.objects.filter(pk=subject.pk).update(last_seen=now)
    return _render_step(request, subject, current_step(subject))


def _same_origin(request) -> bool:
    """Whether the POST comes from this site's pages (browsers send `Origin` with every POST;
    a client that sends none, a script, is no browser another site could drive)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin in {f"{request.scheme}://{request.get_host()}", *settings.CSRF_TRUSTED_ORIGINS}


def _stale(last_seen, now) -> bool:
    return last_seen is None or (now - last_seen).total_seconds() > LAST_SEEN_EVERY_S


def _subject_post(request, token):
    """Apply the POST, then redirect to the subject's page; or, for the page's script
    (`Accept: application/json`), answer with the next step at once (see `_step_json`)."""
    action = request.POST.get("step", "answer")
    form = AnswerForm(request.POST) if action == "answer" else None
    if form is not None and not form.is_valid():
        # An unknown token: 404. Else the error page in the study's language.
        language = get_object_or_404(
            Subject.objects.values_list("study__language", flat=True), token=token
        )
        with translation.override(language):
            context = {"retry_url": reverse("subject", args=[token])}
            return render(request, "400.html", context, status=400)
    following = None
    try:
        with transaction.atomic():
            subject = subject_with_study(token, lock=True)
            step = following = current_step(subject)
            now = timezone.now()
            changed = _apply(request, subject, step, action, form, now)
            if isinstance(changed, HttpResponse):
                return changed
            if step.name == "question" and changed is not STALE:
                following = step.after_answer(subject)
            if changed or _stale(subject.last_seen, now):
                subject.last_seen = now
                subject.save(update_fields=[*changed, "last_seen"])
    except IntegrityError:
        following = None  # answered in the meantime, outside the lock: the first answer stands
    if "application/json" in request.headers.get("Accept", ""):
        return JsonResponse(_step_json(subject, following))
    return redirect(subject_path(subject))


def _step_json(subject: Subject, step: Step | None) -> dict:
    """What the question page's script needs to show the next question in place; any other
    step (or one not known here) is the subject's page to load."""
    reply = {"step": step.name if step else "unknown", "location": subject_path(subject)}
    if step and step.name == "question":
        question = step.question
        query, a, b = _media_urls(question)
        reply |= {
            "position": question.position,
            "direction": question.direction,
            "answered": step.answered,
            "total": step.total,
            "media": {"query": query, "a": a, "b": b},
            "prefetch": _media_urls(step.following) if step.following else [],
        }
    return reply


def _apply(request, subject: Subject, step: Step, action: str, form, now):
    """Carry out a POST on the locked subject: the names of the fields it changed, or the
    page to show instead (a form with errors, the closed page)."""
    if step.name == "welcome" and action == "start":
        start = StartForm(request.POST, require_consent=subject.study.require_consent)
        if not start.is_valid():
            return _render_step(request, subject, step, start_form=start)
        subject.consented_at = now
        subject.meta.pop(JOINED_FROM, None)  # needed no longer
        return ["consented_at", "meta"]
    if step.name == "welcome" and action == "decline" and subject.study.require_consent:
        if request.POST.get("confirm") != "1":  # one stray tap must not end the study
            return _render_step(request, subject, step, confirm_decline=True)
        subject.outcome = Subject.Outcome.NO_CONSENT
        return ["outcome"]
    if step.name == "sound" and action == "sound":
        trials = _sound_trials(subject)
        sound = SoundCheckForm(request.POST, trials=len(trials))
        if not sound.is_valid():
            return _render_step(request, subject, step, sound_form=sound)
        result = checks.score_sound_check(trials, sound.answers())
        subject.meta["sound_check"] = {**result, "at": now.isoformat()}
        if not result["passed"]:
            subject.outcome = Subject.Outcome.FAILED_SOUND
        return ["meta", "outcome"]
    if step.name == "break" and action == "continue" and _names(request, step):
        subject.meta.setdefault("steps", {})[break_key(step.question)] = now.isoformat()
        return ["meta"]
    if step.name == "question" and form and _names(request, step):
        _record(subject, step, form.cleaned_data)
        changed = []
        if step.question.is_catch:
            subject.catch_score = checks.catch_score(subject)
            changed.append("catch_score")
        if step.answered + 1 == step.total:
            # Committed with the last answer, before any page can send the subject away.
            subject.completed_at = now
            subject.outcome = checks.final_outcome(subject.study, subject.catch_score)
            changed += ["completed_at", "outcome"]
        return changed
    if step.name == "closed":
        return _render_step(request, subject, step)
    return STALE  # a stale or repeated POST: nothing to do but show the current step


def _names(request, step: Step) -> bool:
    """Whether the POST is for the current question (not an earlier tab's or Back page's)."""
    return request.POST.get("position") == str(step.question.position)


def _record(subject: Subject, step: Step, answer: dict) -> None:
    # No savepoint: under the subject's lock the question is unanswered; should another
    # writer have answered it anyway, the unique constraint fails the whole transaction.
    question = step.question
    values = (
        question.pk,
        subject.pk,
        answer["choice"],
        question.kind_a if answer["choice"] == "a" else question.kind_b,
        answer["response_ms"],
        answer["behaviour"],
        timezone.now(),
    )
    params = [f.get_db_prep_save(v, connection) for f, v in zip(_ANSWER, values, strict=True)]
    with connection.cursor() as cursor:
        cursor.execute(INSERT_ANSWER_SQL, params)


def _sound_trials(subject: Subject) -> list[list[str]]:
    """The subject's sound-check trials, drawn once and stored at once: locked, so that two
    tabs score one draw and what another request wrote to `meta` (a new MTurk assignment)
    stays."""
    if "trials" not in subject.meta.get("sound_check", {}):
        with transaction.atomic():
            locked = Subject.objects.select_for_update().get(pk=subject.pk)
            check = locked.meta.setdefault("sound_check", {})
            if "trials" not in check:
                check["trials"] = checks.new_sound_trials()
                locked.save(update_fields=["meta"])
        subject.meta = locked.meta
    return subject.meta["sound_check"]["trials"]


def external_id_from(request, study: Study) -> str:
    """The participant's id on the recruiting platform: the study's parameter, else
    Prolific's or MTurk's where the link carries one."""
    names = (study.external_id_param,) if study.external_id_param else ()
    for name in (*names, *EXTERNAL_ID_PARAMS):
        if value := _storable(request.GET.get(name, "")).strip()[:500]:
            return value
    return ""


def entry_params(request) -> dict:
    return {k: _storable(request.GET[k])[:500] for k in ENTRY_PARAMS if request.GET.get(k)}


def _storable(value: str) -> str:
    """A link's value as given, less NUL characters (PostgreSQL text and jsonb refuse them)."""
    return value.replace("\x00", "")


def _capture_external_id(request, subject: Subject) -> None:
    """Keep the platform's ids from the link: the first visit's values stand, except an MTurk
    assignment's, which the latest visit's replace (a worker back through another assignment
    of the HIT must submit that one: MTurk refuses a returned or expired assignment)."""
    value = external_id_from(request, subject.study)
    entry = entry_params(request)
    stored = subject.meta.get("entry", {})
    if (not value or subject.external_id) and _merged_entry(stored, entry) == stored:
        return
    with transaction.atomic():
        locked = Subject.objects.select_for_update().get(pk=subject.pk)
        locked.external_id = locked.external_id or value
        locked.meta["entry"] = _merged_entry(locked.meta.get("entry", {}), entry)
        locked.save(update_fields=["external_id", "meta"])
    subject.external_id, subject.meta = locked.external_id, locked.meta


MTURK_ASSIGNMENT = ("assignmentId", "hitId", "turkSubmitTo")


def _merged_entry(stored: dict, entry: dict) -> dict:
    merged = {**entry, **stored}
    if entry.get("assignmentId", checks.MTURK_PREVIEW) != checks.MTURK_PREVIEW:
        merged.update({k: entry[k] for k in MTURK_ASSIGNMENT if k in entry})
    return merged


def _render_step(
    request, subject: Subject, step: Step, start_form=None, sound_form=None, confirm_decline=False
):
    study = subject.study
    context = {"subject": subject, "study": study, "step": step, "action": subject_path(subject)}
    if step.name == "welcome":
        context["form"] = start_form or StartForm(require_consent=study.require_consent)
        context["confirm_decline"] = confirm_decline
    elif step.name == "sound":
        trials = _sound_trials(subject)  # kept: the answers are scored against them
        form = context["form"] = sound_form or SoundCheckForm(trials=len(trials))
        # Per trial: its tones, the answer already given (kept when the form comes back), and
        # whether it is the one missing.
        context["trials"] = [
            (t, [(s, reverse("tone", args=[subject.token, t, s])) for s in (1, 2, 3)],
             form.data.get(f"t{t}", ""), f"t{t}" in form.errors)
            for t in range(1, len(trials) + 1)
        ]  # fmt: skip
        context["missing"] = [t for t, *_, missing in context["trials"] if missing]
    elif step.name in ("done", "ended"):
        context["code"] = checks.end_code(subject)
        context["mturk"] = checks.mturk_submit(subject)
        # A HIT is finished by submitting it to MTurk, not by leaving for another page.
        context["redirect_url"] = "" if context["mturk"] else checks.end_redirect(subject)
        context["onward_after_s"] = ONWARD_AFTER_S
    elif step.name == "question":
        context.update(_question_context(subject, step))
    elif step.name == "break":
        context["video_query"] = step.question.direction == Direction.V2M
        context["prefetch"] = _media_urls(step.question)
    status = 403 if step.name == "closed" else 200
    with translation.override(study.language):
        return render(request, f"experiments/{step.name}.html", context, status=status)


def _question_context(subject: Subject, step: Step) -> dict:
    question, following = step.question, step.following
    video_query = question.direction == Direction.V2M
    urls = _media_urls(question)
    return {
        "question": question,
        "load_timeout_ms": LOAD_TIMEOUT_MS,
        "number": question.position,
        "video_query": video_query,
        "query_url": urls[0],
        "candidates": [("a", urls[1]), ("b", urls[2])],
        "prefetch": _media_urls(following) if following else [],
    }


def _media_urls(question: Question) -> list[str]:
    """[query, a, b] media URLs of a question read by `current_step` (tokens included)."""
    query, candidates = (
        ("video", "music") if question.direction == Direction.V2M else ("music", "video")
    )
    names = (f"query_{query}", f"a_{candidates}", f"b_{candidates}")
    return [reverse("media", args=[question.media_tokens[name]]) for name in names]


# --- Joining through a study's public link -----------------------------------------------


@never_cache
@require_GET
def join(request, join_token):
    """Create a subject on demand (up to the cap); a returning participant resumes.

    A participant is recognised by the study's external-id parameter (e.g. PROLIFIC_PID)
    or, without one, by the session cookie, so refreshing the join link creates nobody new.
    """
    study = get_object_or_404(Study, join_token=join_token)
    external_id = external_id_from(request, study)
    if request.GET.get("assignmentId") == checks.MTURK_PREVIEW:
        return _study_page(request, study, "preview", status=200)
    session_key = f"join:{study.pk}"
    with transaction.atomic():
        study = Study.objects.select_for_update().get(pk=study.pk)
        if external_id:
            subject = study.subjects.filter(external_id=external_id).order_by("pk").first()
            if subject is not None and not _same_submission(request, subject, session_key):
                return _study_page(request, study, "taken", status=403)
        else:
            subject = study.subjects.filter(token=request.session.get(session_key, "")).first()
        if subject is None:
            if study.status != Study.Status.OPEN:
                return _study_page(request, study, "closed", status=403)
            # Not those of made links, nor those screened out before any question (declined
            # consent, failed the sound check): a platform sends someone else in their place;
            # nor those who never started within JOIN_HOLD (a link preview, a mail scanner,
            # someone who closed the tab): they would fill a study nobody takes part in.
            joined = (
                study.subjects.filter(meta__has_key=JOINED)
                .exclude(outcome__in=ENDED)
                .filter(
                    Q(consented_at__isnull=False) | Q(created_at__gte=timezone.now() - JOIN_HOLD)
                )
            )
            if study.join_cap is not None and joined.count() >= study.join_cap:
                return _study_page(request, study, "full", status=403)
            joined_from = _address_key(request)
            if joined_from and _too_many_unstarted(study, joined_from):
                busy = _study_page(request, study, "busy", status=429)
                busy["Retry-After"] = "60"
                return busy
            try:
                meta = {JOINED: True, "entry": entry_params(request), JOINED_FROM: joined_from}
                subject = create_subject(study, external_id=external_id, meta=meta)
            except PlanError:  # cannot happen to a prepared study; a participant sees "closed"
                logger.exception("join: no plan for a subject of %s", study.slug)
                return _study_page(request, study, "closed", status=503)
    _capture_external_id(request, subject)  # a returning worker's new assignment
    request.session[session_key] = subject.token
    return redirect(subject_path(subject))


def _address_key(request) -> str:
    """The client's address as a keyed hash ("" without one): enough to count one address's
    subjects, not to tell the address."""
    address = client_address(request)
    return salted_hmac("experiments.join", address).hexdigest()[:16] if address else ""


def _too_many_unstarted(study: Study, joined_from: str) -> bool:
    """Whether JOIN_UNSTARTED_PER_ADDRESS subjects joined `study` from `joined_from` within
    JOIN_HOLD and have not started (declined ones too). A lab's participants behind one
    address start within a minute of joining, which takes them out of the count."""
    limit = settings.JOIN_UNSTARTED_PER_ADDRESS
    unstarted = study.subjects.filter(
        consented_at__isnull=True,
        created_at__gte=timezone.now() - JOIN_HOLD,
        **{f"meta__{JOINED_FROM}": joined_from},
    )
    return limit > 0 and unstarted.count() >= limit


def _same_submission(request, subject: Subject, session_key: str) -> bool:
    """Whether a join link naming `subject`'s id comes from that participant: their own
    browser (the session), or the platform's submission they joined with (Prolific's
    SESSION_ID, which only they know; an id alone is no secret, and would hand their questions
    to anyone who knows it). Without a submission to compare, the id is taken at its word."""
    if request.session.get(session_key) == subject.token:
        return True
    joined_as = subject.meta.get("entry", {}).get("SESSION_ID")
    return not joined_as or request.GET.get("SESSION_ID") == joined_as


def _study_page(request, study: Study, name: str, status: int):
    with translation.override(study.language):
        return render(request, f"experiments/{name}.html", {"study": study}, status=status)


# --- Media -------------------------------------------------------------------------------


@require_http_methods(["GET", "HEAD"])
def tone(request, token, trial, slot):
    """One tone of a subject's sound check, named by trial and slot only."""
    subject = get_object_or_404(Subject, token=token)
    trials = subject.meta.get("sound_check", {}).get("trials", [])
    if not (1 <= trial <= len(trials) and 1 <= slot <= 3):
        raise Http404("No such tone.")
    response = HttpResponse(checks.tone_wav(trials[trial - 1][slot - 1]), content_type="audio/wav")
    response["Cache-Control"] = "private, no-transform"
    return response


CONTENT_TYPES = {".mp4": "video/mp4", ".m4a": "audio/mp4", ".mp3": "audio/mpeg"}
RANGE = re.compile(r"^bytes=(\d{0,18})-(\d{0,18})$")  # longer: not a size, ignored
CHUNK = 64 * 1024


@require_http_methods(["GET", "HEAD"])
def media(request, media_token):
    """A video or music item behind an opaque token, with HTTP Range support.

    Only items of a collection with an open study are served (staff may preview any).
    The response says nothing about the pair, the item's modality role or its kind.
    """
    pairs = Pair.objects.filter(Q(video_token=media_token) | Q(music_token=media_token))
    if not (request.user.is_active and request.user.is_staff):
        pairs = pairs.filter(collection__studies__status=Study.Status.OPEN)
    pair = pairs.first()
    if pair is None:
        raise Http404("No such media item.")
    field = pair.video_file if pair.video_token == media_token else pair.music_file
    if not field:
        raise Http404("No such media item.")
    try:
        path = field.path
        stat = os.stat(path)
    except (OSError, NotImplementedError) as error:
        raise Http404("No such media item.") from error
    extension = os.path.splitext(path)[1].lower()
    content_type = CONTENT_TYPES.get(extension, "application/octet-stream")
    return ranged_file_response(request, path, stat, content_type)


def ranged_file_response(request, path: str, stat: os.stat_result, content_type: str):
    """A file response that honours one `Range: bytes=…` (what media elements send).

    Several ranges, or a Range with a stale If-Range, get the whole file, as RFC 9110 allows.
    """
    size = stat.st_size
    # Opaque: a file's time would tie a query to its ground truth (a pair's files are written
    # together), so neither an ETag made of it nor Last-Modified is sent.
    version = f"{path}:{stat.st_mtime_ns}:{size}:{settings.SECRET_KEY}".encode()
    etag = f'"{hashlib.blake2b(version, digest_size=12).hexdigest()}"'
    if request.headers.get("If-None-Match") == etag:
        return HttpResponseNotModified(headers={"ETag": etag})
    start, end = 0, size - 1
    status = 200
    spec = request.headers.get("Range", "")
    if_range = request.headers.get("If-Range")
    match = RANGE.match(spec.strip()) if spec and (if_range in (None, etag)) else None
    if match and (match[1] or match[2]):
        first, last = match[1], match[2]
        if first:
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
        else:  # a suffix: the last N bytes
            start = max(size - int(last), 0)
        if start >= size or start > end:
            response = HttpResponse(status=416, content_type=content_type)
            response["Content-Range"] = f"bytes */{size}"
            response["Accept-Ranges"] = "bytes"
            return response
        status = 206
    length = end - start + 1
    body = [] if request.method == "HEAD" else _read(path, start, length)
    response = StreamingHttpResponse(body, status=status, content_type=content_type)
    response["Content-Length"] = str(length)
    response["Accept-Ranges"] = "bytes"
    response["ETag"] = etag
    response["Cache-Control"] = "private, max-age=86400"
    if status == 206:
        response["Content-Range"] = f"bytes {start}-{end}/{size}"
    return response


def _read(path: str, start: int, length: int):
    with open(path, "rb") as file:
        file.seek(start)
        while length > 0:
            chunk = file.read(min(CHUNK, length))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk
