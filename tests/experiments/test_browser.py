"""One participant in real Chromium: start, answer part, close the browser, resume, finish.

Chromium as tests/browsers.py launches it (the `chromium` fixture).
Set SCREENSHOT_DIR to keep desktop and phone screenshots of a question page.
"""

import os
from pathlib import Path

import pytest

from experiments.models import Response

from .factories import make_study, make_subject

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def counter(page) -> str:
    return page.locator("#counter").inner_text()


def until(page, expression, timeout_ms=30_000):
    """Poll `expression` from here: the site's CSP forbids the eval that page.wait_for_function
    needs, and page.evaluate is not subject to it."""
    for _ in range(timeout_ms // 50):
        if page.evaluate(expression):
            return
        page.wait_for_timeout(50)
    raise AssertionError(f"still false after {timeout_ms} ms: {expression}")


def wait_for_media(page, state=2):
    """Every media element on the page has decoded its first frame (served, by range)."""
    until(
        page,
        f"Array.from(document.querySelectorAll('audio, video')).every(m => m.readyState >= {state})",
    )


def answerable(page):
    """The question on show has settled: its answer buttons take clicks and keys."""
    until(
        page, "Array.from(document.querySelectorAll('button[name=choice]')).every(b => !b.disabled)"
    )


def screenshot(page, name):
    if folder := os.environ.get("SCREENSHOT_DIR"):
        wait_for_media(page, state=4)
        # A frame from the middle of each video rather than the controls' loading spinner.
        page.evaluate(
            """Promise.all(Array.from(document.querySelectorAll('video')).map(v =>
                v.play().then(() => { v.pause(); v.currentTime = 0.7; })))"""
        )
        page.wait_for_timeout(300)
        page.screenshot(path=str(Path(folder) / name))


def test_a_participant_answers_leaves_resumes_and_finishes(chromium, live_server):
    study = make_study(
        per_type=1,
        completion_code="DONE-7",
        require_consent=True,
        consent_text="Your answers are stored without your name. You may stop at any time.",
    )
    subject = make_subject(study)
    link = f"{live_server.url}/s/{subject.token}/"

    # First visit: welcome, Start, two answers (a click, then a key).
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.goto(link)
    assert page.locator("html").get_attribute("lang") == "en"
    screenshot(page, "welcome.png")
    page.get_by_role("button", name="Start").click()  # not without consent
    assert page.get_by_role("button", name="Start").is_visible()
    page.get_by_label("I have read the information above and agree to take part.").check()
    page.get_by_role("button", name="Start").click()
    assert counter(page) == "Question 1 of 6"
    wait_for_media(page)
    page.get_by_role("button", name="Choose A").click()
    page.locator("#counter", has_text="Question 2 of 6").wait_for()  # shown in place
    assert page.url == link
    wait_for_media(page)
    screenshot(page, "question-desktop.png")
    answerable(page)
    page.keyboard.press("ArrowRight")
    page.locator("#counter", has_text="Question 3 of 6").wait_for()
    context.close()

    answers = list(Response.objects.filter(subject=subject).order_by("question__position"))
    assert [a.choice for a in answers] == ["a", "b"]
    assert all(a.response_ms is not None and a.response_ms > 0 for a in answers)
    assert all(set(a.behaviour) >= {"plays", "hidden", "blur"} for a in answers)

    # A fresh browser (no cookies) on a phone resumes at question 3.
    phone = chromium.new_context(
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    page = phone.new_page()
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(link)
    assert counter(page) == "Question 3 of 6"
    wait_for_media(page)
    screenshot(page, "question-phone.png")
    page.get_by_role("button", name="Choose B").click()

    # The break between the blocks, then the music → video block.
    page.get_by_role("heading", name="Time for a short break").wait_for()
    screenshot(page, "break.png")
    page.get_by_role("button", name="Continue").click()
    assert counter(page) == "Question 4 of 6"
    wait_for_media(page)
    # One candidate video plays at a time.
    playing = page.evaluate(
        """async () => {
            const [a, b] = ['a', 'b'].map(r => document.querySelector(`video[data-role=${r}]`));
            await a.play();
            await b.play();
            return {a: !a.paused, b: !b.paused};
        }"""
    )
    assert playing == {"a": False, "b": True}
    for key in ("a", "b", "a"):
        current = counter(page)
        answerable(page)
        page.keyboard.press(key)
        if current != "Question 6 of 6":
            page.locator(
                "#counter", has_text=f"Question {int(current.split()[1]) + 1} of 6"
            ).wait_for()

    page.get_by_role("heading", name="Thank you!").wait_for()
    assert page.locator("#completion-code").inner_text() == "DONE-7"
    screenshot(page, "done.png")
    phone.close()

    subject.refresh_from_db()
    assert subject.completed_at is not None
    positions = Response.objects.filter(subject=subject).values_list(
        "question__position", flat=True
    )
    assert sorted(positions) == [1, 2, 3, 4, 5, 6]
    assert errors == []


def first_question(chromium, live_server, **study_fields):
    """A fresh subject of a one-system study, on its first question (video → music: the
    candidates are <audio> players) with the media loaded; `page.errors` collects the
    script's errors."""
    subject = make_subject(make_study(per_type=1, **study_fields))
    page = chromium.new_context(viewport={"width": 1280, "height": 800}).new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(f"{live_server.url}/s/{subject.token}/")
    page.get_by_role("button", name="Start").click()
    assert counter(page) == "Question 1 of 6"
    wait_for_media(page)
    return page, subject


def answers(subject):
    return list(
        Response.objects.filter(subject=subject)
        .order_by("question__position")
        .values_list("question__position", "choice")
    )


def is_script_post(request) -> bool:
    """The script's answer request (the plain form submission asks for HTML)."""
    return request.method == "POST" and "application/json" in request.headers.get("accept", "")


def test_the_arrow_keys_in_a_candidate_player_are_the_players(chromium, live_server):
    """In an <audio> or <video> player ← and → seek; they must not answer. The key pressed
    next (a letter, which chooses anywhere) shows which answer went first: the server keeps
    the first answer to a question."""
    page, subject = first_question(chromium, live_server)
    answerable(page)
    page.focus("audio[data-role=a]")
    assert page.evaluate("document.activeElement.tagName") == "AUDIO"
    page.keyboard.press("ArrowRight")  # would be "Choose B" anywhere else
    page.keyboard.press("a")
    page.locator("#counter", has_text="Question 2 of 6").wait_for()
    assert answers(subject) == [(1, "a")]

    for number in (2, 3):
        answerable(page)
        page.keyboard.press("a")
        if number == 2:
            page.locator("#counter", has_text="Question 3 of 6").wait_for()
    page.get_by_role("button", name="Continue").click()
    assert counter(page) == "Question 4 of 6"  # music → video: the candidates are <video>s
    answerable(page)
    page.focus("video[data-role=b]")
    assert page.evaluate("document.activeElement.tagName") == "VIDEO"
    page.keyboard.press("ArrowLeft")  # would be "Choose A" anywhere else
    page.keyboard.press("b")
    page.locator("#counter", has_text="Question 5 of 6").wait_for()
    assert answers(subject) == [(1, "a"), (2, "a"), (3, "a"), (4, "b")]
    assert page.errors == []


def test_a_proxys_502_and_504_to_an_answer_are_tried_again_in_place(chromium, live_server):
    """Like its 503, a proxy's 502 and 504 mean a server restarting: the answer is sent again
    (the server takes it once) and the next question shown in place, not the plain form."""
    page, subject = first_question(chromium, live_server)
    failures = [502, 504]

    def gateway(route):
        if is_script_post(route.request) and failures:
            route.fulfill(status=failures.pop(0), content_type="text/html", body="Gateway")
        else:
            route.continue_()

    page.route("**/s/*/", gateway)
    loads = []
    page.on("framenavigated", lambda frame: loads.append(frame.url))
    page.get_by_role("button", name="Choose A").click()
    page.locator("#counter", has_text="Question 2 of 6").wait_for()
    assert failures == [] and loads == []  # both replies met, and no page load
    assert answers(subject) == [(1, "a")]
    assert page.errors == []


@pytest.mark.parametrize("status", [500, 403])
def test_an_answer_the_server_refuses_goes_plainly_at_once(chromium, live_server, status):
    """Only no reply and a proxy's gateway errors are tried again: any other error goes to the
    plain form submission after one request, and the server's page says what is wrong."""
    page, subject = first_question(chromium, live_server)
    fetches = []

    def refuse_once(route):
        if is_script_post(route.request):
            fetches.append(route.request.url)
            if len(fetches) == 1:
                route.fulfill(status=status, content_type="text/html", body="Refused")
                return
        route.continue_()

    page.route("**/s/*/", refuse_once)
    with page.expect_navigation(timeout=10_000):  # tried again, it would stay in place
        page.get_by_role("button", name="Choose A").click()
    assert counter(page) == "Question 2 of 6"  # the plain submission's answer
    assert len(fetches) == 1
    assert answers(subject) == [(1, "a")]
    assert page.errors == []


def test_a_seek_forward_while_playing_does_not_count_as_listening(chromium, live_server):
    """The browser reports the jump (timeupdate) before it says it seeked: the part skipped
    while the clip plays is not heard, and play-before-answer keeps waiting."""
    page, subject = first_question(
        chromium, live_server, play_before_answer=True, min_listen_ms=1500
    )
    page.evaluate("document.querySelector('[data-role=a]').play()")
    until(page, "document.querySelector('[data-role=a]').ended")  # A: all of it (2 s)
    page.evaluate(
        """() => {
            const b = document.querySelector('[data-role=b]');
            b.addEventListener('playing', () => setTimeout(() => {
                window.seekedWhilePlaying = !b.paused;
                b.currentTime = b.duration - 0.3;
            }, 100), {once: true});
            return b.play();
        }"""
    )
    until(page, "document.querySelector('[data-role=b]').ended")
    assert page.evaluate("window.seekedWhilePlaying") is True
    buttons = "Array.from(document.querySelectorAll('button[name=choice]')).map(b => b.disabled)"
    assert page.evaluate(buttons) == [True, True]
    assert "Keep listening: play B a little" in page.locator("[data-status]").inner_text()
    # The behaviour log as an answer would carry it: the submit handler writes it into the
    # form; the test's own handler, run after it, keeps the page from being sent.
    log = page.evaluate(
        """() => {
            const form = document.querySelector('form[data-question]');
            form.addEventListener('submit', event => event.preventDefault());
            form.requestSubmit();
            return JSON.parse(form.elements.behaviour.value);
        }"""
    )
    assert log["plays"] == {"a": 1, "b": 1}
    assert log["listened_ms"]["a"] >= 1500
    # The last 0.3 s; the moment before the jump may go uncounted with the jump.
    assert 0 < log["listened_ms"]["b"] < 1000
    assert answers(subject) == []
    assert page.errors == []
