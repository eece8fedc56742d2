"""The participant pages through Django's test client: the server decides what is current."""

import importlib
import json
import re

import pytest
from django.test import Client, override_settings
from django.urls import reverse

from experiments.models import Response, Study, Subject

from .factories import make_study, make_subject, without_random_tokens

pytestmark = pytest.mark.django_db

PER_TYPE = 1  # 3 questions per block, 6 in all


@pytest.fixture
def study():
    return make_study(per_type=PER_TYPE, completion_code="C0DE42", language="en")


@pytest.fixture
def subject(study):
    return make_subject(study)


def url(subject):
    return reverse("subject", args=[subject.token])


def start(client, subject):
    return client.post(url(subject), {"step": "start", "consent": "1"})


def answer(client, subject, position, choice="a", **extra):
    return client.post(url(subject), {"choice": choice, "position": position, **extra})


def shown_position(client, subject) -> int | None:
    """The question number the subject's page shows now (None when it shows no question)."""
    html = client.get(url(subject)).content.decode()
    match = re.search(r'name="position" value="(\d+)"', html)
    return int(match[1]) if match and 'name="choice"' in html else None


def test_welcome_page_then_start_shows_the_first_question(client, study, subject):
    study.instructions = "Listen carefully to every clip."
    study.save()
    page = client.get(url(subject))
    html = page.content.decode()
    assert page.status_code == 200
    assert '<html lang="en"' in html
    assert "Listen carefully to every clip." in html
    assert 'value="start"' in html and "Start" in html
    assert page["Cache-Control"].startswith("max-age=0")

    response = start(client, subject)
    assert response.status_code == 302 and response["Location"] == url(subject)
    subject.refresh_from_db()
    assert subject.consented_at is not None
    assert shown_position(client, subject) == 1


def test_required_consent_must_be_ticked(client, study, subject):
    study.require_consent, study.consent_text = True, "You may stop at any time."
    study.save()
    page = client.post(url(subject), {"step": "start"})
    assert page.status_code == 200
    assert "Please tick the box" in page.content.decode()
    subject.refresh_from_db()
    assert subject.consented_at is None
    assert start(client, subject).status_code == 302
    assert shown_position(client, subject) == 1


def test_question_page_contract_and_no_leaks(client, study, subject):
    start(client, subject)
    html = client.get(url(subject)).content.decode()
    assert "Question 1 of 6" in html
    assert re.search(r'<progress value="0" max="6"', html)
    assert re.search(r'<button type="submit" name="choice" value="a"', html)
    assert re.search(r'<button type="submit" name="choice" value="b"', html)
    assert '<input type="hidden" name="position" value="1">' in html
    # The first block is video → music: a muted video query, two music candidates.
    assert re.search(r"<video [^>]*data-role=\"query\"[^>]*muted", html)
    assert len(re.findall(r"<audio [^>]*data-role=\"[ab]\"", html)) == 2
    # Media only through opaque tokens; no pair keys, titles or pair types on the page.
    question = subject.questions.get(position=1)
    pairs = [question.query, question.option_a, question.option_b]
    assert f"/m/{question.query.video_token}" in html
    assert f"/m/{question.option_a.music_token}" in html
    visible = without_random_tokens(html, subject)
    for pair in pairs:
        assert pair.key not in visible and pair.title not in visible
        assert pair.video_file.name not in visible and pair.music_file.name not in visible
    assert not re.search(r"\b(GR|GS|SR|ground|random|pair_type)\b", visible, re.IGNORECASE)
    # The next question's media are prefetched.
    following = subject.questions.get(position=2)
    assert f'<link rel="prefetch" href="/m/{following.query.video_token}">' in html
    assert "<script>" not in html and " style=" not in html and "onclick" not in html


def test_an_answer_is_stored_and_the_next_question_shown(client, study, subject):
    start(client, subject)
    behaviour = json.dumps({"plays": {"a": 1, "b": 2}})
    response = answer(client, subject, 1, "b", response_ms="2345", behaviour=behaviour)
    assert response.status_code == 302 and response["Location"] == url(subject)
    stored = Response.objects.get()
    question = subject.questions.get(position=1)
    assert stored.question == question and stored.choice == "b"
    assert stored.chosen_kind == question.kind_b
    assert stored.response_ms == 2345
    assert stored.behaviour == {"plays": {"a": 1, "b": 2}}
    subject.refresh_from_db()
    assert subject.last_seen is not None and subject.completed_at is None
    assert shown_position(client, subject) == 2


@pytest.mark.parametrize(
    ("response_ms", "behaviour"),
    [("", ""), ("abc", "not json"), ("-5", "[1, 2]"), ("9" * 30, "{" * 3000), ("1e3", "NaN")],
)
def test_script_fields_are_parsed_defensively(client, subject, response_ms, behaviour):
    start(client, subject)
    answer(client, subject, 1, response_ms=response_ms, behaviour=behaviour)
    stored = Response.objects.get()
    assert stored.response_ms is None and stored.behaviour == {}


def test_reopening_the_link_resumes_at_the_first_unanswered_question(client, subject):
    start(client, subject)
    answer(client, subject, 1)
    answer(client, subject, 2)
    other_browser = Client()
    assert shown_position(other_browser, subject) == 3


def test_a_repeated_post_changes_nothing(client, subject):
    start(client, subject)
    first = answer(client, subject, 1, "a")
    again = answer(client, subject, 1, "b")
    assert first.status_code == again.status_code == 302
    assert again["Location"] == url(subject)
    assert Response.objects.count() == 1
    assert Response.objects.get().choice == "a"
    assert shown_position(client, subject) == 2


def test_a_stale_post_for_an_earlier_question_changes_nothing(client, subject):
    start(client, subject)
    answer(client, subject, 1, "a")
    answer(client, subject, 2, "a")
    stale = answer(client, subject, 1, "b")  # Back button, or a second tab
    assert stale.status_code == 302 and stale["Location"] == url(subject)
    assert list(Response.objects.order_by("question__position").values_list("choice")) == [
        ("a",),
        ("a",),
    ]
    ahead = answer(client, subject, 5, "b")  # a question not yet reached
    assert ahead.status_code == 302
    assert Response.objects.count() == 2
    assert shown_position(client, subject) == 3


def test_an_answer_before_start_changes_nothing(client, subject):
    assert answer(client, subject, 1).status_code == 302
    assert Response.objects.count() == 0
    assert shown_position(client, subject) is None


@pytest.mark.parametrize(
    "data",
    [
        {"choice": "c", "position": "1"},
        {"choice": "", "position": "1"},
        {"choice": "A", "position": "1"},
        {"position": "1"},
        {"choice": "a"},
        {"choice": "a", "position": "one"},
        {"choice": "a", "position": "0"},
        {"choice": "a", "position": "99999999"},
        {},
    ],
)
def test_an_invalid_answer_is_refused_with_nothing_written(client, subject, data):
    start(client, subject)
    subject.refresh_from_db()
    before = subject.last_seen
    response = client.post(url(subject), data)
    assert response.status_code == 400
    assert Response.objects.count() == 0
    subject.refresh_from_db()
    assert subject.last_seen == before


def test_unknown_tokens_are_not_found(client, subject):
    assert client.get("/s/not-a-token/").status_code == 404
    assert client.post("/s/not-a-token/", {"choice": "a", "position": 1}).status_code == 404
    assert client.get(reverse("media", args=["0" * 32])).status_code == 404
    assert client.get("/join/not-a-token/").status_code == 404


def test_a_subject_token_gives_access_to_that_subject_only(client, study, subject):
    other = make_subject(study)
    start(client, subject)
    answer(client, subject, 1)
    assert shown_position(client, other) is None  # the other one is still at its welcome
    assert Response.objects.filter(subject=other).count() == 0


def test_a_break_separates_the_blocks(client, subject):
    start(client, subject)
    for position in (1, 2, 3):
        answer(client, subject, position)
    html = client.get(url(subject)).content.decode()
    assert "Time for a short break" in html and 'value="continue"' in html
    assert 'name="choice"' not in html
    assert "3 of 6 answered" in html
    # An answer for question 4 while the break is current is stale: nothing changes.
    assert answer(client, subject, 4).status_code == 302
    assert Response.objects.count() == 3
    client.post(url(subject), {"step": "continue", "position": "4"})
    html = client.get(url(subject)).content.decode()
    assert "Question 4 of 6" in html
    assert "Which video suits this music better?" in html
    assert re.search(r"<audio [^>]*data-role=\"query\"", html)
    assert len(re.findall(r"<video [^>]*data-role=\"[ab]\"[^>]*muted", html)) == 2
    # Continuing twice is harmless.
    assert client.post(url(subject), {"step": "continue", "position": "4"}).status_code == 302
    assert shown_position(client, subject) == 4


def answer_in_place(client, subject, position, choice="a"):
    """The question page's script: the answer in one request, the next step as JSON."""
    response = client.post(
        url(subject),
        {"choice": choice, "position": position},
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 200 and response["Content-Type"] == "application/json"
    return response.json()


def page_media(client, subject) -> tuple[list[str], list[str]]:
    """The media URLs (query, a, b) and the prefetched ones of the page shown now."""
    html = client.get(url(subject)).content.decode()
    shown = [
        re.search(rf'<(?:audio|video) src="([^"]+)" data-role="{role}"', html)[1]
        for role in ("query", "a", "b")
    ]
    return shown, re.findall(r'<link rel="prefetch" href="([^"]+)">', html)


def test_the_script_answers_in_one_request_and_gets_the_next_question(client, study, subject):
    start(client, subject)
    after_first = answer_in_place(client, subject, 1, "b")
    assert Response.objects.get().choice == "b"
    shown, prefetched = page_media(client, subject)  # what a page load would show now
    assert after_first == {
        "step": "question",
        "location": url(subject),
        "position": 2,
        "direction": "V2M",
        "answered": 1,
        "total": 6,
        "media": dict(zip(("query", "a", "b"), shown, strict=True)),
        "prefetch": prefetched,
    }
    # A double click or a Back re-post: nothing written, the current question again.
    assert answer_in_place(client, subject, 1, "a") == after_first
    assert answer_in_place(client, subject, 2)["position"] == 3
    assert Response.objects.count() == 2

    # The block's end, the break and the last answer are pages to load.
    assert answer_in_place(client, subject, 3) == {"step": "break", "location": url(subject)}
    assert answer_in_place(client, subject, 4) == {"step": "break", "location": url(subject)}
    client.post(url(subject), {"step": "continue", "position": "4"})
    assert answer_in_place(client, subject, 4)["direction"] == "M2V"
    answer_in_place(client, subject, 5)
    assert answer_in_place(client, subject, 6) == {"step": "done", "location": url(subject)}
    subject.refresh_from_db()
    assert subject.completed_at is not None
    assert Response.objects.count() == 6


def test_the_script_gets_errors_as_pages(client, subject):
    """A refused answer is the same 4xx page as without the script (which then submits the
    form plainly to show it)."""
    start(client, subject)
    json_accept = {"Accept": "application/json"}
    refused = client.post(url(subject), {"choice": "c", "position": 1}, headers=json_accept)
    assert refused.status_code == 400
    assert Response.objects.count() == 0


def statements(queries) -> list[str]:
    """The captured queries less transaction control (BEGIN, COMMIT, savepoints)."""
    control = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")
    return [q["sql"] for q in queries if not q["sql"].lstrip().upper().startswith(control)]


def test_a_question_page_and_an_answer_each_take_a_few_queries(client, subject):
    """Without the page's script every answer is a POST and a GET (issue 8): 3 + 2
    statements, whatever the position; answers do not write the subject row, pages write
    last_seen once a minute."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    start(client, subject)
    for position in (1, 2):
        with CaptureQueriesContext(connection) as page:
            client.get(url(subject))
        with CaptureQueriesContext(connection) as posted:
            assert answer(client, subject, position).status_code == 302
        assert len(statements(page.captured_queries)) == 2, statements(page.captured_queries)
        # the subject (locked) with its study, its step (progress and questions), the answer
        assert len(statements(posted.captured_queries)) == 3, statements(posted.captured_queries)
        assert not any(q.startswith("UPDATE") for q in statements(posted.captured_queries))
    # With the page's script the answer is the only request, and no more work.
    with CaptureQueriesContext(connection) as in_place:
        assert answer_in_place(client, subject, 3)["step"] == "break"
    assert len(statements(in_place.captured_queries)) == 3, statements(in_place.captured_queries)


def finish(client, subject):
    start(client, subject)
    for position in range(1, 7):
        if position == 4:
            client.post(url(subject), {"step": "continue", "position": "4"})
        assert answer(client, subject, position, "ab"[position % 2]).status_code == 302


def test_the_done_page_shows_the_completion_code_and_redirects(client, study, subject):
    study.redirect_url = "https://app.prolific.com/submissions/complete?cc=C0DE42"
    study.save()
    finish(client, subject)
    assert Response.objects.filter(subject=subject).count() == 6
    subject.refresh_from_db()
    assert subject.completed_at is not None
    html = client.get(url(subject)).content.decode()
    assert "Thank you" in html and "C0DE42" in html
    # Onward after 20 s with the page's script (one may stay); the link alone without it.
    onward = 'href="https://app.prolific.com/submissions/complete?cc=C0DE42" id="continue"'
    assert onward in html and 'data-after-s="20"' in html and 'http-equiv="refresh"' not in html
    # Answers after the end change nothing.
    assert answer(client, subject, 6, "a").status_code == 302
    assert Response.objects.filter(subject=subject).count() == 6


def test_a_closed_study_shows_a_clear_page_and_takes_no_answers(client, study, subject):
    start(client, subject)
    study.status = Study.Status.CLOSED
    study.save()
    page = client.get(url(subject))
    assert page.status_code == 403 and "This study is not open" in page.content.decode()
    assert "Any answers you gave are saved" in page.content.decode()
    refused = answer(client, subject, 1)
    assert refused.status_code == 403
    assert Response.objects.count() == 0


def test_a_completed_subject_still_sees_the_code_after_closing(client, study, subject):
    finish(client, subject)
    study.status = Study.Status.CLOSED
    study.save()
    page = client.get(url(subject))
    assert page.status_code == 200 and "C0DE42" in page.content.decode()


def test_external_id_is_captured_on_entry(client, subject):
    client.get(url(subject) + "?PROLIFIC_PID=abc123")
    subject.refresh_from_db()
    assert subject.external_id == "abc123"
    client.get(url(subject) + "?PROLIFIC_PID=other")  # the first one stays
    subject.refresh_from_db()
    assert subject.external_id == "abc123"


# --- The public join link ------------------------------------------------------------------


def join_url(study, **params):
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return reverse("join", args=[study.join_token]) + (f"?{query}" if query else "")


def test_the_join_link_creates_a_subject_and_a_refresh_does_not(client, study):
    response = client.get(join_url(study))
    assert response.status_code == 302
    subject = Subject.objects.get()
    assert response["Location"] == url(subject)
    assert subject.questions.count() == 6
    assert client.get(join_url(study))["Location"] == url(subject)
    assert Subject.objects.count() == 1
    Client().get(join_url(study))  # another browser: another subject
    assert Subject.objects.count() == 2


def test_the_same_external_id_resumes_the_same_subject(study):
    first = Client().get(join_url(study, PROLIFIC_PID="p-1", STUDY_ID="s", SESSION_ID="x"))
    subject = Subject.objects.get()
    assert subject.external_id == "p-1"
    assert subject.meta["entry"] == {"PROLIFIC_PID": "p-1", "STUDY_ID": "s", "SESSION_ID": "x"}
    browser = Client()
    start(browser, subject)
    answer(browser, subject, 1)
    again = Client().get(join_url(study, PROLIFIC_PID="p-1", SESSION_ID="x"))  # another browser
    assert again["Location"] == first["Location"] == url(subject)
    assert Subject.objects.count() == 1
    assert shown_position(Client(), subject) == 2


def test_the_join_cap_is_respected(study):
    study.join_cap = 2
    study.save()
    for pid in ("a", "b"):
        assert Client().get(join_url(study, PROLIFIC_PID=pid)).status_code == 302
    full = Client().get(join_url(study, PROLIFIC_PID="c"))
    assert full.status_code == 403 and "This study is full" in full.content.decode()
    assert Subject.objects.count() == 2
    # Those already in still get back in.
    assert Client().get(join_url(study, PROLIFIC_PID="a")).status_code == 302


def test_the_join_cap_counts_only_those_who_came_by_the_join_link(study):
    make_subject(study)  # a personal link made in the admin
    make_subject(study)
    study.join_cap = 2
    study.save()
    for pid in ("a", "b"):
        assert Client().get(join_url(study, PROLIFIC_PID=pid)).status_code == 302
    assert Client().get(join_url(study, PROLIFIC_PID="c")).status_code == 403
    assert Subject.objects.count() == 4


def test_the_join_cap_does_not_count_those_screened_out(study):
    study.join_cap = 2
    study.require_consent = True
    study.save()
    for pid in ("a", "b"):
        assert Client().get(join_url(study, PROLIFIC_PID=pid)).status_code == 302
    declined = Subject.objects.get(external_id="a")
    declined.outcome = Subject.Outcome.NO_CONSENT
    declined.save()
    # "a" no longer holds a place: a replacement gets in, then the study is full again.
    assert Client().get(join_url(study, PROLIFIC_PID="c")).status_code == 302
    assert Client().get(join_url(study, PROLIFIC_PID="d")).status_code == 403
    assert Client().get(join_url(study, PROLIFIC_PID="a")).status_code == 302  # resumes
    assert Subject.objects.count() == 3


def test_a_join_that_cannot_be_planned_shows_the_closed_page_and_makes_nobody(study):
    study.per_type = 50  # more questions than the collection has queries (a changed design)
    study.save()
    page = Client().get(join_url(study, PROLIFIC_PID="a"))
    assert page.status_code == 503 and "This study is not open" in page.content.decode()
    assert Subject.objects.count() == 0


def test_joining_a_closed_study_shows_a_clear_page(study):
    study.status = Study.Status.CLOSED
    study.save()
    page = Client().get(join_url(study))
    assert page.status_code == 403 and "This study is not open" in page.content.decode()
    assert "answers you gave" not in page.content.decode()  # a newcomer gave none
    assert Subject.objects.count() == 0


# --- Media -----------------------------------------------------------------------------------


@pytest.fixture
def media(subject):
    pair = subject.questions.get(position=1).query
    return reverse("media", args=[pair.video_token]), pair.video_file.read()


def test_media_are_served_whole_and_by_range(client, media):
    path, data = media
    whole = client.get(path)
    assert whole.status_code == 200 and whole["Content-Type"] == "video/mp4"
    assert b"".join(whole.streaming_content) == data
    assert whole["Accept-Ranges"] == "bytes" and whole["Content-Length"] == str(len(data))
    assert "Content-Disposition" not in whole

    cases = {
        "bytes=0-99": (0, 99),
        "bytes=100-": (100, len(data) - 1),
        "bytes=-50": (len(data) - 50, len(data) - 1),
        f"bytes=10-{len(data) + 1000}": (10, len(data) - 1),
    }
    for spec, (first, last) in cases.items():
        part = client.get(path, headers={"Range": spec})
        assert part.status_code == 206, spec
        assert part["Content-Range"] == f"bytes {first}-{last}/{len(data)}"
        assert b"".join(part.streaming_content) == data[first : last + 1]
        assert part["Content-Length"] == str(last - first + 1)

    beyond = client.get(path, headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416 and beyond["Content-Range"] == f"bytes */{len(data)}"
    several = client.get(path, headers={"Range": "bytes=0-1,5-9"})  # served whole
    assert several.status_code == 200
    stale = client.get(path, headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert stale.status_code == 200
    head = client.head(path, headers={"Range": "bytes=0-9"})
    assert head.status_code == 206 and head["Content-Length"] == "10"
    cached = client.get(path, headers={"If-None-Match": whole["ETag"]})
    assert cached.status_code == 304


def test_media_of_a_study_that_is_not_open_are_not_served(client, study, media, admin_client):
    path, _ = media
    study.status = Study.Status.CLOSED
    study.save()
    assert client.get(path).status_code == 404
    assert admin_client.get(path).status_code == 200  # staff may preview


@pytest.mark.django_db(transaction=True)
def test_simultaneous_posts_for_one_question_store_one_answer():
    """A double click or two tabs: answers race for the same question; the first one wins."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection

    subject = make_subject(make_study(per_type=PER_TYPE))
    start(Client(), subject)

    def post(choice):
        try:
            return answer(Client(), subject, 1, choice).status_code
        finally:
            connection.close()  # each thread has its own connection

    with ThreadPoolExecutor(max_workers=6) as pool:
        codes = list(pool.map(post, "abababab"))
    assert codes == [302] * 8
    assert Response.objects.filter(subject=subject).count() == 1
    assert shown_position(Client(), subject) == 2


@pytest.mark.django_db
def test_subjects_who_joined_before_the_mark_still_count_toward_the_cap():
    """Migration 0004's data step, on subjects the join link made before it marked them (run
    on its own: migrating the schema back would drop the columns later migrations add)."""
    from django.apps import apps

    migration = importlib.import_module("experiments.migrations.0004_mark_joined_subjects")
    study = make_study(per_type=1)
    joined = make_subject(study, meta={"entry": {"PROLIFIC_PID": "old"}})
    linked = make_subject(study)
    migration.mark_joined(apps, None)
    joined.refresh_from_db()
    linked.refresh_from_db()
    assert joined.meta["joined"] is True and "joined" not in linked.meta
    Study.objects.filter(pk=study.pk).update(join_cap=1)
    assert Client().get(join_url(study, PROLIFIC_PID="new")).status_code == 403


# Browsers send `Origin` with every POST: only the site's own origin (its scheme too) and
# the origins configured as trusted may answer; one that merely resembles it may not.
def answer_from(client, subject, position, origin):
    data = {"choice": "a", "position": position}
    return client.post(url(subject), data, HTTP_ORIGIN=origin).status_code


@pytest.mark.parametrize(
    "origin", ["http://eviltestserver", "https://testserver", "http://testserver.evil", "null"]
)
def test_answers_posted_from_a_look_alike_origin_are_refused(study, subject, origin):
    client = Client(enforce_csrf_checks=True)
    start(client, subject)
    assert answer_from(client, subject, 1, origin) == 403
    assert not Response.objects.filter(subject=subject).exists()
    assert answer_from(client, subject, 1, "http://testserver") == 302
    assert Response.objects.filter(subject=subject).count() == 1


def test_answers_posted_from_a_trusted_origin_are_taken(study, subject):
    """Behind a proxy that serves the site under another name, as CSRF_TRUSTED_ORIGINS says."""
    client = Client(enforce_csrf_checks=True)
    start(client, subject)
    trusted = "https://study.example.org"
    assert answer_from(client, subject, 1, trusted) == 403  # not trusted without the setting
    with override_settings(CSRF_TRUSTED_ORIGINS=[trusted]):
        assert answer_from(client, subject, 1, trusted) == 302
    assert Response.objects.filter(subject=subject).count() == 1
