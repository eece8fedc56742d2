"""Participant pages for keyboard, screen-reader and phone users, in real Chromium: answer keys
that can be switched off, sound-check tones that sit with their own players, and layouts that
neither widen a phone's page with large text nor stack the candidates on a phone held sideways.
Skipped without Chromium unless REQUIRE_BROWSER=1."""

import pytest

from experiments.checks import QUIET
from experiments.models import Subject

from .factories import make_study, make_subject
from .test_browser import answerable, answers, counter, first_question, until

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PHONE = {"device_scale_factor": 3, "is_mobile": True, "has_touch": True}
# On a phone the layout viewport (innerWidth) grows with content wider than the screen.
WIDER_THAN_SCREEN = "document.scrollingElement.scrollWidth - screen.width"


def test_the_answer_keys_can_be_switched_off_and_stay_off(chromium, live_server):
    """A stray letter (speech input, a screen reader passing keys through) must not answer
    where the participant has switched the keys off (WCAG 2.1.4)."""
    page, subject = first_question(chromium, live_server)
    keys = page.get_by_label("Answer with the keys A and B", exact=False)
    assert keys.is_checked()
    keys.uncheck()
    answerable(page)
    page.focus(".prompt")
    for key in ("a", "ArrowRight"):
        page.keyboard.press(key)
    page.wait_for_timeout(800)
    assert (counter(page), answers(subject)) == ("Question 1 of 6", [])

    page.reload()  # remembered by this browser
    assert not keys.is_checked()
    page.get_by_role("button", name="Choose B").click()
    page.locator("#counter", has_text="Question 2 of 6").wait_for()
    answerable(page)
    page.focus(".prompt")
    page.keyboard.press("a")
    page.wait_for_timeout(800)
    assert answers(subject) == [(1, "b")]

    keys.check()
    page.focus(".prompt")
    page.keyboard.press("a")
    page.locator("#counter", has_text="Question 3 of 6").wait_for()
    assert answers(subject) == [(1, "b"), (2, "a")]
    assert page.errors == []


@pytest.mark.parametrize("width", [320, 1280])
def test_each_sound_of_the_check_sits_with_its_own_player(chromium, live_server, width):
    """A wrong tick fails the check for good: each sound's name and choice must be in one box
    with its own player, above it, never nearer the next player."""
    subject = make_subject(make_study(per_type=1, sound_check=True))
    context = chromium.new_context(viewport={"width": width, "height": 640})
    page = context.new_page()
    page.goto(f"{live_server.url}/s/{subject.token}/")
    page.get_by_role("button", name="Start").click()
    page.get_by_role("heading", name="Sound check").wait_for()
    tones = page.evaluate(
        """Array.from(document.querySelectorAll('.tone')).map(tone => {
            const box = e => { const r = e.getBoundingClientRect();
                               return [r.top, r.bottom, r.left, r.right]; };
            return {box: box(tone), label: box(tone.querySelector('label')),
                    player: box(tone.querySelector('[data-play]')),
                    name: tone.querySelector('label').innerText.trim(),
                    player_name: tone.querySelector('[data-play]').innerText.trim()};
        })"""
    )
    assert len(tones) == 18  # six questions of three sounds
    for tone in tones:
        top, bottom, left, right = tone["box"]
        for part in (tone["label"], tone["player"]):
            assert top <= part[0] and part[1] <= bottom and left <= part[2] and part[3] <= right
        assert tone["label"][1] <= tone["player"][0]  # the name above its player
        assert tone["player_name"] == "Play s" + tone["name"][1:]  # Play sound n
    for upper, lower in zip(tones, tones[1:], strict=False):
        assert upper["box"][1] < lower["box"][0]  # boxes apart
    context.close()


def test_the_sound_checks_tones_play_from_their_buttons_without_a_volume_control(
    chromium, live_server
):
    """The players' own controls had a volume slider (one tone made louder passes the check
    by ear) and six Tab stops each: a play button a tone instead, one tone at a time."""
    subject = make_subject(make_study(per_type=1, sound_check=True))
    context = chromium.new_context(viewport={"width": 800, "height": 640})
    page = context.new_page()
    page.goto(f"{live_server.url}/s/{subject.token}/")
    page.get_by_role("button", name="Start").click()
    page.get_by_role("heading", name="Sound check").wait_for()
    assert (
        page.evaluate("Array.from(document.querySelectorAll('audio')).some(a => a.controls)")
        is False
    )
    first = page.get_by_role("button", name="Play sound 1").first
    second = page.get_by_role("button", name="Play sound 2").first
    first.click()
    until(page, "!document.querySelectorAll('audio[data-tone]')[0].paused")
    assert first.get_attribute("aria-pressed") == "true"
    second.click()
    until(page, "document.querySelectorAll('audio[data-tone]')[0].paused")
    assert (first.get_attribute("aria-pressed"), second.get_attribute("aria-pressed")) == (
        "false",
        "true",
    )
    context.close()


def test_large_text_on_a_small_phone_never_widens_the_page(chromium, live_server):
    """With the text at 200 % (a phone's large-text setting) on a 320 px screen, long German
    words and the candidates' cards wrap instead of making the page scroll sideways."""
    study = make_study(per_type=1, language="de", sound_check=True, completion_code="ENDE-1")
    subject = make_subject(study)
    context = chromium.new_context(viewport={"width": 320, "height": 568}, **PHONE)
    page = context.new_page()
    link = f"{live_server.url}/s/{subject.token}/"

    def overflow():
        page.evaluate("document.documentElement.style.fontSize = '200%'")
        return page.evaluate(WIDER_THAN_SCREEN)

    page.goto(link)
    assert overflow() <= 0  # Willkommen, Einwilligung
    page.get_by_role("button", name="Starten").click()
    page.get_by_role("heading", name="Tonprüfung").wait_for()
    assert overflow() <= 0
    trials = Subject.objects.get(pk=subject.pk).meta["sound_check"]["trials"]
    for number, tones in enumerate(trials, 1):  # the quiet one of each, as a listener hears
        page.locator(f"input[name=t{number}][value='{tones.index(QUIET) + 1}']").check()
    page.get_by_role("button", name="Weiter").click()
    page.locator("#counter").wait_for()
    assert overflow() <= 0  # a question
    context.close()


def test_a_phone_held_sideways_shows_the_candidates_side_by_side(chromium, live_server):
    subject = make_subject(make_study(per_type=1))
    context = chromium.new_context(viewport={"width": 568, "height": 320}, **PHONE)
    page = context.new_page()
    page.goto(f"{live_server.url}/s/{subject.token}/")
    page.get_by_role("button", name="Start").click()
    assert counter(page) == "Question 1 of 6"
    tops = page.evaluate(
        "Array.from(document.querySelectorAll('.candidate')).map(c => c.offsetTop)"
    )
    assert len(tops) == 2 and tops[0] == tops[1]
    assert page.evaluate(WIDER_THAN_SCREEN) <= 0
    context.close()
