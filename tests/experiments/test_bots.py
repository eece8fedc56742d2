"""Bots take studies through the real participant pages over HTTP (a live server)."""

import io
import socket

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from analysis.load import responses_frame
from analysis.preference import preference_table
from experiments.bots import run_bots
from experiments.models import Response, Study, Subject
from experiments.tasks import ensure_catch_pair

from .factories import make_study

pytestmark = pytest.mark.django_db(transaction=True)


def checked_study(**fields):
    """Every step a crowd-sourced participant meets: consent, sound check, catch questions."""
    study = make_study(
        per_type=1,
        require_consent=True,
        sound_check=True,
        attention_checks=True,
        catch_count=2,
        catch_pass_threshold=1.0,
        completion_code="BOT-OK",
        **fields,
    )
    ensure_catch_pair(study.collection_id)
    return study


def test_ground_truth_bots_finish_and_fill_the_analysis(live_server):
    study = checked_study()
    runs = run_bots(study, live_server.url, subjects=2, strategy="ground-truth", seed=1)
    assert [run.answers for run in runs] == [8, 8]
    assert [(run.outcome, run.code) for run in runs] == [("completed", "BOT-OK")] * 2
    for run in runs:
        assert run.subject.external_id.startswith("bot-")
        assert run.subject.meta["entry"]["STUDY_ID"] == "bot-tiny"
        assert run.subject.meta["sound_check"]["passed"]
        assert run.subject.catch_score == 1.0
    table = preference_table(responses_frame(study))
    assert (table.loc[["GR", "GS"]] == 100.0).all().all()
    assert Response.objects.filter(subject__study=study).count() == 16
    assert all(r.behaviour["bot"] == "ground-truth" for r in Response.objects.all())


def test_machine_bots_answer_as_the_system_prefers(live_server):
    study = make_study(per_type=1)
    (run,) = run_bots(study, live_server.url, strategy="machine")
    assert run.outcome == "completed"
    for response in Response.objects.filter(subject=run.subject).select_related("question"):
        machine = response.question.machine
        if machine:
            assert response.choice == machine["S"]


def test_random_bots_are_seeded_and_can_fail_the_attention_checks(live_server):
    study = checked_study()
    runs = run_bots(study, live_server.url, subjects=4, strategy="random", seed=7)
    outcomes = {run.outcome for run in runs}
    assert outcomes <= {"completed", "failed_attention"} and all(r.answers == 8 for r in runs)
    for run in runs:  # the threshold (every catch question) decides the outcome
        assert (run.outcome == "completed") == (run.subject.catch_score == 1.0)
    failed = [r.subject.ordinal for r in runs if r.outcome == "failed_attention"]
    assert set(responses_frame(study)["subject"]).isdisjoint(failed)
    choices = [
        list(
            Response.objects.filter(subject=r.subject)
            .order_by("question__position")
            .values_list("choice", flat=True)
        )
        for r in runs
    ]
    assert len({tuple(c) for c in choices}) > 1  # not all the same


def test_the_command_runs_bots_against_a_site_and_prints_the_analysis(live_server):
    study = make_study(per_type=1)
    out = io.StringIO()
    call_command(
        "run_bots", "tiny", "--subjects", "2", "--strategy", "ground-truth",
        "--base-url", live_server.url, "--seed", "3", stdout=out,
    )  # fmt: skip
    text = out.getvalue()
    assert text.count("6 answers, completed") == 2
    assert "GR" in text and "100.0" in text
    assert Subject.objects.filter(study=study, completed_at__isnull=False).count() == 2


def test_the_command_serves_the_site_itself_without_a_base_url():
    make_study(per_type=1)
    out = io.StringIO()
    call_command("run_bots", "tiny", "--strategy", "machine", stdout=out)
    assert "6 answers, completed" in out.getvalue()


def test_the_command_refuses_a_study_that_is_not_open():
    make_study(per_type=1, status=Study.Status.READY)
    with pytest.raises(CommandError, match="open it first"):
        call_command("run_bots", "tiny")


def test_the_command_says_when_the_site_cannot_be_reached():
    study = make_study(per_type=1)
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{free.getsockname()[1]}"
    with pytest.raises(CommandError) as refused:
        call_command("run_bots", "tiny", "--base-url", url)
    assert str(refused.value) == f"The site at {url} cannot be reached (is the server running?)"
    assert not study.subjects.exists()


def test_a_machine_bot_follows_the_first_system_only_where_it_judged():
    from experiments.bots import _choose
    from experiments.models import Question

    rng = np.random.default_rng(0)
    question = Question(kind_a="S1", kind_b="G", machine={"S2": "a"})  # S1 could not judge
    assert _choose(question, "machine", rng, "S1") == "b"  # as ground-truth, not S2's choice
    question.machine = {"S1": "a", "S2": "b"}
    assert _choose(question, "machine", rng, "S1") == "a"
