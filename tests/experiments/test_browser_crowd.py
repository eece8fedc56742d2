"""Crowd-sourcing features in real Chromium (Debian's, driven by Playwright): the Start step
unlocking audio, one video at a time, play-before-answer with a minimum listening time, a
media failure with Retry, and the Prolific round trip ending on the completion URL only after
every answer is stored. Skipped without Chromium unless REQUIRE_BROWSER=1."""

import http.server
import json
import threading

import pytest

from experiments import views
from experiments.models import Response, Subject
from tests.browsers import launched

from .factories import make_study, make_subject
from .test_browser import answerable, counter, until, wait_for_media

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PROLIFIC = "https://app.prolific.com/submissions/complete"
# Headless Chromium has no speakers and no user to tap: let media play from scripts.
RECORD_UNLOCK = """
(() => {
  const Original = window.AudioContext;
  window.AudioContext = function (...args) {
    const context = new Original(...args);
    sessionStorage.setItem("unlock", JSON.stringify({inTap: navigator.userActivation.isActive}));
    return context;
  };
})();
"""


@pytest.fixture(scope="module")
def browser():
    """One Chromium for the module (each test gets fresh contexts): launching costs seconds."""
    with launched("--autoplay-policy=no-user-gesture-required") as browser:
        yield browser


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    yield page
    context.close()


def answer(page, name, then):
    """Press the button `name`, then wait for the next page (a heading or counter text)."""
    page.get_by_role("button", name=name).click()
    page.get_by_text(then).first.wait_for()


def play_for(page, role, ms):
    """Play one candidate for about `ms` milliseconds, then pause it."""
    page.evaluate(f"document.querySelector('[data-role={role}]').play()")
    page.wait_for_timeout(ms)
    page.evaluate(f"document.querySelector('[data-role={role}]').pause()")


def first_question(live_server, page):
    """A subject of a fresh one-system study, on its first question with the media loaded."""
    subject = make_subject(make_study(per_type=1))
    page.goto(f"{live_server.url}/s/{subject.token}/")
    page.get_by_role("button", name="Start").click()
    wait_for_media(page)
    return subject


def disabled(page):
    return page.evaluate(
        "Array.from(document.querySelectorAll('button[name=choice]')).map(b => b.disabled)"
    )


def test_start_unlocks_audio_inside_the_tap_and_one_video_plays_at_a_time(live_server, page):
    study = make_study(per_type=1)
    subject = make_subject(study)
    page.add_init_script(RECORD_UNLOCK)
    page.goto(f"{live_server.url}/s/{subject.token}/")
    assert page.evaluate("sessionStorage.getItem('unlock')") is None  # no sound before Start
    page.get_by_role("button", name="Start").click()
    assert counter(page) == "Question 1 of 6"
    assert json.loads(page.evaluate("sessionStorage.getItem('unlock')")) == {"inTap": True}
    # On to the music → video block.
    answer(page, "Choose A", "Question 2 of 6")
    answer(page, "Choose A", "Question 3 of 6")
    answer(page, "Choose A", "Time for a short break")
    answer(page, "Continue", "Question 4 of 6")
    wait_for_media(page)
    # The clips last 2 s: looping, none ends (and so pauses) on a slow machine before the
    # checks below read which ones play.
    page.evaluate("document.querySelectorAll('[data-role]').forEach(m => { m.loop = true; })")
    page.evaluate("document.querySelector('video[data-role=a]').play()")
    page.wait_for_timeout(200)
    page.evaluate("document.querySelector('video[data-role=b]').play()")
    page.wait_for_timeout(200)
    state = page.evaluate(
        "['query', 'a', 'b'].map(r => !document.querySelector(`[data-role=${r}]`).paused)"
    )
    assert state == [False, False, True]  # B started, A paused; the music was not started
    page.evaluate("document.querySelector('[data-role=query]').play()")
    page.wait_for_timeout(100)
    state = page.evaluate(
        "['query', 'a', 'b'].map(r => !document.querySelector(`[data-role=${r}]`).paused)"
    )
    assert state == [True, False, True]  # the query music plays along with one video
    assert page.errors == []


def test_answers_wait_until_each_candidate_has_played_long_enough(live_server, page):
    # The clips last 2 s; 1.5 s to hear of each leaves the short play below far from enough
    # even on a slow machine (the page caps the minimum at the clip's length less 250 ms).
    study = make_study(per_type=1, play_before_answer=True, min_listen_ms=1500)
    subject = make_subject(study)
    page.goto(f"{live_server.url}/s/{subject.token}/")
    page.get_by_role("button", name="Start").click()
    wait_for_media(page)
    assert disabled(page) == [True, True]
    assert "Play both candidates" in page.locator("[data-status]").inner_text()
    page.keyboard.press("a")  # a disabled button takes no key; why it waits is said again
    page.wait_for_timeout(300)
    assert counter(page) == "Question 1 of 6"
    assert "Play both candidates" in page.locator("[data-status]").inner_text()

    play_for(page, "a", 300)
    play_for(page, "b", 2300)  # to its end: enough, however slowly the page ran
    assert disabled(page) == [True, True]  # A has played, but not long enough
    assert "Keep listening: play A a little" in page.locator("[data-status]").inner_text()
    play_for(page, "a", 2000)  # on from 0.3 s: 1.5 s heard in all well before its end
    page.locator("button[name=choice]:disabled").first.wait_for(state="detached")
    # Said as it happens: a screen reader gives no other sign of the buttons coming alive.
    assert page.locator("[data-status]").inner_text() == "You can choose now."
    page.evaluate(
        "window.dispatchEvent(new Event('blur')); window.dispatchEvent(new Event('focus'))"
    )
    page.get_by_role("button", name="Choose B").click()
    page.locator("#counter", has_text="Question 2 of 6").wait_for()
    log = Response.objects.get(subject=subject).behaviour
    assert log["plays"] == {"a": 2, "b": 1}
    assert log["listened_ms"]["a"] >= 1500 and log["listened_ms"]["b"] >= 1500
    assert 0 < log["first_play_ms"] < log["first_play"]["b"]
    assert (log["blur"], log["focus"], log["errors"]) == (1, 1, [])
    assert page.errors == []


def test_a_seek_to_the_end_does_not_count_as_listening(live_server, page):
    subject = make_subject(make_study(per_type=1, play_before_answer=True, min_listen_ms=1500))
    page.goto(f"{live_server.url}/s/{subject.token}/")
    page.get_by_role("button", name="Start").click()
    wait_for_media(page)
    play_for(page, "a", 2300)  # all of it
    page.evaluate(
        "const m = document.querySelector('[data-role=b]'); m.currentTime = m.duration - 0.3;"
        "m.play()"
    )
    until(page, "document.querySelector('[data-role=b]').ended")
    assert disabled(page) == [True, True]  # 0.3 s of B heard, to its end
    assert "Keep listening: play B a little" in page.locator("[data-status]").inner_text()
    play_for(page, "b", 2300)  # from the start again: all of it
    answerable(page)
    assert page.errors == []


def test_media_that_failed_before_the_script_ran_show_retry_at_once(live_server, page):
    """The page's script is deferred: a request refused at once can fail before it listens."""
    subject = make_subject(make_study(per_type=1))
    question = subject.questions.get(position=1)
    page.route(f"**/m/{question.option_b.music_token}", lambda route: route.abort())
    page.goto(f"{live_server.url}/s/{subject.token}/")
    page.get_by_role("button", name="Start").click()
    page.get_by_role("button", name="Retry").wait_for()  # the question page, in its time
    held = []
    page.route("**/study*.js", lambda route: held.append(route))
    page.reload(wait_until="commit")
    until(page, "!!document.querySelector('[data-role=b]')?.error")
    held[0].continue_()  # the script runs now, after the failure
    page.get_by_role("button", name="Retry").wait_for(timeout=5000)  # not after 20 s
    assert "could not be loaded" in page.locator("[data-status]").inner_text()


def test_a_media_failure_shows_retry_and_is_recorded_with_the_answer(live_server, page):
    study = make_study(per_type=1)
    subject = make_subject(study)
    question = subject.questions.get(position=1)
    broken = f"**/m/{question.option_b.music_token}"
    page.route(broken, lambda route: route.abort())
    page.goto(f"{live_server.url}/s/{subject.token}/")
    page.get_by_role("button", name="Start").click()
    retry = page.get_by_role("button", name="Retry")
    retry.wait_for()
    assert "could not be loaded" in page.locator("[data-status]").inner_text()
    page.unroute(broken)
    retry.click()
    wait_for_media(page, state=1)
    assert not retry.is_visible() and page.locator("[data-status]").inner_text() == ""
    page.get_by_role("button", name="Choose A").click()
    page.locator("#counter", has_text="Question 2 of 6").wait_for()
    log = Response.objects.get(subject=subject).behaviour
    assert [(e["role"], e["reason"]) for e in log["errors"]] == [("b", "error")]
    assert log["retries"] == 1


def test_answers_go_in_place_and_fall_back_to_the_form_without_a_connection(live_server, page):
    study = make_study(per_type=1)
    subject = make_subject(study)
    link = f"{live_server.url}/s/{subject.token}/"
    page.goto(link)
    page.get_by_role("button", name="Start").click()
    wait_for_media(page)
    page.evaluate("document.querySelector('[data-role=a]').play()")
    loads = []
    page.on("framenavigated", lambda frame: loads.append(frame.url))
    answer(page, "Choose A", "Question 2 of 6")
    assert loads == []  # the next question is shown in place, with its own media
    second = subject.questions.get(position=2)
    shown = page.evaluate("document.querySelector('[data-role=query]').getAttribute('src')")
    assert shown == f"/m/{second.query.video_token}"
    wait_for_media(page)

    def no_connection_for_the_script(route):
        if "application/json" in route.request.headers.get("accept", ""):
            route.abort()
        else:
            route.continue_()

    page.route("**/s/*/", no_connection_for_the_script)
    answer(page, "Choose B", "Question 3 of 6")  # tried again for 15 s, then the form
    assert loads and loads[-1] == link  # the form went plainly: a page load
    first, again = Response.objects.filter(subject=subject).order_by("question__position")
    assert (first.choice, again.choice) == ("a", "b")
    assert first.behaviour["plays"] == {"a": 1}
    assert again.behaviour["plays"] == {} and again.response_ms > 0  # its own log
    assert page.errors == []


def test_an_answer_the_server_could_not_take_is_sent_again_in_place(live_server, page):
    """A server restarting (no reply, then a proxy's 503): the script sends the answer again
    and shows the next question in place; the server takes it once."""
    subject = first_question(live_server, page)
    failures = ["abort", 503]

    def restarting(route):
        if "application/json" in route.request.headers.get("accept", "") and failures:
            failure = failures.pop(0)
            if failure == "abort":
                route.abort()
            else:
                route.fulfill(status=failure, body="Service Unavailable")
        else:
            route.continue_()

    page.route("**/s/*/", restarting)
    loads = []
    page.on("framenavigated", lambda frame: loads.append(frame.url))
    answer(page, "Choose A", "Question 2 of 6")
    assert failures == [] and loads == []  # both failures met, and no page load
    assert Response.objects.filter(subject=subject).count() == 1
    assert page.errors == []


def test_the_prolific_round_trip(live_server, browser, monkeypatch):
    monkeypatch.setattr(views, "ONWARD_AFTER_S", 2)  # not the participant's 20 s
    study = make_study(
        per_type=1,
        completion_code="PRO-42",
        redirect_url=PROLIFIC + "?cc={code}",
    )
    join = f"{live_server.url}/join/{study.join_token}/?PROLIFIC_PID=pp-1&STUDY_ID=st-1"
    landed = []

    def prolific(route):
        # What Prolific would see: the answers stored at the moment the participant arrives.
        landed.append((route.request.url, Response.objects.filter(subject__study=study).count()))
        route.fulfill(status=200, content_type="text/html", body="<h1>Prolific</h1>")

    first = browser.new_context()
    page = first.new_page()
    page.goto(join + "&SESSION_ID=se-1")
    page.get_by_role("button", name="Start").click()
    answer(page, "Choose A", "Question 2 of 6")
    answer(page, "Choose A", "Question 3 of 6")
    first.close()  # the participant closes the browser

    second = browser.new_context()  # later, another browser: the same Prolific submission
    page = second.new_page()
    page.route(f"{PROLIFIC}**", prolific)
    page.goto(join + "&SESSION_ID=se-1")
    assert counter(page) == "Question 3 of 6"
    answer(page, "Choose B", "Time for a short break")
    answer(page, "Continue", "Question 4 of 6")
    answer(page, "Choose B", "Question 5 of 6")
    answer(page, "Choose B", "Question 6 of 6")
    answer(page, "Choose B", "Thank you!")
    assert page.locator("#completion-code").inner_text() == "PRO-42"
    page.wait_for_url(f"{PROLIFIC}**", timeout=30_000)  # the automatic redirect
    assert landed == [(f"{PROLIFIC}?cc=PRO-42", 6)]
    second.close()
    subject = Subject.objects.get(study=study)
    assert (subject.external_id, subject.outcome) == ("pp-1", "completed")
    assert subject.meta["entry"] == {
        "PROLIFIC_PID": "pp-1",
        "STUDY_ID": "st-1",
        "SESSION_ID": "se-1",
    }


def test_on_a_phone_the_reason_to_wait_stays_in_sight(live_server, browser):
    study = make_study(per_type=1, play_before_answer=True, min_listen_ms=1500)
    subject = make_subject(study)
    phone = {"width": 320, "height": 568}
    context = browser.new_context(viewport=phone, has_touch=True, is_mobile=True)
    page = context.new_page()
    try:
        page.goto(f"{live_server.url}/s/{subject.token}/")
        page.get_by_role("button", name="Start").click()
        wait_for_media(page)
        status = page.locator("[data-status]")
        assert "Play both candidates" in status.inner_text()
        box = status.bounding_box()  # in the viewport's coordinates: on screen, unscrolled
        assert box and box["y"] >= 0 and box["y"] + box["height"] <= phone["height"], box
    finally:
        context.close()


def test_after_a_keyboard_answer_focus_is_on_the_next_question(live_server, page):
    first_question(live_server, page)
    answerable(page)
    page.keyboard.press("a")
    page.locator("#counter", has_text="Question 2 of 6").wait_for()
    page.wait_for_function("document.activeElement.classList.contains('prompt')")
    assert page.evaluate("document.getElementById('counter').getAttribute('aria-live')")
    assert page.errors == []


def test_a_double_tap_or_a_held_key_answers_one_question(live_server, page):
    subject = first_question(live_server, page)
    answerable(page)
    box = page.get_by_role("button", name="Choose A").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.click(x, y)
    page.locator("#counter", has_text="Question 2 of 6").wait_for()
    page.mouse.click(x, y)  # the double click's second click: the next question is not seen yet
    page.wait_for_timeout(1000)
    assert counter(page) == "Question 2 of 6"
    answerable(page)
    page.focus("[data-role=a]")  # a key pressed in a player: the letters still choose
    page.keyboard.down("b")
    page.locator("#counter", has_text="Question 3 of 6").wait_for()
    for _ in range(10):  # the key held down: the browser repeats it
        page.wait_for_timeout(100)
        page.keyboard.down("b")
    page.keyboard.up("b")
    assert counter(page) == "Question 3 of 6"
    answers = Response.objects.filter(subject=subject).order_by("question__position")
    assert [(r.question.position, r.choice) for r in answers] == [(1, "a"), (2, "b")]
    assert page.errors == []


def test_an_answer_given_offline_waits_on_the_page_and_goes_when_back_online(live_server, page):
    subject = first_question(live_server, page)
    loads = []
    page.on("framenavigated", lambda frame: loads.append(frame.url))
    page.context.set_offline(True)
    page.get_by_role("button", name="Choose B").click()
    status = page.locator("[data-status]")
    status.filter(has_text="No connection").wait_for()
    assert loads == [] and not Response.objects.filter(subject=subject).exists()
    page.wait_for_timeout(500)
    page.context.set_offline(False)
    page.locator("#counter", has_text="Question 2 of 6").wait_for()
    assert loads == [] and status.inner_text() == ""  # in place, the message gone
    (stored,) = Response.objects.filter(subject=subject)
    assert (stored.question.position, stored.choice) == (1, "b")
    assert page.errors == []


def test_with_play_before_answer_a_clip_that_cannot_load_does_not_block(live_server, page):
    study = make_study(per_type=1, play_before_answer=True, min_listen_ms=1500)
    subject = make_subject(study)
    question = subject.questions.get(position=1)
    page.route(f"**/m/{question.option_b.music_token}", lambda route: route.abort())
    page.goto(f"{live_server.url}/s/{subject.token}/")
    page.get_by_role("button", name="Start").click()
    page.get_by_role("button", name="Retry").wait_for()
    status = page.locator("[data-status]")
    assert "Music B could not be loaded" in status.inner_text()
    until(page, "document.querySelector('[data-role=a]').readyState >= 2")
    assert disabled(page) == [True, True]  # A, which loads, must still be heard
    play_for(page, "a", 2300)  # to its end
    answerable(page)
    page.get_by_role("button", name="Choose A").click()
    page.locator("#counter", has_text="Question 2 of 6").wait_for()
    log = Response.objects.get(subject=subject).behaviour
    assert [(e["role"], e["reason"]) for e in log["errors"]] == [("b", "error")]
    assert page.errors == []


def test_shift_with_a_letter_chooses_and_with_an_arrow_does_not(live_server, page):
    subject = first_question(live_server, page)
    answerable(page)
    page.keyboard.press("Shift+ArrowRight")  # extends a selection, as in any page
    # On a button an arrow moves between controls (screen readers, keyboards): no answer.
    page.get_by_role("button", name="Choose A").focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_timeout(300)
    assert counter(page) == "Question 1 of 6"
    page.keyboard.press("Shift+A")  # what Caps Lock or a held Shift types
    page.locator("#counter", has_text="Question 2 of 6").wait_for()
    assert Response.objects.get(subject=subject).choice == "a"


def test_inside_mturks_frame_a_browser_that_keeps_no_third_party_cookie_takes_part(
    live_server, browser, settings
):
    """MTurk shows the study in a frame on its own site; there this site is third-party, and
    Chromium's fresh (incognito-like) profile keeps none of its cookies, as Safari does."""
    study = make_study(per_type=1, completion_code="MT-1")
    hit = "workerId=w9&assignmentId=a9&hitId=h9&turkSubmitTo=https://workersandbox.mturk.com"
    framed = f"{live_server.url}/join/{study.join_token}/?{hit}"
    html = f'<iframe src="{framed}" width="900" height="700"></iframe>'.encode()

    class MTurk(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *args):
            pass

    # Another site on this machine (Chromium lets only local pages frame local ones): the
    # live server is localhost, this 127.0.0.1.
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), MTurk) as mturk:
        threading.Thread(target=mturk.serve_forever, daemon=True).start()
        origin = f"http://127.0.0.1:{mturk.server_address[1]}"
        settings.PARTICIPANT_FRAME_ANCESTORS = [origin]
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{origin}/hit")
        frame = page.frame_locator("iframe")
        frame.get_by_role("button", name="Start").click()
        for n in range(2, 4):
            frame.get_by_role("button", name="Choose A").click()
            frame.get_by_text(f"Question {n} of 6").wait_for()
        assert context.cookies(live_server.url) == []  # it took part without any
        context.close()
        mturk.shutdown()
    subject = Subject.objects.get(study=study)
    assert (subject.external_id, Response.objects.filter(subject=subject).count()) == ("w9", 2)


def test_the_end_page_goes_back_to_the_platform_unless_one_stays(live_server, page, monkeypatch):
    """A time limit the participant can turn off (WCAG 2.2.1): reading or copying the code."""
    from .test_admin import answer_all

    monkeypatch.setattr(views, "ONWARD_AFTER_S", 2)

    study = make_study(per_type=1, completion_code="STAY-1", redirect_url=PROLIFIC + "?cc={code}")
    subject = make_subject(study)
    answer_all(subject, 6)  # through the pages, without a browser
    page.route(f"{PROLIFIC}**", lambda route: route.fulfill(body="<h1>Prolific</h1>"))
    page.goto(f"{live_server.url}/s/{subject.token}/")
    page.get_by_role("button", name="Stay on this page").click()
    page.wait_for_timeout(3000)  # past the 2 s
    assert page.url.endswith(f"/s/{subject.token}/")  # still here
    assert page.locator("#completion-code").inner_text() == "STAY-1"
    assert page.evaluate("document.activeElement.id") == "continue"
