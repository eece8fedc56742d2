"""Crowd-sourcing features through the real pages (Django's test client) and real media:
catch questions, the headphone check, typed end codes, the Prolific/MTurk round trip, the
behaviour log, exports and languages."""

import csv
import io
import json
import os
import re
from collections import Counter
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import av
import numpy as np
import pytest
from django.core.files.base import ContentFile
from django.core.management import call_command
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.io import wavfile

from analysis.export import build_report, render
from analysis.load import responses_frame
from analysis.preference import preference_table
from experiments import checks, views
from experiments.export import COLUMNS, dictionary_rows, pseudonym, response_rows
from experiments.media import probe
from experiments.models import Pair, Response, Split, Study, Subject, System
from experiments.plans import PlannedQuestion, with_catch_questions
from experiments.subjects import plan_for
from experiments.tasks import ensure_catch_pair, finish_study, prepare_study, served_items
from experiments.views import JOIN_HOLD

from .clips import music_video
from .factories import make_study, make_subject, without_random_tokens

pytestmark = pytest.mark.django_db


def url(subject):
    return reverse("subject", args=[subject.token])


def catch_study(**fields):
    study = make_study(per_type=1, attention_checks=True, catch_count=3, **fields)
    ensure_catch_pair(study.collection_id)
    return study


def answer_all(client, subject, pick):
    """Answer every question; `pick(question)` returns 'a' or 'b'. Passes breaks and start."""
    client.post(url(subject), {"step": "start", "consent": "1"})
    for question in subject.questions.order_by("position"):
        client.post(url(subject), {"step": "continue", "position": question.position})
        response = client.post(
            url(subject), {"choice": pick(question), "position": question.position}
        )
        assert response.status_code == 302
    subject.refresh_from_db()


def ground_truth(question):
    return "a" if question.kind_a == "G" else "b"


def first_named_unless_catch(question):
    """Known answers: the first-named kind of every pair type, but X on catch questions."""
    wanted = "X" if question.is_catch else question.pair_type[0]
    return "a" if question.kind_a == wanted else "b"


# --- Catch questions: the plan ---------------------------------------------------------------


def plain_plan(n):
    return [
        PlannedQuestion(
            i + 1, "V2M" if i < n // 2 else "M2V", "GR", f"q{i}", f"q{i}", "r", "G", "R"
        )
        for i in range(n)
    ]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 40),
    count=st.integers(0, 8),
    seed=st.integers(0, 2**16),
    ordinal=st.integers(0, 50),
)
def test_catch_questions_are_placed_apart_and_keep_the_plan(n, count, seed, ordinal):
    count = min(count, n + 1)
    plan = plain_plan(n)
    keys = [f"q{i}" for i in range(n)] + ["extra"]
    out = with_catch_questions(plan, keys, "__catch__", count, seed, ordinal)
    assert [q.position for q in out] == list(range(1, n + count + 1))
    flags = [q.is_catch for q in out]
    assert sum(flags) == count
    assert not any(
        a and b for a, b in zip(flags[:-1], flags[1:], strict=True)
    )  # never two in a row
    assert [q.query for q in out if not q.is_catch] == [q.query for q in plan]  # order kept
    for i, q in enumerate(out):
        if q.is_catch:
            assert {q.kind_a, q.kind_b} == {"G", "X"} and q.pair_type == "GX"
            assert {q.option_a, q.option_b} == {q.query, "__catch__"}
            # It belongs to a neighbour's block: no direction change inside a block.
            neighbours = [out[j].direction for j in (i - 1, i + 1) if 0 <= j < len(out)]
            assert q.direction in neighbours
    directions = [q.direction for q in out]
    assert directions == sorted(directions, key=["V2M", "M2V"].index)  # still two blocks
    assert out == with_catch_questions(plan, keys, "__catch__", count, seed, ordinal)


def test_catch_queries_are_never_asked_in_their_block_where_the_collection_allows():
    n = 12  # every test item is asked in both blocks, beside its ground truth
    keys = [f"q{i}" for i in range(n)]
    plan = [
        PlannedQuestion(d * n + i + 1, direction, "GR", key, key, "r", "G", "R")
        for d, direction in enumerate(("V2M", "M2V"))
        for i, key in enumerate(keys)
    ]
    spare = [f"t{i}" for i in range(6)]
    for ordinal in range(10):
        out = with_catch_questions(plan, keys, "__catch__", 6, 1, ordinal, spare_keys=spare)
        assert {q.query for q in out if q.is_catch} <= set(spare)
    # No other items: a query whose question in the block does not show its ground truth.
    no_g = [
        replace(q, pair_type="SR", kind_a="S", kind_b="R") if i % 3 else q
        for i, q in enumerate(plan)
    ]
    for ordinal in range(10):
        out = with_catch_questions(no_g, keys, "__catch__", 6, 1, ordinal)
        shows_g = {(q.direction, q.query) for q in no_g if "G" in (q.kind_a, q.kind_b)}
        assert not any((q.direction, q.query) in shows_g for q in out if q.is_catch)


def test_a_video_to_music_catch_query_is_not_a_ground_truth_the_other_block_shows_later():
    """Without spare items: a video→music catch question shows its query beside its music, so
    a music→video question on that music showing its video (G) would be given away."""
    keys = [f"q{i}" for i in range(12)]
    v2m = [PlannedQuestion(i + 1, "V2M", "GR", k, k, "r", "G", "R") for i, k in enumerate(keys[:6])]
    m2v = [  # every item; q6-q8 beside their ground truth, q9-q11 without
        PlannedQuestion(7 + i, "M2V", "GR", k, k, "r", "G", "R")
        if i < 9
        else PlannedQuestion(7 + i, "M2V", "SR", k, "s", "r", "S", "R")
        for i, k in enumerate(keys)
    ]
    queries = set()
    for ordinal in range(20):
        out = with_catch_questions(v2m + m2v, keys, "__catch__", 3, 2, ordinal)
        queries |= {q.query for q in out if q.is_catch and q.direction == "V2M"}
    assert queries and queries <= {"q9", "q10", "q11"}, queries


def test_catch_questions_show_the_ground_truth_as_a_or_b_by_chance():
    """Always clicking A (or B) must not pass the attention checks."""
    plan = plain_plan(40)
    keys = [f"q{i}" for i in range(40)] + [f"e{i}" for i in range(10)]
    sides = Counter()
    for ordinal in range(10):
        out = with_catch_questions(plan, keys, "__catch__", 6, 3, ordinal)
        sides.update(q.kind_a for q in out if q.is_catch)
    assert sum(sides.values()) == 60
    assert sides["G"] > 10 and sides["X"] > 10, sides


def test_catch_questions_of_a_block_have_distinct_queries_while_fresh_ones_last():
    asked = [f"q{i}" for i in range(20)]  # both blocks ask about the same items
    plan = [
        PlannedQuestion(d * 20 + i + 1, direction, "GR", key, key, "r", "G", "R")
        for d, direction in enumerate(("V2M", "M2V"))
        for i, key in enumerate(asked)
    ]
    fresh = [f"e{i}" for i in range(8)]  # items no question asks: enough for any block
    keys = asked + fresh
    for ordinal in range(10):
        out = with_catch_questions(plan, keys, "__catch__", 8, 5, ordinal)
        for direction in ("V2M", "M2V"):
            queries = [q.query for q in out if q.is_catch and q.direction == direction]
            assert set(queries) <= set(fresh)
            assert len(set(queries)) == len(queries), f"a catch query repeats: {queries}"


def test_a_study_using_every_test_item_takes_catch_queries_from_the_training_items():
    study = make_study(n_pairs=6, per_type=2, attention_checks=True, catch_count=4)
    ensure_catch_pair(study.collection_id)
    for i in range(3):
        Pair.objects.create(
            collection=study.collection, key=f"train{i}", split=Split.TRAIN, status="ready"
        )
    for ordinal in range(6):
        plan = plan_for(study, ordinal)
        catch = [q for q in plan if q.is_catch]
        assert len(catch) == 4 and all(q.query.startswith("train") for q in catch)


def top_level_boxes(data: bytes) -> list[tuple[bytes, int, bytes]]:
    """(type, size, payload) of an MP4's top-level boxes (4-byte big-endian size including
    the 8-byte header, 4-byte type); they must cover the file exactly."""
    boxes, at = [], 0
    while at < len(data):
        size, kind = int.from_bytes(data[at : at + 4], "big"), data[at + 4 : at + 8]
        assert size >= 8 and at + size <= len(data), (kind, size, at, len(data))
        boxes.append((kind, size, data[at + 8 : at + size]))
        at += size
    return boxes


def test_catch_media_are_black_and_silent_and_made_once():
    study = make_study(per_type=1)
    pair = ensure_catch_pair(study.collection_id)
    assert pair.split == Split.CATCH and pair.status == Pair.Status.READY
    with av.open(pair.video_file.path) as video:
        frames = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
    assert len(frames) >= 10 and max(int(f.max()) for f in frames) <= 16  # black
    with av.open(pair.music_file.path) as music:
        peak = max(float(np.abs(f.to_ndarray()).max()) for f in music.decode(audio=0))
    assert peak < 1e-4  # silent
    assert pair.duration_s == pytest.approx(2.0)  # as long as the test items
    # Nor do its frame size, frame rate or file sizes tell it apart before it plays.
    served = served_items(study.collection_id)
    looks = {(i.info.width, i.info.height, i.info.fps) for i in served if i.kind == "video"}
    catch = probe(pair.video_file.path)
    assert looks == {(catch.width, catch.height, catch.fps)}
    for kind, item in (("video", pair.video_file), ("music", pair.music_file)):
        sizes = [i.size for i in served if i.kind == kind]
        assert os.path.getsize(item.path) == int(np.median(sizes)), kind
        # Padded with a top-level ISO 'free' box that runs exactly to the end of the file.
        boxes = top_level_boxes(Path(item.path).read_bytes())
        assert boxes[0][0] == b"ftyp" and boxes[-1][0] == b"free", (kind, boxes)
        assert boxes[-1][1] > 8 and boxes[-1][2] == bytes(boxes[-1][1] - 8), kind
    assert ensure_catch_pair(study.collection_id).pk == pair.pk
    assert Pair.objects.filter(collection=study.collection, split=Split.CATCH).count() == 1


def test_preparation_makes_the_catch_pair_and_plans_catch_questions():
    study = make_study(
        per_type=1, attention_checks=True, catch_count=3, status=Study.Status.PREPARING
    )
    assert finish_study(study.pk) == Study.Status.READY
    study.refresh_from_db()
    assert study.message.startswith(
        "Ready: 9 questions per subject. Note: 8 test pairs for 3 queries"
    )
    subject = make_subject(study)
    catch = subject.questions.filter(is_catch=True)
    assert catch.count() == 3
    catch_pair = Pair.objects.get(collection=study.collection, split=Split.CATCH)
    for q in catch:
        broken = q.option_a if q.kind_a == "X" else q.option_b
        assert broken == catch_pair and q.machine == {}


@pytest.mark.parametrize("seconds", [5.0, 2.5])  # half a second apart shows on a player's clock
def test_preparation_refuses_test_items_whose_length_gives_the_match_away(tmp_path, seconds):
    study = make_study(per_type=1, status=Study.Status.PREPARING)
    pair = study.collection.pairs.get(key="clip000")  # one longer music video among 2 s ones
    for field, video in ((pair.video_file, True), (pair.music_file, False)):
        path = music_video(
            tmp_path / f"{video}.mp4", 0, seconds, (160, 96), video=video, audio=not video
        )
        field.save(f"long-{video}.mp4", ContentFile(path.read_bytes()))
    assert finish_study(study.pk) == Study.Status.FAILED
    study.refresh_from_db()
    assert f"last 2.0 to {seconds:.1f} s" in study.message
    assert "clips of 2 s (`--clip-seconds`" in study.message
    # Items of one length (within what encoders round) are fine.
    for field, video in ((pair.video_file, True), (pair.music_file, False)):
        path = music_video(
            tmp_path / f"{video}.mp4", 0, 2.0, (160, 96), video=video, audio=not video
        )
        field.save(f"same-{video}.mp4", ContentFile(path.read_bytes()))
    Study.objects.filter(pk=study.pk).update(status=Study.Status.PREPARING)  # prepared again
    assert finish_study(study.pk) == Study.Status.READY


@pytest.mark.parametrize(
    "design, message",
    [
        ({"per_type": 3}, "too small"),
        ({"comparisons": [["G", "Q"]]}, "Bad comparison"),
        ({"comparisons": [["G", "R"], ["R", "G"]]}, "listed twice"),
    ],
)
def test_a_design_no_results_could_serve_fails_before_any_training(design, message):
    study = make_study(status=Study.Status.DRAFT, **design)
    system = study.systems.get()
    system.status = System.Status.NEW  # it would be trained first
    system.save()
    assert prepare_study(study.pk) == Study.Status.FAILED
    study.refresh_from_db()
    system.refresh_from_db()
    assert message in study.message and system.status == System.Status.NEW  # nothing ran


def test_unequal_test_items_fail_the_preparation_before_any_training(tmp_path):
    study = make_study(per_type=1, status=Study.Status.DRAFT)
    System.objects.update(status=System.Status.NEW)
    pair = study.collection.pairs.get(key="clip000")
    path = music_video(tmp_path / "long.mp4", 0, 5.0, (160, 96), audio=False)
    pair.video_file.save("long.mp4", ContentFile(path.read_bytes()))
    assert prepare_study(study.pk) == Study.Status.FAILED
    study.refresh_from_db()
    assert "last 2.0 to 5.0 s" in study.message
    assert System.objects.get().status == System.Status.NEW


def test_preparation_fails_clearly_when_a_test_item_cannot_be_read():
    study = make_study(per_type=1, status=Study.Status.PREPARING)
    pair = study.collection.pairs.get(key="clip003")
    Path(pair.video_file.path).unlink()
    assert finish_study(study.pk) == Study.Status.FAILED  # not left preparing
    study.refresh_from_db()
    assert study.message.startswith("test pair clip003: ") and "not found" in study.message


def test_the_catch_item_lasts_as_long_as_the_test_items_as_served(tmp_path):
    study = make_study(per_type=1)
    study.collection.pairs.update(duration_s=60.0)  # the sources; their clips last 2 s
    pair = ensure_catch_pair(study.collection_id)
    assert pair.duration_s == pytest.approx(2.0, abs=0.1)
    assert probe(pair.video_file.path).duration_s == pytest.approx(2.0, abs=0.2)


def test_catch_questions_look_like_any_other(client):
    study = catch_study()
    subject = make_subject(study)
    client.post(url(subject), {"step": "start"})
    for question in subject.questions.order_by("position"):
        client.post(url(subject), {"step": "continue", "position": question.position})
        html = without_random_tokens(client.get(url(subject)).content.decode(), subject)
        assert "GX" not in html and "catch" not in html.lower() and "__catch__" not in html
        client.post(url(subject), {"choice": "a", "position": question.position})


def test_catch_score_and_threshold_set_the_outcome_and_its_code(client):
    study = catch_study(
        catch_pass_threshold=0.6,
        completion_code="OK-1",
        failed_attention_code="ATT-0",
        redirect_url="https://app.prolific.com/submissions/complete?cc={code}",
    )
    good, bad = make_subject(study), make_subject(study)
    answer_all(client, good, ground_truth)
    answer_all(client, bad, first_named_unless_catch)
    assert (good.outcome, good.catch_score) == ("completed", 1.0)
    assert (bad.outcome, bad.catch_score) == ("failed_attention", 0.0)
    html = client.get(url(bad)).content.decode()
    assert "ATT-0" in html and "OK-1" not in html
    assert 'href="https://app.prolific.com/submissions/complete?cc=ATT-0"' in html
    assert "cc=OK-1" in client.get(url(good)).content.decode()
    # The export shows both; the analysis leaves the failed subject out unless asked.
    rows = list(response_rows(study))
    assert {(r["subject_outcome"], r["catch_score"]) for r in rows} == {
        ("completed", 1.0),
        ("failed_attention", 0.0),
    }
    assert sum(r["is_catch"] for r in rows) == 6
    assert set(responses_frame(study)["subject"]) == {good.ordinal}
    assert set(responses_frame(study, include_failed=True)["subject"]) == {
        good.ordinal,
        bad.ordinal,
    }


def test_a_subject_exactly_at_the_pass_threshold_passes(client):
    study = make_study(
        per_type=1,
        attention_checks=True,
        catch_count=2,
        catch_pass_threshold=0.5,
        completion_code="OK-1",
        failed_attention_code="ATT-0",
    )
    ensure_catch_pair(study.collection_id)
    subject = make_subject(study)
    catch = list(subject.questions.filter(is_catch=True).order_by("position"))
    assert len(catch) == 2

    def first_catch_right_second_wrong(question):
        if question.pk == catch[1].pk:
            return "a" if question.kind_a == "X" else "b"
        return ground_truth(question)

    answer_all(client, subject, first_catch_right_second_wrong)
    assert subject.catch_score == 0.5
    assert subject.outcome == "completed"
    html = client.get(url(subject)).content.decode()
    assert "OK-1" in html and "ATT-0" not in html


def test_a_subject_in_progress_who_can_still_just_reach_the_threshold_is_analysed(client):
    """Interim analyses leave out subjects who can no longer pass; 1 of 2 catch questions
    failed still reaches a threshold of 0.5."""
    study = make_study(per_type=1, attention_checks=True, catch_count=2, catch_pass_threshold=0.5)
    ensure_catch_pair(study.collection_id)
    subject = make_subject(study)
    client.post(url(subject), {"step": "start", "consent": "1"})
    for question in subject.questions.order_by("position"):
        client.post(url(subject), {"step": "continue", "position": question.position})
        wrong = "a" if question.kind_a != "G" else "b"
        client.post(url(subject), {"choice": wrong, "position": question.position})
        if question.is_catch:
            break  # one catch question failed, one to come
    subject.refresh_from_db()
    assert subject.completed_at is None
    assert subject.responses.filter(question__is_catch=True, chosen_kind="X").count() == 1
    assert set(responses_frame(study, include_incomplete=True)["subject"]) == {subject.ordinal}


def test_catch_questions_are_left_out_of_the_preference_table(client):
    """Known answers: every real question gets its first-named kind (100 %), every catch
    question the broken item; the table must still read 100 % from the 6 real answers."""
    study = catch_study()
    subject = make_subject(study)
    answer_all(client, subject, first_named_unless_catch)
    frame = responses_frame(study)
    assert len(frame) == 9 and frame["is_catch"].sum() == 3
    assert (frame.loc[frame.is_catch, "chosen"] == "X").all()
    table = preference_table(frame)
    assert list(table.index) == ["GR", "GS", "SR"]
    assert (table == 100.0).all().all()


def test_a_study_with_catch_questions_but_no_catch_media_cannot_plan():
    from experiments.plans import PlanError

    study = make_study(per_type=1, attention_checks=True)
    with pytest.raises(PlanError, match="catch media"):
        make_subject(study)


# --- The headphone check ---------------------------------------------------------------------


def test_the_check_tones_are_what_they_claim():
    levels = {}
    for kind in (checks.STANDARD, checks.QUIET, checks.ANTIPHASE):
        rate, samples = wavfile.read(io.BytesIO(checks.tone_wav(kind)))
        assert rate == checks.RATE and samples.shape == (rate, 2)
        levels[kind] = np.sqrt(np.mean(samples[:, 0].astype(float) ** 2))
        if kind == checks.ANTIPHASE:
            assert np.array_equal(samples[:, 0], -samples[:, 1])
        else:
            assert np.array_equal(samples[:, 0], samples[:, 1])
    assert 20 * np.log10(levels["quiet"] / levels["standard"]) == pytest.approx(-6.0, abs=0.01)
    assert levels["antiphase"] == pytest.approx(levels["standard"])


def sound_answers(subject, right):
    trials = Subject.objects.get(pk=subject.pk).meta["sound_check"]["trials"]
    data = {"step": "sound"}
    for t, trial in enumerate(trials, start=1):
        quiet = trial.index(checks.QUIET) + 1
        data[f"t{t}"] = quiet if right(t) else quiet % 3 + 1
    return data


def test_passing_the_sound_check_leads_to_the_questions(client):
    study = make_study(per_type=1, sound_check=True)
    subject = make_subject(study)
    client.post(url(subject), {"step": "start"})
    page = client.get(url(subject)).content.decode()
    assert "Sound check" in page and page.count("<audio") == 3 * checks.SOUND_TRIALS
    # Each tone is served by trial and slot; the URL says nothing about which is quiet.
    tone = client.get(reverse("tone", args=[subject.token, 1, 2]))
    assert tone.status_code == 200 and tone["Content-Type"] == "audio/wav"
    assert client.get(reverse("tone", args=[subject.token, 7, 1])).status_code == 404
    # An incomplete answer is asked again, with nothing stored.
    incomplete = client.post(url(subject), {"step": "sound", "t1": "1"})
    html = incomplete.content.decode()
    assert incomplete.status_code == 200 and "Please answer every question" in html
    # It says which, marks them for screen readers, and keeps the answer given.
    assert "Not answered: questions 2, 3, 4, 5, 6." in html
    assert html.count('aria-describedby="sound-error"') == checks.SOUND_TRIALS - 1
    assert re.search(r'name="t1" value="1" required checked', html)
    client.post(url(subject), sound_answers(subject, right=lambda t: t != 3))  # 5 of 6
    subject.refresh_from_db()
    assert subject.meta["sound_check"]["passed"] and subject.meta["sound_check"]["correct"] == 5
    assert "Question 1 of 6" in client.get(url(subject)).content.decode()


def test_drawing_the_sound_trials_keeps_what_another_request_stored():
    """The sound page, shown in one tab while the worker comes back through a new MTurk
    assignment in another, kept only its own stale copy of `meta`: the end page then
    submitted to the old, returned assignment."""
    subject = make_subject(make_study(per_type=1, sound_check=True))
    shown = Subject.objects.get(pk=subject.pk)  # as the sound page read it
    Subject.objects.filter(pk=subject.pk).update(meta={"entry": {"assignmentId": "NEW"}})
    trials = views._sound_trials(shown)
    stored = Subject.objects.get(pk=subject.pk).meta
    assert stored == {"entry": {"assignmentId": "NEW"}, "sound_check": {"trials": trials}}
    again = views._sound_trials(Subject.objects.get(pk=subject.pk))
    assert again == trials  # drawn once


def test_failing_the_sound_check_ends_politely_with_its_code(client):
    study = make_study(
        per_type=1,
        sound_check=True,
        completion_code="OK-1",
        failed_sound_code="SND-9",
        redirect_url="https://app.prolific.com/submissions/complete?cc={code}",
    )
    subject = make_subject(study)
    client.post(url(subject), {"step": "start"})
    client.get(url(subject))
    client.post(url(subject), sound_answers(subject, right=lambda t: t > 2))  # 4 of 6
    subject.refresh_from_db()
    assert subject.outcome == "failed_sound" and not subject.meta["sound_check"]["passed"]
    page = client.get(url(subject))
    html = page.content.decode()
    assert page.status_code == 200 and "SND-9" in html and "OK-1" not in html
    assert "headphones" in html and "cc=SND-9" in html
    # No way back to the questions.
    question = subject.questions.get(position=1)
    client.post(url(subject), {"choice": "a", "position": question.position})
    assert not Response.objects.filter(subject=subject).exists()


def test_declining_consent_ends_with_the_no_consent_code(client):
    study = make_study(
        per_type=1, require_consent=True, no_consent_code="NC-3", completion_code="OK"
    )
    subject = make_subject(study)
    assert "I do not agree" in client.get(url(subject)).content.decode()
    # A stray tap asks first, and changes nothing.
    asked = client.post(url(subject), {"step": "decline"}).content.decode()
    assert "Do you want to stop here?" in asked and "Back to the study" in asked
    subject.refresh_from_db()
    assert subject.outcome == "" and "Start" in client.get(url(subject)).content.decode()
    client.post(url(subject), {"step": "decline", "confirm": "1"})
    subject.refresh_from_db()
    assert subject.outcome == "no_consent" and subject.consented_at is None
    html = client.get(url(subject)).content.decode()
    assert "NC-3" in html and "OK" not in html.split("<main")[1].split("NC-3")[0]


def test_a_redirect_url_without_placeholder_is_for_completers_only():
    study = make_study(
        per_type=1,
        completion_code="OK",
        no_consent_code="NC",
        redirect_url="https://example.org/done",
    )
    subject = make_subject(study)
    subject.outcome = "no_consent"
    assert checks.end_redirect(subject) == ""
    subject.outcome = "completed"
    assert checks.end_redirect(subject) == "https://example.org/done"


def test_the_end_page_says_when_it_leaves_and_that_the_page_must_not_be_closed(client):
    """Going back to the platform is what records a Prolific completion: the page says that it
    leaves, when, and how to stay (a status note, at least 20 s: WCAG 2.2.1), not that it
    may be closed."""
    study = make_study(per_type=1, completion_code="OK-1", redirect_url="https://example.org/")
    subject = make_subject(study)
    answer_all(client, subject, first_named_unless_catch)
    html = client.get(url(subject)).content.decode()
    assert 'role="status">You will be taken back automatically in 20 seconds' in html
    assert 'data-after-s="20"' in html and "You may close this page" not in html
    plain = make_subject(make_study(per_type=1, slug="plain", collection_name="plain"))
    answer_all(client, plain, first_named_unless_catch)
    html = client.get(url(plain)).content.decode()
    assert "You may close this page" in html and "taken back" not in html


def test_a_page_with_an_error_says_so_in_its_title_and_focuses_what_it_is_about(client):
    study = make_study(per_type=1, require_consent=True, consent_text="Agree?", sound_check=True)
    subject = make_subject(study)
    html = client.get(url(subject)).content.decode()
    assert "<title>Welcome</title>" in html and "autofocus" not in html
    html = client.post(url(subject), {"step": "start"}).content.decode()
    assert "<title>Error: Welcome</title>" in html
    assert re.search(r'<input type="checkbox" name="consent"[^>]* autofocus>', html)
    client.post(url(subject), {"step": "start", "consent": "1"})
    html = client.post(url(subject), {"step": "sound", "t1": "1"}).content.decode()
    assert "<title>Error: Sound check</title>" in html
    subject.refresh_from_db()
    subject.outcome = "no_consent"
    subject.save()
    html = client.get(url(subject)).content.decode()
    assert "<title>Thank you for your interest</title>" in html


# --- The crowd-sourcing round trip -----------------------------------------------------------


def join_url(study, query=""):
    return reverse("join", args=[study.join_token]) + query


def test_prolific_ids_are_kept_and_the_same_participant_resumes(client):
    study = make_study(per_type=1, completion_code="OK-1")
    query = "?PROLIFIC_PID=pp1&STUDY_ID=st1&SESSION_ID=se1"
    first = client.get(join_url(study, query))
    subject = Subject.objects.get()
    assert first["Location"] == url(subject)
    assert subject.external_id == "pp1"
    assert subject.meta["entry"] == {"PROLIFIC_PID": "pp1", "STUDY_ID": "st1", "SESSION_ID": "se1"}
    client.post(url(subject), {"step": "start"})
    client.post(url(subject), {"choice": "a", "position": 1})
    # Another browser (a phone), the same Prolific submission: the same subject, question 2.
    other = type(client)()
    again = other.get(join_url(study, query))
    assert again["Location"] == url(subject) and Subject.objects.count() == 1
    assert "Question 2 of 6" in other.get(url(subject)).content.decode()
    # The id alone is no secret: without that submission's SESSION_ID, no one gets in.
    for forged in ("?PROLIFIC_PID=pp1", "?PROLIFIC_PID=pp1&STUDY_ID=st1&SESSION_ID=se2"):
        refused = type(client)().get(join_url(study, forged))
        assert refused.status_code == 403 and "Already taking part" in refused.content.decode()
    assert client.get(join_url(study, "?PROLIFIC_PID=pp1"))["Location"] == url(subject)  # its own


def test_mturk_ids_are_kept_and_the_preview_creates_nobody(client):
    study = make_study(per_type=1, external_id_param="")
    preview = client.get(join_url(study, "?assignmentId=ASSIGNMENT_ID_NOT_AVAILABLE&hitId=h1"))
    assert preview.status_code == 200 and "Accept the task" in preview.content.decode()
    assert not Subject.objects.exists()
    client.get(join_url(study, "?workerId=w1&assignmentId=a1&hitId=h1"))
    subject = Subject.objects.get()
    assert subject.external_id == "w1"
    assert subject.meta["entry"] == {"workerId": "w1", "assignmentId": "a1", "hitId": "h1"}


def test_an_mturk_preview_keeps_the_assignment_and_a_new_one_replaces_it(client):
    study = make_study(per_type=1, external_id_param="")
    subject = make_subject(study)
    client.get(
        url(subject) + "?workerId=w1&assignmentId=a1&hitId=h1&turkSubmitTo=https://one.example"
    )
    # MTurk's preview of the HIT is no assignment: the one accepted stands.
    client.get(url(subject) + "?assignmentId=ASSIGNMENT_ID_NOT_AVAILABLE&hitId=h1")
    subject.refresh_from_db()
    assert subject.meta["entry"]["assignmentId"] == "a1"
    assert subject.meta["entry"]["turkSubmitTo"] == "https://one.example"
    # Back through another assignment, its submit address goes with it.
    client.get(
        url(subject) + "?workerId=w1&assignmentId=a2&hitId=h1&turkSubmitTo=https://two.example"
    )
    subject.refresh_from_db()
    assert subject.meta["entry"] == {
        "workerId": "w1",
        "assignmentId": "a2",
        "hitId": "h1",
        "turkSubmitTo": "https://two.example",
    }


def finish(client, subject):
    answer_all(client, subject, lambda question: "a")
    return client.get(url(subject)).content.decode()


def test_an_mturk_hit_ends_by_submitting_its_assignment_to_mturk(client):
    study = make_study(
        per_type=1, completion_code="DONE-7", redirect_url="https://example.org/?cc={code}"
    )
    hit = "?workerId=w1&assignmentId=a1&hitId=h1&turkSubmitTo=https://workersandbox.mturk.com"
    client.get(join_url(study, hit))
    html = finish(client, Subject.objects.get())
    form = re.search(
        r'<form method="post" action="([^"]+)" id="mturk-submit">(.*?)</form>', html, re.S
    )
    assert form and form[1] == "https://workersandbox.mturk.com/mturk/externalSubmit"
    assert 'name="assignmentId" value="a1"' in form[2]
    assert 'name="completion_code" value="DONE-7"' in form[2]
    # Back through another assignment of the HIT (returned, or expired): that one is submitted.
    other = type(client)()
    other.get(join_url(study, hit.replace("a1", "a2")))
    assert (
        'name="assignmentId" value="a2"' in other.get(url(Subject.objects.get())).content.decode()
    )
    assert "csrfmiddlewaretoken" not in form[2]  # nothing of this site's goes to MTurk
    assert 'http-equiv="refresh"' not in html  # no redirect away before the HIT is submitted
    assert "You may close this page" not in html  # it is not finished until submitted
    # Only MTurk's own submit addresses; a Prolific participant gets the redirect as before.
    for query in (
        "?workerId=w2&assignmentId=a2&hitId=h1&turkSubmitTo=https://evil.example",
        "?PROLIFIC_PID=p1",
    ):
        other = type(client)()
        other.get(join_url(study, query))
        html = finish(other, Subject.objects.order_by("pk").last())
        assert "mturk-submit" not in html and "https://example.org/?cc=DONE-7" in html


def test_ids_on_a_personal_link_are_captured_once(client):
    study = make_study(per_type=1)
    subject = make_subject(study)
    client.get(url(subject) + "?PROLIFIC_PID=p9&SESSION_ID=s1")
    client.get(url(subject) + "?PROLIFIC_PID=other&SESSION_ID=s2&STUDY_ID=x")
    subject.refresh_from_db()
    assert subject.external_id == "p9"
    assert subject.meta["entry"] == {"PROLIFIC_PID": "p9", "SESSION_ID": "s1", "STUDY_ID": "x"}


def test_full_and_closed_studies_give_clear_pages(client):
    study = make_study(per_type=1, join_cap=1)
    client.get(join_url(study, "?PROLIFIC_PID=a"))
    full = client.get(join_url(study, "?PROLIFIC_PID=b"))
    assert "This study is full" in full.content.decode()
    # The one who got in still resumes while the study is full.
    assert client.get(join_url(study, "?PROLIFIC_PID=a")).status_code == 302
    # One who never started (a link preview, a closed tab) frees the place after a while;
    # one who started holds it.
    joined = Subject.objects.get(external_id="a")
    Subject.objects.filter(pk=joined.pk).update(created_at=timezone.now() - JOIN_HOLD)
    assert client.get(join_url(study, "?PROLIFIC_PID=b")).status_code == 302
    client.post(url(Subject.objects.get(external_id="b")), {"step": "start"})
    Subject.objects.filter(external_id="b").update(created_at=timezone.now() - JOIN_HOLD)
    assert "This study is full" in client.get(join_url(study, "?PROLIFIC_PID=c")).content.decode()
    Study.objects.filter(pk=study.pk).update(status=Study.Status.CLOSED)
    closed = client.get(join_url(study, "?PROLIFIC_PID=c"))
    assert "This study is not open" in closed.content.decode()


@pytest.mark.parametrize(("minutes", "full"), [(29, True), (31, False)])
def test_a_joined_subject_who_never_started_holds_a_place_for_half_an_hour(client, minutes, full):
    study = make_study(per_type=1, join_cap=1)
    client.get(join_url(study, "?PROLIFIC_PID=a"))
    joined = timezone.now() - timedelta(minutes=minutes)
    Subject.objects.filter(external_id="a").update(created_at=joined)
    other = type(client)().get(join_url(study, "?PROLIFIC_PID=b"))
    assert ("This study is full" in other.content.decode()) is full
    assert Subject.objects.filter(external_id="b").exists() is not full


@override_settings(JOIN_UNSTARTED_PER_ADDRESS=2)
def test_one_address_makes_only_a_few_subjects_that_do_not_start(client):
    """A script fetching the join link again and again (no cookies, new ids) would fill the
    study's cap, or the database, with subjects nobody takes part as."""
    study = make_study(per_type=1, require_consent=True)

    def join(address, query=""):  # each time a browser of its own
        return type(client)(REMOTE_ADDR=address).get(join_url(study, query))

    assert join("203.0.113.5").status_code == 302
    assert join("203.0.113.5", "?PROLIFIC_PID=x").status_code == 302  # new ids do not help
    busy = join("203.0.113.5")
    assert busy.status_code == 429 and busy["Retry-After"] == "60"
    assert "Please wait a minute" in busy.content.decode()
    assert Subject.objects.count() == 2
    assert join("198.51.100.9").status_code == 302  # nobody else is held up
    # One who starts no longer counts, and keeps no trace of the address; one who declines does.
    first, second = Subject.objects.order_by("pk")[:2]
    client.post(url(first), {"step": "start", "consent": "on"})
    first.refresh_from_db()
    assert first.consented_at and views.JOINED_FROM not in first.meta
    client.post(url(second), {"step": "decline", "confirm": "1"})
    assert Subject.objects.get(pk=second.pk).outcome == Subject.Outcome.NO_CONSENT
    assert join("203.0.113.5").status_code == 302
    assert join("203.0.113.5").status_code == 429
    # Nor do those who joined longer than JOIN_HOLD ago.
    Subject.objects.update(created_at=timezone.now() - JOIN_HOLD)
    assert join("203.0.113.5").status_code == 302
    assert Subject.objects.count() == 5


@override_settings(JOIN_UNSTARTED_PER_ADDRESS=1, TRUSTED_PROXY_COUNT=1)
def test_behind_a_proxy_the_join_limit_counts_the_address_the_proxy_saw(client):
    study = make_study(per_type=1)

    def join(forwarded):
        browser = type(client)(REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR=forwarded)
        return browser.get(join_url(study)).status_code

    assert join("203.0.113.5") == 302
    assert join("198.51.100.9") == 302  # the proxy's own address is everyone's
    assert join("198.51.100.9, 203.0.113.5") == 429  # what the client claims is not trusted


# --- Behaviour log and exports ---------------------------------------------------------------


BEHAVIOUR = {
    "plays": {"query": 1, "a": 2, "b": 1},
    "listened_ms": {"a": 2400, "b": 1800},
    "first_play_ms": 350,
    "blur": 1,
    "focus": 1,
    "hidden": 2,
    "errors": [{"role": "b", "reason": "timeout", "ms": 20000}],
    "retries": 1,
}


def test_the_behaviour_log_is_stored_and_exported(client):
    study = make_study(per_type=1)
    subject = make_subject(study, external_id="pp7")
    client.post(url(subject), {"step": "start"})
    client.post(
        url(subject),
        {"choice": "b", "position": 1, "response_ms": "5100", "behaviour": json.dumps(BEHAVIOUR)},
    )
    row = next(response_rows(study))
    assert row["response_ms"] == 5100
    assert (row["first_play_ms"], row["plays_query"], row["plays_a"], row["plays_b"]) == (
        350,
        1,
        2,
        1,
    )
    assert (row["listened_a_ms"], row["listened_b_ms"]) == (2400, 1800)
    assert (row["blur"], row["focus"], row["hidden"]) == (1, 1, 2)
    assert (row["media_errors"], row["media_retries"]) == ("b:timeout", 1)
    assert set(row) == set(COLUMNS) | {"machine_S"}
    # The report says how many answers were given without all their media.
    client.post(url(subject), {"choice": "a", "position": 2})
    frame = responses_frame(study, include_incomplete=True)
    assert frame["media_errors"].tolist() == [1, 0]
    report = build_report(frame)
    assert report.counts["answers_with_media_errors"] == 1
    assert "1 answer was given while a medium could not be loaded" in render(report, "markdown")
    # Or left out: an answer given without hearing a candidate may be a guess.
    heard = build_report(frame, heard_only=True)
    assert (heard.n_answers, report.n_answers) == (1, 2)
    assert "could not be loaded (`media_errors` in the export); they are left out." in render(
        heard, "markdown"
    )
    # The log is the browser's: only the page's own words reach the export.
    crafted = {"errors": [{"role": "=SUM(1+1", "reason": "1)+cmd|' /C calc'!A0"}, "x"]}
    Response.objects.filter(subject=subject, question__position=2).update(behaviour=crafted)
    assert [r["media_errors"] for r in response_rows(study)] == ["b:timeout", "?:?"]


def test_dictionary_and_anonymised_export(client, tmp_path):
    study = make_study(per_type=1)
    subject = make_subject(study, external_id="pp7")
    client.post(url(subject), {"step": "start"})
    client.post(url(subject), {"choice": "a", "position": 1})
    dictionary = {row["column"]: row["meaning"] for row in dictionary_rows(study)}
    assert list(dictionary) == list(next(response_rows(study)))  # every column, in order
    assert all(meaning for meaning in dictionary.values())

    call_command("export_responses", "tiny", "--anonymise", "--output", str(tmp_path / "a.csv"))
    call_command("export_responses", "tiny", "--dictionary", "--output", str(tmp_path / "d.csv"))
    text = (tmp_path / "a.csv").read_text()
    assert subject.token not in text and "pp7" not in text
    row = next(csv.DictReader(io.StringIO(text)))
    assert row["external_id"] == pseudonym(study, "pp7") == pseudonym(study, "pp7")
    assert row["subject"] == pseudonym(study, subject.token) != row["external_id"]
    assert row["external_id"].startswith("p") and len(row["external_id"]) == 17
    columns = [r["column"] for r in csv.DictReader(io.StringIO((tmp_path / "d.csv").read_text()))]
    assert columns == list(dictionary)


def test_admin_links_export_anonymised_and_dictionary(admin_client, client):
    study = make_study(per_type=1)
    subject = make_subject(study, external_id="pp7")
    client.post(url(subject), {"step": "start"})
    client.post(url(subject), {"choice": "a", "position": 1})
    export = reverse("admin:experiments_study_responses", args=[study.pk])
    change = admin_client.get(reverse("admin:experiments_study_change", args=[study.pk]))
    assert f"{export}?anonymise=1" in change.content.decode()
    anonymised = b"".join(admin_client.get(export + "?anonymise=1").streaming_content).decode()
    assert "pp7" not in anonymised and pseudonym(study, "pp7") in anonymised
    full = b"".join(admin_client.get(export).streaming_content).decode()
    assert "pp7" in full
    dictionary = b"".join(admin_client.get(export + "?dictionary=1").streaming_content).decode()
    assert dictionary.startswith("column,meaning") and "catch_score" in dictionary


def test_the_subject_list_shows_outcome_and_catch_score(admin_client, client):
    study = catch_study(catch_pass_threshold=0.5)
    subject = make_subject(study)
    answer_all(client, subject, ground_truth)
    page = admin_client.get(reverse("admin:experiments_subject_changelist")).content.decode()
    assert "Catch score" in page and "100%" in page and "completed" in page


# --- Languages ----------------------------------------------------------------------------


def test_the_study_language_translates_the_participant_pages(client):
    study = make_study(per_type=1, language="de", require_consent=True)
    subject = make_subject(study)
    html = client.get(url(subject)).content.decode()
    assert '<html lang="de"' in html and "Willkommen" in html and "Starten" in html
    client.post(url(subject), {"step": "start", "consent": "1"})
    html = client.get(url(subject)).content.decode()
    assert "Frage 1 von 6" in html and "Question" not in html
    english = make_study(per_type=1, slug="en", collection_name="en")
    assert "Welcome" in client.get(url(make_subject(english))).content.decode()


def test_the_german_catalogue_covers_every_participant_string():
    """Every `translate` string of the participant templates has a German translation in the
    committed, compiled catalogue (so `makemessages` + `compilemessages` were not forgotten)."""
    import gettext
    import re
    from pathlib import Path

    from django.conf import settings as django_settings

    folder = Path(django_settings.BASE_DIR)
    with open(folder / "locale/de/LC_MESSAGES/django.mo", "rb") as mo:
        catalogue = gettext.GNUTranslations(mo)._catalog
    strings = set()
    for template in (folder / "templates/experiments").glob("*.html"):
        text = template.read_text()
        strings |= set(re.findall(r'{% translate "([^"]+)" %}', text))
        strings |= set(re.findall(r"{% translate '([^']+)' %}", text))
    assert len(strings) > 30
    untranslated = sorted(s for s in strings if not catalogue.get(s))
    assert untranslated == []


# --- Media validation at import -------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"seconds": 0.5}, "too short (0.5"),
        ({"rate": 7350}, "audio sampled at 7350 Hz"),
    ],
)
def test_media_a_participant_could_not_judge_are_refused_with_the_reason(
    tmp_path, options, message
):
    from engine.features import MediaError
    from experiments.media import make_items

    from .clips import music_video

    source = music_video(tmp_path / "bad.mp4", 1, **options)
    with pytest.raises(MediaError, match=re.escape(f"bad.mp4: {message}")):
        make_items(source, tmp_path / "v.mp4", tmp_path / "m.m4a")


def test_the_welcome_page_asks_for_headphones_where_the_sound_check_needs_them(client):
    speakers = make_study(per_type=1, slug="any", collection_name="any")
    assert "headphones or speakers" in client.get(url(make_subject(speakers))).content.decode()
    checked = make_study(per_type=1, sound_check=True, language="de")
    page = client.get(url(make_subject(checked))).content.decode()
    assert "Bitte verwenden Sie Kopfhörer (zuerst kommt eine Prüfung" in page
