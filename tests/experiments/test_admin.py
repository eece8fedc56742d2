"""The researchers' admin: staff only, study actions, subject links, progress and exports."""

import csv
import errno
import io
import os
import re
import socket
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User
from django.core.files.base import ContentFile
from django.db import connection, transaction
from django.db.models.signals import pre_save
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone

from experiments.ingest import add_pairs
from experiments.media import probe
from experiments.models import Collection, Pair, Response, Study, Subject, System
from experiments.plans import PlanError
from experiments.subjects import create_subjects

from .factories import make_collection, make_study, make_subject, make_system

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/experiments/study/"


def read_csv(response) -> list[dict]:
    body = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(body)))


def act(client, action, *studies, **extra):
    data = {"action": action, "_selected_action": [s.pk for s in studies], **extra}
    return client.post(CHANGELIST, data, follow=True)


def answer_all(subject, upto: int):
    """Answers through the participant pages, as a browser would."""
    client = Client()
    page = reverse("subject", args=[subject.token])
    client.post(page, {"step": "start"})
    for position in range(1, upto + 1):
        if position == 4:
            client.post(page, {"step": "continue", "position": 4})
        assert client.post(page, {"choice": "a", "position": position}).status_code == 302


@pytest.fixture
def study():
    return make_study(per_type=1, status=Study.Status.READY)


def admin_urls(study):
    return [
        "/admin/",
        CHANGELIST,
        f"{CHANGELIST}{study.pk}/change/",
        reverse("admin:experiments_study_links", args=[study.pk]),
        reverse("admin:experiments_study_links_csv", args=[study.pk]),
        reverse("admin:experiments_study_responses", args=[study.pk]),
        reverse("admin:experiments_study_results", args=[study.pk]),
        "/admin/experiments/collection/",
        "/admin/experiments/pair/",
        "/admin/experiments/system/",
        "/admin/experiments/subject/",
    ]


def test_admin_pages_need_a_staff_login(client, study):
    member = Client()
    member.force_login(User.objects.create_user("visitor"))
    for url in admin_urls(study):
        for who in (client, member):
            response = who.get(url)
            assert response.status_code == 302, url
            assert response["Location"].startswith("/admin/login/"), url


def test_every_admin_page_renders_for_staff(admin_client, study):
    subject = make_subject(study)
    Study.objects.filter(pk=study.pk).update(status=Study.Status.OPEN)
    answer_all(subject, 2)
    Study.objects.filter(pk=study.pk).update(status=Study.Status.CLOSED)
    for url in [*admin_urls(study), f"/admin/experiments/subject/{subject.pk}/change/"]:
        assert admin_client.get(url).status_code == 200, url
    study_page = admin_client.get(f"{CHANGELIST}{study.pk}/change/").content.decode()
    for name in ("links", "responses", "results"):
        assert reverse(f"admin:experiments_study_{name}", args=[study.pk]) in study_page
    pair = study.collection.pairs.first()
    page = admin_client.get(f"/admin/experiments/pair/{pair.pk}/change/").content.decode()
    assert reverse("media", args=[pair.video_token]) in page  # a preview
    # Staff may preview media of a study that is not open.
    assert admin_client.get(reverse("media", args=[pair.video_token])).status_code == 200


def test_collection_list_counts_pairs_by_status_and_split(admin_client):
    collection = make_collection(6, name="counted")
    collection.pairs.filter(key="clip000").update(status="failed", error="no audio track")
    collection.pairs.filter(key="clip001").update(split="train")
    collection.pairs.filter(key="clip005").update(split="catch")  # an attention check's pair
    page = admin_client.get("/admin/experiments/collection/").content.decode()
    # The ready pairs by split (the catch pair apart) add up to the ready count.
    assert "5 ready" in page and "1 failed" in page and "Ready pairs by split" in page
    assert "1 train · 0 val · 3 test · 1 catch" in re.sub(r"<[^>]+>", "", page)
    ready_tests = f"collection__id__exact={collection.pk}&status__exact=ready&split__exact=test"
    assert ready_tests.replace("&", "&amp;") in page
    failed = admin_client.get(
        f"/admin/experiments/pair/?collection__id__exact={collection.pk}&status__exact=failed"
    ).content.decode()
    assert "clip000" in failed and "no audio track" in failed and "clip002" not in failed


def test_a_pair_without_media_shows_why_instead_of_players(admin_client):
    collection = make_collection(2, name="half")
    failed = collection.pairs.get(key="clip000")
    failed.video_file = failed.music_file = ""
    failed.status, failed.error = Pair.Status.FAILED, "no audio track"
    failed.save()
    page = admin_client.get(f"/admin/experiments/pair/{failed.pk}/change/").content.decode()
    assert "no media: failed — no audio track" in page
    assert reverse("media", args=[failed.video_token]) not in page and "<video" not in page
    ready = collection.pairs.get(key="clip001")
    page = admin_client.get(f"/admin/experiments/pair/{ready.pk}/change/").content.decode()
    assert reverse("media", args=[ready.music_token]) in page and "no media" not in page


def test_a_study_is_created_from_a_collection_and_its_systems(admin_client):
    collection = make_collection(4, name="fresh")
    system = make_system(collection, name="vmnet-fresh")
    other = make_system(make_collection(3, name="other"), name="elsewhere")
    form = {
        "name": "Pilot",
        "slug": "pilot",
        "collection": collection.pk,
        "per_type": 1,
        "comparisons": "[]",
        "seed": 3,
        "language": "en",
        "external_id_param": "PROLIFIC_PID",
        "min_listen_ms": 0,
        "catch_count": 4,
        "studysystem_set-TOTAL_FORMS": 1,
        "studysystem_set-INITIAL_FORMS": 0,
        "studysystem_set-0-system": other.pk,
        "studysystem_set-0-label": "S",
    }
    refused = admin_client.post("/admin/experiments/study/add/", form)
    assert (
        refused.status_code == 200 and "belongs to another collection" in refused.content.decode()
    )
    form["studysystem_set-0-system"] = system.pk
    created = admin_client.post("/admin/experiments/study/add/", form)
    assert created.status_code == 302
    study = Study.objects.get(slug="pilot")
    assert study.status == Study.Status.DRAFT and list(study.systems.all()) == [system]
    # Two systems both left at the default label are numbered S1, S2 in the form's order.
    second = make_system(collection, name="cca-fresh")
    two = {**form, "slug": "pair", "name": "Pair", "studysystem_set-TOTAL_FORMS": 2,
           "studysystem_set-1-system": second.pk, "studysystem_set-1-label": "S"}  # fmt: skip
    assert admin_client.post("/admin/experiments/study/add/", two).status_code == 302
    labels = Study.objects.get(slug="pair").studysystem_set.values_list("system", "label")
    assert sorted(labels) == sorted([(system.pk, "S1"), (second.pk, "S2")])


def test_the_study_forms_systems_name_their_collections(admin_client, study):
    other = make_collection(3, name="other")
    make_system(other)  # the same name as the study's system, in another collection
    page = admin_client.get("/admin/experiments/study/add/").content.decode()
    assert ">other / vmnet (VM-NET)</option>" in page
    assert ">tiny / vmnet (VM-NET)</option>" in page
    assert page.count(">vmnet (VM-NET)</option>") == 0


def system_form(system, **changes) -> dict:
    form = {"collection": system.collection_id, "name": system.name, "kind": system.kind}
    return {**form, "config": "{}", "initial-config": "{}", **changes}


def test_a_system_in_a_locked_study_design_cannot_change_or_go(admin_client, study):
    system = study.systems.get()
    url = f"/admin/experiments/system/{system.pk}/change/"
    other = make_collection(3, name="other")
    changed = system_form(system, collection=other.pk, kind="cca", name="renamed")
    for lock in ("open", "subjects"):
        if lock == "open":
            Study.objects.filter(pk=study.pk).update(status=Study.Status.OPEN)
        else:  # ready, with a subject
            Study.objects.filter(pk=study.pk).update(status=Study.Status.READY)
            make_subject(study)
        page = admin_client.get(url).content.decode()
        assert 'name="kind"' not in page and 'name="name"' not in page, lock
        assert "in the fixed design of Tiny study (" in page
        saved = admin_client.post(url, changed, follow=True).content.decode()
        assert "Not saved" in saved and "changed successfully" not in saved
        system.refresh_from_db()
        assert (system.collection, system.kind, system.name) == (study.collection, "vmnet", "vmnet")
        # Nor deleted: neither from its page nor with the list's action.
        delete = f"/admin/experiments/system/{system.pk}/delete/"
        assert admin_client.post(delete, {"post": "yes"}).status_code == 403
        admin_client.post(
            "/admin/experiments/system/",
            {"action": "delete_selected", "_selected_action": [system.pk], "post": "yes"},
        )
        assert System.objects.filter(pk=system.pk).exists()


def test_work_that_has_not_reported_for_a_while_says_since_when(admin_client, study):
    """A worker that died leaves a preparation at its last progress, with nothing else to
    show it until the task is delivered again (hours later)."""

    system = study.systems.get()
    quiet = timezone.now() - timedelta(minutes=25)
    Study.objects.filter(pk=study.pk).update(
        status=Study.Status.PREPARING, progress=0.42, progress_at=quiet
    )
    System.objects.filter(pk=system.pk).update(
        status=System.Status.RUNNING, progress=0.5, progress_at=quiet
    )
    studies = admin_client.get("/admin/experiments/study/").content.decode()
    systems = admin_client.get("/admin/experiments/system/").content.decode()
    assert "42%, last news 25\xa0minutes ago" in studies
    assert "50%, last news 25\xa0minutes ago" in systems
    Study.objects.filter(pk=study.pk).update(progress_at=timezone.now())  # it reported
    System.objects.filter(pk=system.pk).update(status=System.Status.READY)  # done
    assert "last news" not in admin_client.get("/admin/experiments/study/").content.decode()
    assert "last news" not in admin_client.get("/admin/experiments/system/").content.decode()


def test_the_systems_list_shows_their_test_recall(admin_client, study):
    system = study.systems.get()
    metrics = {"V2M": {"R@1": 0.1, "R@10": 0.42}, "M2V": {"R@10": 0.38}, "n": 60}
    System.objects.filter(pk=system.pk).update(metrics={"best_epoch": 12, "test": metrics})
    systems = admin_client.get("/admin/experiments/system/").content.decode()
    assert "R@10 V2M 0.420, M2V 0.380" in systems and "best_epoch" not in systems


def test_a_deletions_confirmation_names_a_few_objects_of_a_kind_and_counts_them_all(
    admin_client, monkeypatch
):
    """A collection of 200,000 pairs made a confirmation page of 16.8 MB."""
    monkeypatch.setattr("experiments.admin.LISTED", 2)
    collection = make_collection(5, name="many")
    page = admin_client.get(f"/admin/experiments/collection/{collection.pk}/delete/")
    text = page.content.decode()
    assert "… and 3 more (counted in the summary)" in text
    assert "<li>Pairs: 5</li>" in text
    listed = [
        key for key in collection.pairs.values_list("key", flat=True) if f"many/{key}<" in text
    ]
    assert len(listed) == 2
    admin_client.post(f"/admin/experiments/collection/{collection.pk}/delete/", {"post": "yes"})
    assert not Collection.objects.filter(pk=collection.pk).exists()


def test_deleting_a_system_a_study_holds_says_why_it_cannot_go(admin_client, study):
    """Not that the account lacks a permission (Django's words for a system that cannot go)."""
    Study.objects.filter(pk=study.pk).update(status=Study.Status.OPEN)
    system = study.systems.get()
    for model, obj in (("system", system), ("collection", study.collection)):
        page = admin_client.post(
            f"/admin/experiments/{model}/",
            {"action": "delete_selected", "_selected_action": [obj.pk]},
        ).content.decode()
        assert "have permission" not in page, model
        assert "protected related objects" in page, model
        assert f"System: {system.name}, in the fixed design of study {study} (open)" in page
    assert System.objects.filter(pk=system.pk).exists()


def test_a_collection_a_study_uses_is_refused_at_once_naming_the_study(admin_client, study):
    """Django's walk listed every question of the study's subjects to refuse (124,248
    questions: 18-42 s, a page of 5.3 MB, ~1 GB): the study is named instead, and the
    questions are not read."""
    from django.test.utils import CaptureQueriesContext

    create_subjects(study, 3)
    collection = study.collection
    url = f"/admin/experiments/collection/{collection.pk}/delete/"
    for ask in (
        lambda: admin_client.get(url),
        lambda: admin_client.post(url, {"post": "yes"}),
        lambda: admin_client.post(
            "/admin/experiments/collection/",
            {"action": "delete_selected", "_selected_action": [collection.pk], "post": "yes"},
        ),
    ):
        with CaptureQueriesContext(connection) as queries:
            page = ask()
        questions = [
            q["sql"] for q in queries.captured_queries if "experiments_question" in q["sql"]
        ]
        print(f"{len(queries)} queries, {len(questions)} of them on questions: {questions[:1]}")
        assert questions == []
        text = page.content.decode()
        assert page.status_code == 200 and "protected related objects" in text
        change = reverse("admin:experiments_study_change", args=[study.pk])
        assert (
            f'Study: <a href="{change}">{study}</a> (ready), which uses collection {collection}: '
            "delete the study first" in text
        )
    assert Collection.objects.filter(pk=collection.pk).exists()
    assert study.subjects.count() == 3


def test_the_systems_a_study_holds_are_found_by_one_query(rf, admin_user):
    """The collection's deletion page asked for each system's studies, then for each study
    whether it has subjects: 45 queries for 22 systems."""
    from django.test.utils import CaptureQueriesContext

    from experiments.admin import locked_systems_as_protected
    from experiments.models import StudySystem

    collection = make_collection(8)
    systems = [make_system(collection, name=f"system {i}") for i in range(4)]
    for i, status in enumerate([Study.Status.OPEN, Study.Status.READY, Study.Status.DRAFT]):
        held = Study.objects.create(
            name=f"study {i}", slug=f"study-{i}", collection=collection, status=status
        )
        for label, system in zip(("S1", "S2"), systems[i : i + 2], strict=True):
            StudySystem.objects.create(study=held, system=system, label=label)
    Subject.objects.create(study=Study.objects.get(slug="study-1"), ordinal=0)  # locks it
    request = rf.get("/")
    request.user = admin_user
    with CaptureQueriesContext(connection) as queries:
        protected = locked_systems_as_protected(
            request, System.objects.filter(collection=collection), [], {}, set(), []
        )[3]
    print(f"{len(queries)} queries: {protected}")
    assert len(queries) == 1
    assert protected == [
        "System: system 0, in the fixed design of study study 0 (open)",
        "System: system 1, in the fixed design of study study 0 (open), study study 1 (ready)",
        "System: system 2, in the fixed design of study study 1 (ready)",
    ]  # system 3: in the design of a draft without subjects, free to go


def test_a_system_config_that_cannot_train_is_refused_when_saved(admin_client, study):
    """Not when its training starts (hours later on a busy queue)."""
    system = study.systems.get()
    added = system_form(system, name="long", config='{"epochs": 400}')
    page = admin_client.post("/admin/experiments/system/add/", added).content.decode()
    assert "unknown config keys: [&#x27;epochs&#x27;]" in page
    assert not System.objects.filter(name="long").exists()
    url = f"/admin/experiments/system/{system.pk}/change/"
    page = admin_client.post(url, system_form(system, config='{"max_epochs": "100"}'))
    assert "max_epochs must be a whole number, not &#x27;100&#x27;" in page.content.decode()
    system.refresh_from_db()
    assert system.config == {}
    # Uploaded results train nothing: their config is not the engine's.
    external = system_form(system, name="ext", kind="external", config='{"note": 1}')
    assert admin_client.post("/admin/experiments/system/add/", external).status_code == 302


def test_a_system_change_sends_its_ready_study_back_to_draft(
    admin_client, study, django_capture_on_commit_callbacks
):
    system = study.systems.get()
    url = f"/admin/experiments/system/{system.pk}/change/"
    assert 'name="kind"' in admin_client.get(url).content.decode()  # ready, no subjects
    assert admin_client.post(url, system_form(system, name="renamed")).status_code == 302
    study.refresh_from_db()
    assert study.status == Study.Status.READY  # a new name is no design change
    assert system.results.exists() and system.status == System.Status.READY
    system.checkpoint.save("old.pt", ContentFile(b"trained as vmnet"))
    System.objects.filter(pk=system.pk).update(metrics={"recall@10": 0.5})
    old_checkpoint = Path(system.checkpoint.path)
    assert old_checkpoint.read_bytes() == b"trained as vmnet"
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(url, system_form(system, kind="cca"), follow=True)
    page = response.content.decode()
    assert "draft again: prepare it again" in page
    study.refresh_from_db()
    system.refresh_from_db()
    assert (study.status, system.kind) == (Study.Status.DRAFT, "cca")
    # What the old kind trained and found goes: preparing trains the new one.
    assert not system.checkpoint and not system.results.exists()
    assert (system.status, system.metrics) == (System.Status.NEW, {})
    assert not old_checkpoint.exists()  # the file too, once the change is committed


def test_an_uploaded_systems_config_changes_without_losing_its_results(admin_client, study):
    """An uploaded system's config trains nothing (a note, at most): a change to it keeps the
    uploaded results, the system ready and its study ready; they could not be made again."""
    system = study.systems.get()
    System.objects.filter(pk=system.pk).update(kind=System.Kind.EXTERNAL, metrics={"n": 4})
    system.refresh_from_db()
    results = sorted(system.results.values_list("pk", flat=True))
    assert results
    url = f"/admin/experiments/system/{system.pk}/change/"
    page = admin_client.post(url, system_form(system, config='{"note": 2}'), follow=True)
    assert "changed successfully" in page.content.decode()
    assert "draft again" not in page.content.decode()
    system.refresh_from_db()
    study.refresh_from_db()
    assert system.config == {"note": 2}
    assert sorted(system.results.values_list("pk", flat=True)) == results
    assert (system.status, system.progress, system.metrics) == (System.Status.READY, 1.0, {"n": 4})
    assert study.status == Study.Status.READY


def test_open_and_close_follow_the_study_states(admin_client, study):
    draft = make_study(per_type=1, status=Study.Status.DRAFT, slug="draft", collection_name="d")
    page = act(admin_client, "open_studies", study, draft).content.decode()
    assert "1 study(ies) now open" in page and "skipped" in page
    study.refresh_from_db()
    draft.refresh_from_db()
    assert study.status == Study.Status.OPEN and draft.status == Study.Status.DRAFT
    act(admin_client, "close_studies", study)
    study.refresh_from_db()
    assert study.status == Study.Status.CLOSED


def test_generated_links_work_and_come_as_csv(admin_client, study):
    url = reverse("admin:experiments_study_links", args=[study.pk])
    redirect = act(admin_client, "subject_links", study)
    assert redirect.redirect_chain[-1][0] == url
    page = admin_client.get(url).content.decode()
    assert f"/join/{study.join_token}/?PROLIFIC_PID={{{{%PROLIFIC_PID%}}}}" in page
    download = admin_client.post(url, {"count": 3, "base_url": "https://study.example.org"})
    assert download["Content-Type"].startswith("text/csv")
    assert "attachment" in download["Content-Disposition"]
    rows = read_csv(download)
    assert len(rows) == 3 and Subject.objects.filter(study=study).count() == 3
    for row in rows:
        subject = Subject.objects.get(token=row["token"])
        assert row["url"] == f"https://study.example.org/s/{subject.token}/"
        assert subject.questions.count() == 6
    # The links work once the study is open.
    study.status = Study.Status.OPEN
    study.save()
    path = rows[0]["url"].removeprefix("https://study.example.org")
    assert Client().get(path).status_code == 200


def test_links_cannot_be_made_before_the_study_is_prepared(admin_client):
    draft = make_study(per_type=1, status=Study.Status.DRAFT)
    url = reverse("admin:experiments_study_links", args=[draft.pk])
    page = admin_client.post(url, {"count": 2, "base_url": "https://x.org"})
    assert page.status_code == 200 and "prepare it first" in page.content.decode()
    assert draft.subjects.count() == 0


def test_the_links_csv_has_the_platforms_ids_the_attention_score_and_the_time_taken(
    admin_client, study
):
    """Time taken runs from consent (not from when the link was made) to completion."""
    study.completion_code = "DONE-2"
    study.save()
    subject = make_subject(study, meta={"entry": {"assignmentId": "a1", "hitId": "h1"}})
    consented = timezone.now() - timedelta(minutes=30)
    Subject.objects.filter(pk=subject.pk).update(
        created_at=consented - timedelta(hours=1),
        consented_at=consented,
        completed_at=consented + timedelta(minutes=10),
        outcome=Subject.Outcome.COMPLETED,
        catch_score=0.75,
    )
    rows = read_csv(admin_client.get(reverse("admin:experiments_study_links_csv", args=[study.pk])))
    assert len(rows) == 1
    row = rows[0]
    assert {k: row[k] for k in ("SESSION_ID", "assignmentId", "hitId")} == {
        "SESSION_ID": "", "assignmentId": "a1", "hitId": "h1"
    }  # fmt: skip
    assert row["started_at"] == consented.isoformat()
    assert row["created_at"] == (consented - timedelta(hours=1)).isoformat()
    assert row["minutes"] == "10.0"
    assert row["catch_score"] == "0.75"
    assert (row["outcome"], row["end_code"]) == ("completed", "DONE-2")


def test_the_time_taken_is_never_negative(admin_client, study):
    """A server clock set back between consent and completion made it negative."""
    subject = make_subject(study)
    consented = timezone.now()
    Subject.objects.filter(pk=subject.pk).update(
        consented_at=consented, completed_at=consented - timedelta(minutes=3)
    )
    rows = read_csv(admin_client.get(reverse("admin:experiments_study_links_csv", args=[study.pk])))
    print(rows[0]["minutes"])
    assert rows[0]["minutes"] == "0.0"


def test_links_are_made_a_few_hundred_at_a_time_and_the_page_says_where_all_are(
    admin_client, study
):
    """980 links in one request took 140 s: past a proxy's timeout the subjects were made and
    their CSV lost, and nothing said so."""
    from experiments.forms import SubjectLinksForm

    limit = SubjectLinksForm.base_fields["count"].max_value
    print(f"at most {limit} links a request")
    assert limit <= 250  # about 20 s on a slow server (~0.1 s a subject of 124 questions)
    url = reverse("admin:experiments_study_links", args=[study.pk])
    page = admin_client.post(url, {"count": limit + 1, "base_url": "https://x.org"})
    text = page.content.decode()
    assert page.status_code == 200 and not study.subjects.exists()
    assert f"less than or equal to {limit}" in text
    assert f"At most {limit} at a time: submit again for more" in text
    assert "download of every subject&#x27;s link" in text
    download = admin_client.post(url, {"count": limit, "base_url": "https://x.org"})
    assert len(read_csv(download)) == limit == study.subjects.count()


def test_progress_per_subject(admin_client, study):
    study.status, study.completion_code = Study.Status.OPEN, "DONE-1"
    study.save()
    done, halfway, fresh = (make_subject(study) for _ in range(3))
    Subject.objects.filter(pk=done.pk).update(meta={"entry": {"SESSION_ID": "se1"}})
    answer_all(done, 6)
    answer_all(halfway, 2)
    page = admin_client.get(f"/admin/experiments/subject/?study__id__exact={study.pk}")
    html = page.content.decode()
    assert "6 / 6" in html and "2 / 6" in html and "0 / 6" in html
    finished = admin_client.get(
        f"/admin/experiments/subject/?study__id__exact={study.pk}&completed=yes"
    ).content.decode()
    assert "6 / 6" in finished and "2 / 6" not in finished
    rows = read_csv(admin_client.get(reverse("admin:experiments_study_links_csv", args=[study.pk])))
    progress = {row["url"].rsplit("/s/", 1)[1].strip("/"): row for row in rows}
    assert progress[done.token]["answered"] == "6" and progress[done.token]["completed_at"]
    assert (
        progress[halfway.token]["answered"] == "2" and not progress[halfway.token]["completed_at"]
    )
    assert progress[fresh.token]["last_seen"] == ""
    # What paying crowd workers takes: outcome, the code they were given, time taken.
    assert {k: progress[done.token][k] for k in ("SESSION_ID", "outcome", "end_code")} == {
        "SESSION_ID": "se1", "outcome": "completed", "end_code": "DONE-1"
    }  # fmt: skip
    assert float(progress[done.token]["minutes"]) >= 0 and progress[done.token]["started_at"]
    assert (progress[halfway.token]["outcome"], progress[halfway.token]["end_code"]) == (
        "in_progress", ""
    )  # fmt: skip
    summary = admin_client.get(f"{CHANGELIST}{study.pk}/change/").content.decode()
    assert "3 subjects, 1 completed" in summary


DESIGN_INPUTS = (
    'name="per_type"', 'name="seed"', 'name="attention_checks"', 'name="catch_count"',
    'name="catch_pass_threshold"', 'name="sound_check"', 'name="studysystem_set-0-label"',
    'name="play_before_answer"', 'name="min_listen_ms"',
)  # fmt: skip


def design_inputs(client, study) -> list[str]:
    page = client.get(f"{CHANGELIST}{study.pk}/change/").content.decode()
    return [name for name in DESIGN_INPUTS if name in page]


def change_form(study, **changes) -> dict:
    """The study's change form as the admin page would post it, with `changes`."""
    link = study.studysystem_set.get()
    form = {
        "name": study.name, "slug": study.slug, "collection": study.collection_id,
        "per_type": study.per_type, "comparisons": "[]", "seed": study.seed,
        "language": study.language, "external_id_param": study.external_id_param,
        "min_listen_ms": study.min_listen_ms, "catch_count": study.catch_count,
        "studysystem_set-TOTAL_FORMS": 1, "studysystem_set-INITIAL_FORMS": 1,
        "studysystem_set-0-id": link.pk, "studysystem_set-0-study": study.pk,
        "studysystem_set-0-system": link.system_id, "studysystem_set-0-label": link.label,
    }  # fmt: skip
    return {**form, **changes}


def test_the_design_locks_once_open_or_with_subjects(admin_client, study):
    assert design_inputs(admin_client, study) == list(DESIGN_INPUTS)  # ready, no subjects
    Study.objects.filter(pk=study.pk).update(status=Study.Status.OPEN)
    assert design_inputs(admin_client, study) == []
    # A post cannot change it either (a stale page, a crafted request).
    crafted = change_form(study, per_type=3, seed=9, play_before_answer="on", min_listen_ms=900)
    admin_client.post(f"{CHANGELIST}{study.pk}/change/", crafted)
    study.refresh_from_db()
    assert (study.per_type, study.seed, study.status) == (1, 0, Study.Status.OPEN)
    assert (study.play_before_answer, study.min_listen_ms) == (False, 0)  # how answers are given
    Study.objects.filter(pk=study.pk).update(status=Study.Status.READY)
    make_subject(study)
    assert design_inputs(admin_client, study) == []


def test_a_design_change_sends_a_ready_study_back_to_draft(admin_client, study):
    url = f"{CHANGELIST}{study.pk}/change/"
    assert admin_client.post(url, change_form(study, name="Renamed")).status_code == 302
    study.refresh_from_db()
    assert study.status == Study.Status.READY  # not a design change
    page = admin_client.post(url, change_form(study, per_type=2), follow=True).content.decode()
    assert "draft again: prepare it again" in page
    study.refresh_from_db()
    assert (study.per_type, study.status) == (2, Study.Status.DRAFT)
    Study.objects.filter(pk=study.pk).update(status=Study.Status.READY)
    admin_client.post(url, change_form(study, **{"studysystem_set-0-label": "S1"}))
    study.refresh_from_db()
    assert study.status == Study.Status.DRAFT and study.studysystem_set.get().label == "S1"


def test_a_design_that_locked_while_its_page_was_open_is_not_saved(admin_client, study):
    """Another researcher makes links between the page's checks and its save: the subjects'
    plans come from the stored design, so the new one is refused, not saved under them."""
    url = f"{CHANGELIST}{study.pk}/change/"

    def links_made_meanwhile(sender, instance, **kwargs):
        if not instance.subjects.exists():
            make_subject(Study.objects.get(pk=instance.pk))

    pre_save.connect(links_made_meanwhile, sender=Study)
    try:
        page = admin_client.post(url, change_form(study, per_type=2), follow=True)
    finally:
        pre_save.disconnect(links_made_meanwhile, sender=Study)
    assert "Not saved: Tiny study has subjects now" in page.content.decode()
    study.refresh_from_db()
    assert (study.per_type, study.status) == (1, Study.Status.READY)


def test_subjects_are_not_made_from_a_design_read_before_it_went_back_to_draft(study):
    read = Study.objects.get(pk=study.pk)  # ready: its links are being made
    Study.objects.filter(pk=study.pk).update(status=Study.Status.DRAFT)  # another researcher
    with pytest.raises(PlanError, match="changed while its subjects were made"):
        create_subjects(read, 3)
    Study.objects.filter(pk=study.pk).update(status=Study.Status.READY, preparation=5)
    with pytest.raises(PlanError, match="changed while its subjects were made"):
        create_subjects(read, 3)  # prepared again meanwhile, perhaps with another design
    assert not study.subjects.exists()


def test_labels_the_pass_threshold_and_questions_per_type_are_checked(admin_client, study):
    url = f"{CHANGELIST}{study.pk}/change/"
    for label, says in (("CCA", "not a system label"), ("X", "reserved"), ("G", "reserved")):
        page = admin_client.post(url, change_form(study, **{"studysystem_set-0-label": label}))
        assert page.status_code == 200 and says in page.content.decode()
    page = admin_client.post(url, change_form(study, catch_pass_threshold=75))
    assert "less than or equal to 1" in page.content.decode()
    page = admin_client.post(url, change_form(study, per_type=0))  # a study with no questions
    assert "greater than or equal to 1" in page.content.decode()
    study.refresh_from_db()
    assert study.catch_pass_threshold is None and study.studysystem_set.get().label == "S"
    assert study.per_type != 0


def test_a_preparation_that_will_not_finish_can_go_back_to_draft(admin_client, study):
    Study.objects.filter(pk=study.pk).update(status=Study.Status.PREPARING, message="Step 1 of 2")
    opened = make_study(per_type=1, slug="opened", collection_name="o")
    page = act(admin_client, "draft_studies", study, opened).content.decode()
    assert "1 study(ies) now draft" in page and "1 study(ies) skipped" in page
    study.refresh_from_db()
    opened.refresh_from_db()
    assert (study.status, study.message) == (Study.Status.DRAFT, "Back to draft: prepare it again.")
    assert opened.status == Study.Status.OPEN
    Study.objects.filter(pk=study.pk).update(status=Study.Status.READY)
    make_subject(study)  # subjects hold plans made from its preparation: it stays
    assert "1 study(ies) skipped" in act(admin_client, "draft_studies", study).content.decode()
    study.refresh_from_db()
    assert study.status == Study.Status.READY


def test_a_study_being_prepared_is_not_queued_again(admin_client, study):
    Study.objects.filter(pk=study.pk).update(status=Study.Status.PREPARING, message="Step 1 of 2")
    page = act(admin_client, "prepare_studies", study).content.decode()
    assert "preparing, not prepared again" in page
    study.refresh_from_db()
    assert (study.status, study.message) == (Study.Status.PREPARING, "Step 1 of 2")


def test_a_preparation_lost_before_a_worker_took_it_shows_its_age(admin_client, study, monkeypatch):
    monkeypatch.setattr("experiments.admin.celery_problem", lambda queues: None)
    monkeypatch.setattr("experiments.tasks.prepare_study.delay", lambda pk: None)  # lost
    Study.objects.filter(pk=study.pk).update(status=Study.Status.DRAFT, progress=0.4)
    assert "preparation queued" in act(admin_client, "prepare_studies", study).content.decode()
    study.refresh_from_db()
    assert (study.status, study.progress, study.message) == (Study.Status.PREPARING, 0, "Queued")
    assert timezone.now() - study.progress_at < timedelta(minutes=1)  # its clock starts
    Study.objects.filter(pk=study.pk).update(progress_at=timezone.now() - timedelta(minutes=25))
    studies = admin_client.get("/admin/experiments/study/").content.decode()
    assert "0%, last news 25\xa0minutes ago" in studies
    act(admin_client, "draft_studies", study)
    assert Study.objects.get(pk=study.pk).progress == 0  # a draft shows no old progress


def test_without_redis_prepare_and_upload_say_so_and_change_nothing(
    admin_client, study, tmp_path, monkeypatch, settings
):
    from study_site.celery import app

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setitem(app.conf, "broker_url", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setitem(app.conf, "task_always_eager", False)
    Study.objects.filter(pk=study.pk).update(status=Study.Status.DRAFT)
    page = act(admin_client, "prepare_studies", study).content.decode()
    assert (
        f"Nothing queued: Redis (the Celery broker) does not answer at redis://127.0.0.1:{port}/0"
        in page
    )
    assert Study.objects.get(pk=study.pk).status == Study.Status.DRAFT
    uploads = Path(settings.MEDIA_ROOT) / "uploads"
    before = {p for p in uploads.rglob("*") if p.is_file()}
    url = reverse("admin:experiments_collection_upload")
    page = admin_client.post(url, upload_form(tmp_path, n=2, test=1)).content.decode()
    assert "does not answer at" in page and "CELERY_ALWAYS_EAGER=1" in page
    assert not Collection.objects.filter(name="Uploaded").exists()
    assert {p for p in uploads.rglob("*") if p.is_file()} == before


def test_responses_export_as_csv(admin_client, study):
    from experiments.export import response_rows

    study.status = Study.Status.OPEN
    study.save()
    answer_all(make_subject(study), 6)
    answer_all(make_subject(study), 2)
    by_url = read_csv(
        admin_client.get(reverse("admin:experiments_study_responses", args=[study.pk]))
    )
    by_action = read_csv(act(admin_client, "export_responses", study))
    expected = [
        {k: "" if v is None else str(v) for k, v in r.items()} for r in response_rows(study)
    ]
    assert len(expected) == Response.objects.count() == 8
    assert by_url == by_action == expected


def test_exports_name_every_column_even_without_answers(admin_client, study):
    from experiments.export import column_names

    from .test_subjects import make_study as make_two_system_study

    def header(response):
        return next(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))

    url = reverse("admin:experiments_study_responses", args=[study.pk])
    assert header(admin_client.get(url)) == column_names(study)  # no answers yet
    assert header(admin_client.get(url + "?dictionary=1")) == ["column", "meaning"]
    # Two studies with different systems in one export: both studies' machine columns.
    other = make_two_system_study(two_systems=True)
    study.status = Study.Status.OPEN
    study.save()
    answer_all(make_subject(study), 6)
    response = act(admin_client, "export_responses", study, other)
    body = b"".join(response.streaming_content).decode()
    columns = next(csv.reader(io.StringIO(body)))
    assert {"machine_S", "machine_S1", "machine_S2"} <= set(columns)
    assert len(list(csv.DictReader(io.StringIO(body)))) == 6


def test_results_and_their_downloads_need_the_permission_to_view_studies(study):
    Study.objects.filter(pk=study.pk).update(status=Study.Status.OPEN)
    answer_all(make_subject(study), 6)
    page = reverse("admin:experiments_study_results", args=[study.pk])
    urls = [page, f"{page}?download=csv", f"{page}?download=json", f"{page}?download=zip"]
    staff = User.objects.create_user("assistant", is_staff=True)
    client = Client()
    client.force_login(staff)
    for url in urls:
        assert client.get(url).status_code == 403, url  # staff status alone: no results
    assert client.get(reverse("admin:experiments_study_results", args=[99999])).status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="view_study"))
    client.force_login(User.objects.get(pk=staff.pk))  # a fresh user: no cached permissions
    for url in urls:
        assert client.get(url).status_code == 200, url


def test_subjects_tokens_are_for_those_who_may_change_the_study(study):
    """The links and the raw answers hold subjects' tokens, which open their questions."""
    Study.objects.filter(pk=study.pk).update(status=Study.Status.OPEN)
    answer_all(make_subject(study), 6)
    links = reverse("admin:experiments_study_links_csv", args=[study.pk])
    raw = reverse("admin:experiments_study_responses", args=[study.pk])
    staff = User.objects.create_user("viewer", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_study"))
    client = Client()
    client.force_login(staff)
    assert client.get(links).status_code == 403 and client.get(raw).status_code == 403
    assert client.get(raw, {"anonymise": "1"}).status_code == 200  # pseudonyms: fine to view
    actions = client.get(CHANGELIST).content.decode()
    assert 'value="export_responses"' not in actions
    staff.user_permissions.add(Permission.objects.get(codename="change_study"))
    client.force_login(User.objects.get(pk=staff.pk))
    assert client.get(links).status_code == 200 and client.get(raw).status_code == 200


@pytest.mark.django_db(transaction=True)
def test_prepare_runs_on_a_real_worker(celery_worker, admin_client):
    draft = make_study(per_type=1, status=Study.Status.DRAFT)
    page = act(admin_client, "prepare_studies", draft).content.decode()
    assert "preparation queued" in page
    deadline = time.monotonic() + 180  # as test_tasks: the worker may be slow to start on it
    while time.monotonic() < deadline:
        draft.refresh_from_db()
        if draft.status in (Study.Status.READY, Study.Status.FAILED):
            break
        time.sleep(0.2)
    assert draft.status == Study.Status.READY, (draft.message, celery_worker.output()[-2000:])


def table_cells(page: str, table_id: str) -> list[dict]:
    """The rows of one table of the results page: column header → cell text."""
    table = page[page.index(f'id="{table_id}"') :]
    table = table[: table.index("</table>")]
    header = [
        re.sub(r"<[^>]+>", "", name)
        for name in re.findall(r'<th scope="col"[^>]*>(.*?)</th>', table)
    ]
    rows = re.findall(r"<tr>(.*?)</tr>", table[table.index("<tbody>") :], re.S)
    return [
        dict(zip(header, re.findall(r"<t[hd][^>]*>([^<]*)</t[hd]>", r), strict=True)) for r in rows
    ]


FORMATS = {
    "percent": r"\d+\.\d",  # one decimal
    "p": r"\d\.\d{3}|&lt; 0\.001",  # three decimals
    "count": r"\d+",
    "kappa": r"-?\d\.\d{3}",
}


def column_format(column: str) -> str:
    if column in ("n_answers", "n_subjects", "preferred", "answers", "raters", "questions"):
        return FORMATS["count"]
    if column.endswith("_p") or column.endswith("_p_holm"):
        return FORMATS["p"]
    return FORMATS["kappa"] if column == "kappa" else FORMATS["percent"]


def test_results_tables_format_each_kind_of_number_alike(admin_client, study):
    Study.objects.filter(pk=study.pk).update(status=Study.Status.OPEN)
    for _ in range(3):
        answer_all(make_subject(study), 6)
    page = admin_client.get(reverse("admin:experiments_study_results", args=[study.pk]))
    page = page.content.decode()
    seen = set()
    for table in ("preference-table", "statistics-table", "agreement-table", "kappa-table"):
        for row in table_cells(page, table):
            for column, cell in row.items():
                if column in ("Judge", "Machine", "Pair type", "Direction") or cell == "–":
                    continue
                assert re.fullmatch(column_format(column), cell), (table, column, cell)
                seen.add(column_format(column))
    assert {FORMATS["percent"], FORMATS["p"], FORMATS["count"]} <= seen
    # A wide table scrolls inside its own box instead of pushing the page past its edge.
    assert '<div class="table-scroll">\n  <table id="statistics-table">' in page
    assert ">binom_<wbr>p_<wbr>holm</th>" in page  # its names may wrap


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_the_statistics_table_fits_or_scrolls_inside_the_page(chromium, live_server):
    study = make_study(per_type=1)
    for _ in range(2):
        answer_all(make_subject(study), 6)
    staff = Client()
    staff.force_login(User.objects.create_user("researcher", is_staff=True, is_superuser=True))
    box = "document.querySelector('#statistics-table').parentElement"
    page_width = "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    for width, fits in ((1280, True), (1000, False)):  # the admin's sidebar open
        context = chromium.new_context(viewport={"width": width, "height": 800})
        context.add_cookies(
            [
                {
                    "name": "sessionid",
                    "value": staff.cookies["sessionid"].value,
                    "url": live_server.url,
                }
            ]
        )
        page = context.new_page()
        page.goto(live_server.url + reverse("admin:experiments_study_results", args=[study.pk]))
        # Where the table is wider than its box, the box scrolls, not the page.
        assert page.evaluate(f"{box}.scrollWidth <= {box}.clientWidth") == fits, width
        assert page.evaluate(page_width), width
        context.close()


def upload_form(tmp_path, n=3, **fields):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from .clips import music_video

    files = [
        SimpleUploadedFile(f"song {i}.mp4", music_video(tmp_path / f"{i}.mp4", i).read_bytes())
        for i in range(n)
    ]
    return {"name": "Uploaded", "files": files, "test": 1, **fields}


def test_uploads_over_the_limit_or_not_video_are_refused(admin_client, tmp_path, settings):
    from django.core.files.uploadedfile import SimpleUploadedFile

    url = reverse("admin:experiments_collection_upload")
    settings.ADMIN_UPLOAD_MAX_BYTES = 1000
    page = admin_client.post(url, upload_form(tmp_path, n=1))
    assert page.status_code == 200 and "add up to more than" in page.content.decode()
    settings.ADMIN_UPLOAD_MAX_BYTES = 10**8
    notes = SimpleUploadedFile("notes.txt", b"not a video")
    page = admin_client.post(url, {"name": "Uploaded", "files": [notes]})
    assert "notes.txt: not a video file" in page.content.decode()
    # Stored as a_b.mp4 both: one would replace the other.
    clashing = [SimpleUploadedFile(name, b"video") for name in ("a b.mp4", "a_b.mp4", "c.mp4")]
    page = admin_client.post(url, {"name": "Uploaded", "files": clashing})
    assert "stored under one name (one would replace the other): a b.mp4, a_b.mp4 as a_b.mp4" in (
        page.content.decode()
    )
    assert not Collection.objects.filter(name="Uploaded").exists()


def test_a_refused_upload_leaves_no_collection_and_no_files(admin_client, tmp_path, settings):
    url = reverse("admin:experiments_collection_upload")
    uploads = Path(settings.MEDIA_ROOT) / "uploads"

    def files():  # the session's media folder: other tests' files may be there already
        return {p for p in uploads.rglob("*") if p.is_file()}

    before = files()
    page = admin_client.post(url, upload_form(tmp_path, n=2, test=5))
    assert page.status_code == 200 and "cannot take 5 test" in page.content.decode()
    assert not Collection.objects.filter(name="Uploaded").exists()
    assert files() == before


@pytest.mark.parametrize("disk", ["tmpfs", "failing write"])
def test_an_upload_onto_a_full_disk_says_so_and_leaves_nothing(
    admin_client, tmp_path, settings, monkeypatch, request, disk
):
    """The copies are written before anything is imported: a full MEDIA_ROOT is a form error,
    with no collection and no truncated copy that nothing refers to (not a server error)."""
    media = tmp_path / "media"
    media.mkdir()
    settings.MEDIA_ROOT = str(media)
    if disk == "tmpfs":  # a real full disk: 32 KiB, less than the three videos take
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(media)],
                          capture_output=True).returncode:  # fmt: skip
            pytest.skip("mounting a tmpfs needs root")
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(media)], check=True))
    else:  # the second file gets half a chunk, then the disk is full
        writes = []

        class Filling(io.FileIO):
            def write(self, chunk):
                if writes:
                    super().write(chunk[: len(chunk) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                writes.append(chunk)
                return super().write(chunk)

        monkeypatch.setattr("experiments.admin.open", Filling, raising=False)
    url = reverse("admin:experiments_collection_upload")
    page = admin_client.post(url, upload_form(tmp_path, n=3))
    assert page.status_code == 200
    assert (
        "Could not store the files in MEDIA_ROOT (No space left on device); nothing was "
        "imported." in page.content.decode()
    )
    assert not Collection.objects.filter(name="Uploaded").exists()
    assert list((media / "uploads").iterdir()) == []


def test_an_upload_into_a_collection_made_with_another_clip_length_is_refused(
    admin_client, tmp_path, settings
):
    """Its clips would not compare with the collection's: a form error, and no pairs and no
    files left behind (not a server error)."""
    from experiments.ingest import DEFAULT_ENCODER

    made = {"clip_s": 2.5, "encoder": DEFAULT_ENCODER, "frame_size": None}
    collection = Collection.objects.create(name="Uploaded", import_settings=made)
    uploads = Path(settings.MEDIA_ROOT) / "uploads"

    def folders():  # the session's media folder: other tests' folders may be there already
        return set(uploads.iterdir()) if uploads.exists() else set()

    before = folders()
    url = reverse("admin:experiments_collection_upload")
    page = admin_client.post(url, upload_form(tmp_path, n=2, clip_seconds=5.0))
    assert page.status_code == 200
    assert "Uploaded was imported with clip_s 2.5, not 5.0" in page.content.decode()
    assert not collection.pairs.exists()
    collection.refresh_from_db()
    assert collection.import_settings == made
    assert folders() == before


@pytest.mark.slow  # the workers cut clips and extract features with the CNN
@pytest.mark.django_db(transaction=True)
def test_a_small_collection_uploaded_in_the_admin_is_imported(
    celery_worker, admin_client, tmp_path
):
    url = reverse("admin:experiments_collection_upload")
    assert (
        "Upload a small collection"
        in admin_client.get("/admin/experiments/collection/").content.decode()
    )
    page = admin_client.post(url, upload_form(tmp_path), follow=True)
    assert "3 of 3 pairs queued" in page.content.decode()
    collection = Collection.objects.get(name="Uploaded")
    assert collection.pairs.filter(split="test").count() == 1
    deadline = time.monotonic() + 600  # generous: the session's one worker may be busy
    while collection.pairs.filter(status="pending").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    pairs = list(collection.pairs.all())
    assert [p.status for p in pairs] == ["ready"] * 3, [p.error for p in pairs]
    assert {p.key for p in pairs} == {"song_0", "song_1", "song_2"}
    assert all(p.video_file and p.music_file for p in pairs)
    # Another collection whose name makes the same folder name: only its own file, cut to the
    # clip length asked (the 3 s video to 1.5 s items).
    form = upload_form(tmp_path, n=1, name="UPLOADED", clip_seconds=1.5)
    page = admin_client.post(url, form, follow=True)
    assert "1 of 1 pairs queued" in page.content.decode()
    other = Collection.objects.get(name="UPLOADED")
    assert list(other.pairs.values_list("key", flat=True)) == ["song_0"]
    while other.pairs.filter(status="pending").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    pair = other.pairs.get()
    assert pair.status == "ready", pair.error
    for item in (pair.video_file, pair.music_file):
        assert probe(item.path).duration_s == pytest.approx(1.5, abs=0.15)
    # The same file uploaded again: the ready pair keeps its media, and the page says so.
    page = admin_client.post(url, upload_form(tmp_path, n=1, name="UPLOADED"), follow=True)
    html = page.content.decode()
    messages = re.findall(r'<li class="[a-z]+">([^<]*)', html)
    assert any(m.lower().startswith("song_0: already imported from other files") for m in messages)
    assert "UPLOADED: 0 of 1 pairs queued for processing." in messages


# --- The login lockout behind a reverse proxy ----------------------------------------------

PROXY = "10.0.0.2"  # the reverse proxy: every request reaches the site from its address


def failed_logins(client, n, **headers):
    login = reverse("admin:login")
    wrong = {"username": "boss", "password": "wrong"}
    return [client.post(login, wrong, **headers).status_code for _ in range(n)]


def right_login(client, **headers) -> int:
    login = reverse("admin:login")
    return client.post(
        login, {"username": "boss", "password": "right-one-4821"}, **headers
    ).status_code


@override_settings(TRUSTED_PROXY_COUNT=1)
def test_behind_a_proxy_one_clients_failures_lock_out_only_that_client(settings):
    User.objects.create_superuser("boss", password="right-one-4821")
    limit = settings.AXES_FAILURE_LIMIT
    # The client's own header, with the proxy's entry appended: only the proxy's is believed.
    attacker = {"HTTP_X_FORWARDED_FOR": "198.51.100.7, 203.0.113.66"}
    statuses = failed_logins(Client(REMOTE_ADDR=PROXY), limit, **attacker)
    assert statuses == [200] * (limit - 1) + [429]
    assert right_login(Client(REMOTE_ADDR=PROXY), **attacker) == 429  # that client is locked
    # A researcher elsewhere, through the same proxy, still logs in; so would one whose
    # address the attacker had put in front of its own.
    assert right_login(Client(REMOTE_ADDR=PROXY), HTTP_X_FORWARDED_FOR="198.51.100.7") == 302


@override_settings(TRUSTED_PROXY_COUNT=1)
def test_a_port_a_proxy_appends_to_the_clients_address_is_left_out():
    from django.test import RequestFactory

    from study_site.client import client_address

    def address(header):
        return client_address(RequestFactory().get("/", REMOTE_ADDR=PROXY, **header))

    assert address({"HTTP_X_FORWARDED_FOR": "198.51.100.7:51234"}) == "198.51.100.7"
    assert address({"HTTP_X_FORWARDED_FOR": "1.2.3.4, [2001:db8::1]:443"}) == "2001:db8::1"
    assert address({"HTTP_X_FORWARDED_FOR": "2001:db8::2"}) == "2001:db8::2"
    assert address({"HTTP_X_FORWARDED_FOR": "not-an-address:80"}) == PROXY
    assert address({}) == PROXY


def test_without_trusted_proxies_the_connections_address_counts_and_the_header_not(settings):
    assert settings.TRUSTED_PROXY_COUNT == 0  # the default
    User.objects.create_superuser("boss", password="right-one-4821")
    limit = settings.AXES_FAILURE_LIMIT
    statuses = failed_logins(
        Client(REMOTE_ADDR="203.0.113.9"), limit, HTTP_X_FORWARDED_FOR="198.51.100.1"
    )
    assert statuses == [200] * (limit - 1) + [429]
    # Another header from the same address changes nothing: it is still locked out.
    locked = right_login(Client(REMOTE_ADDR="203.0.113.9"), HTTP_X_FORWARDED_FOR="198.51.100.2")
    assert locked == 429
    assert right_login(Client(REMOTE_ADDR="198.51.100.3")) == 302  # another address is not


def test_deleting_a_collection_deletes_its_files_but_never_a_researchers_folder(
    admin_client, tmp_path, settings, django_capture_on_commit_callbacks
):
    collection = make_collection(n_pairs=2, name="to delete")
    system = make_system(collection)
    system.checkpoint.save("model.pt", ContentFile(b"weights"), save=True)
    uploaded = Path(settings.MEDIA_ROOT) / "uploads" / "to-delete-1a2b3c4d"
    uploaded.mkdir(parents=True)
    (uploaded / "song.mp4").write_bytes(b"uploaded")
    own = tmp_path / "my-videos"
    own.mkdir()
    (own / "mine.mp4").write_bytes(b"the researcher's")
    first, second = collection.pairs.order_by("key")
    Pair.objects.filter(pk=first.pk).update(source_video=str(uploaded / "song.mp4"))
    Pair.objects.filter(pk=second.pk).update(source_video=str(own / "mine.mp4"))
    files = [Path(f.path) for p in (first, second) for f in (p.video_file, p.music_file)]
    files.append(Path(system.checkpoint.path))
    assert all(path.exists() for path in files)
    url = reverse("admin:experiments_collection_delete", args=[collection.pk])
    with django_capture_on_commit_callbacks(execute=True):
        assert admin_client.post(url, {"post": "yes"}).status_code == 302
    assert not Collection.objects.filter(pk=collection.pk).exists()
    assert not any(path.exists() for path in files) and not uploaded.exists()
    assert (own / "mine.mp4").read_bytes() == b"the researcher's"


def test_an_upload_folder_another_collection_reads_is_kept(
    settings, tmp_path, django_capture_on_commit_callbacks
):
    settings.MEDIA_ROOT = str(tmp_path / "media")
    folder = Path(settings.MEDIA_ROOT) / "uploads" / "mine-1a2b3c4d"  # an admin upload's folder
    folder.mkdir(parents=True)
    for i in range(6):
        (folder / f"song_{i}.mp4").write_bytes(b"x")
    add_pairs("A", folder, test=2)
    add_pairs("A split anew", folder, test=3)  # another collection of the same files
    with django_capture_on_commit_callbacks(execute=True):
        Collection.objects.get(name="A").delete()
    assert len(list(folder.iterdir())) == 6
    with django_capture_on_commit_callbacks(execute=True):
        Collection.objects.get(name="A split anew").delete()
    assert not folder.exists()  # the last one gone: nothing reads it


def test_pairs_whose_import_task_was_lost_are_imported_again(admin_client, tmp_path, monkeypatch):
    """A broker restarted without its queue leaves pairs pending for ever: the action queues
    them again, made as the collection's first import made its pairs."""
    from experiments.ingest import import_settings
    from study_site.celery import app

    from .clips import music_video

    monkeypatch.setitem(app.conf, "task_always_eager", True)
    for i in range(2):
        music_video(tmp_path / f"song{i}.mp4", i, seconds=4.0)
    collection = add_pairs("lost", tmp_path, test=1).collection  # queued, then lost
    import_settings(collection, clip_s=2.5)
    page = admin_client.post(
        "/admin/experiments/collection/",
        {"action": "import_again", "_selected_action": [collection.pk]},
        follow=True,
    ).content.decode()
    assert "Lost: 2 pairs queued again." in page
    for pair in collection.pairs.all():
        assert pair.status == Pair.Status.READY
        assert probe(pair.music_file.path).duration_s == pytest.approx(2.5, abs=0.05)


def test_a_collection_whose_import_settings_are_not_known_is_not_imported_again(
    admin_client, tmp_path, monkeypatch
):
    """Made before its settings were kept: the action says so, and queues nothing it would
    have to guess the clip length and encoder of."""
    from experiments.tasks import import_pair
    from study_site.celery import app

    monkeypatch.setitem(app.conf, "task_always_eager", True)
    queued = []
    monkeypatch.setattr(import_pair, "delay", lambda *args: queued.append(args))
    for i in range(2):
        (tmp_path / f"song{i}.mp4").write_bytes(b"x")
    collection = add_pairs("Unknown", tmp_path, test=1).collection
    Pair.objects.filter(collection=collection).exclude(key="song0").update(status=Pair.Status.READY)
    assert collection.import_settings == {}
    response = admin_client.post(
        "/admin/experiments/collection/",
        {"action": "import_again", "_selected_action": [collection.pk]},
        follow=True,
    )
    assert response.status_code == 200
    # (the admin shows a message with its first letter capitalised: a capitalised name)
    assert "Unknown: its import settings are not known" in response.content.decode()
    assert queued == []
    assert collection.pairs.get(key="song0").status == Pair.Status.PENDING


def test_import_again_leaves_ready_pairs_and_queues_nothing_without_a_worker(
    admin_client, tmp_path, monkeypatch
):
    """Only the pairs not ready go again; with no broker or worker to take them, nothing is
    queued (a task sent there would be lost, the pairs left pending once more)."""
    from experiments import admin as experiments_admin
    from experiments.ingest import import_settings
    from experiments.tasks import import_pair
    from study_site.celery import app

    monkeypatch.setitem(app.conf, "task_always_eager", True)
    queued = []
    monkeypatch.setattr(import_pair, "delay", lambda pk, *args: queued.append(pk))
    for i in range(3):
        (tmp_path / f"song{i}.mp4").write_bytes(b"x")
    collection = add_pairs("Again", tmp_path, test=1).collection
    import_settings(collection, clip_s=2.5)
    Pair.objects.filter(collection=collection, key="song0").update(status=Pair.Status.READY)
    Pair.objects.filter(collection=collection, key="song1").update(status=Pair.Status.FAILED)
    not_ready = set(collection.pairs.exclude(key="song0").values_list("pk", flat=True))
    assert len(not_ready) == 2
    action = {"action": "import_again", "_selected_action": [collection.pk]}
    monkeypatch.setattr(experiments_admin, "celery_problem", lambda queues: "no worker answers")
    queued.clear()
    page = admin_client.post("/admin/experiments/collection/", action, follow=True)
    assert "Nothing queued: no worker answers." in page.content.decode()
    assert queued == []
    monkeypatch.setattr(experiments_admin, "celery_problem", lambda queues: None)
    page = admin_client.post("/admin/experiments/collection/", action, follow=True)
    assert "Again: 2 pairs queued again." in page.content.decode()
    assert sorted(queued) == sorted(not_ready)


@pytest.mark.django_db(transaction=True)
def test_a_subject_deleted_while_an_answer_is_stored_goes_with_it(admin_client):
    """The deletion waits for the answer (it holds the subject's row) and deletes it too;
    it used to collect the rows first and fail on PostgreSQL: a foreign key the new answer
    broke, or a deadlock."""
    study = make_study(per_type=1, status=Study.Status.OPEN)
    subjects = [make_subject(study), make_subject(study)]
    stored = threading.Event()

    def answering(subject):
        try:
            with transaction.atomic():
                locked = Subject.objects.select_for_update().get(pk=subject.pk)
                question = locked.questions.order_by("position").first()
                Response.objects.create(
                    question=question, subject=locked, choice="a", chosen_kind=question.kind_a
                )
                stored.set()
                time.sleep(1)  # the deletion comes now
        finally:
            connection.close()

    for delete in (
        lambda s: admin_client.post(f"/admin/experiments/subject/{s.pk}/delete/", {"post": "yes"}),
        lambda s: admin_client.post(
            "/admin/experiments/subject/",
            {"action": "delete_selected", "_selected_action": [s.pk], "post": "yes"},
        ),
    ):
        subject = subjects.pop()
        stored.clear()
        thread = threading.Thread(target=answering, args=(subject,))
        thread.start()
        stored.wait(10)
        assert delete(subject).status_code == 302
        thread.join()
        assert not Subject.objects.filter(pk=subject.pk).exists()
    assert not Response.objects.exists()


def test_a_study_with_more_questions_than_postgresql_takes_parameters_is_deleted(admin_client):
    """Django's deletion walk listed every question in one query: past PostgreSQL's 65,535
    parameters at about 530 subjects, the study could not be deleted (a 503 after 40 s). Its
    subjects' plans now go by one statement each, and the confirmation counts them."""
    from django.test.utils import CaptureQueriesContext

    from experiments.models import Question

    study = make_study(per_type=1)
    first = make_subject(study)
    answer_all(first, 2)
    plan = list(Question.objects.filter(subject=first).order_by("position"))
    n = 65_536 // len(plan) + 1  # subjects: more questions than 65,535
    subjects = Subject.objects.bulk_create(
        Subject(study=study, ordinal=ordinal) for ordinal in range(1, n + 1)
    )
    questions = [
        Question(**{f.attname: getattr(q, f.attname) for f in Question._meta.concrete_fields
                    if f.name not in ("id", "subject")}, subject=subject)
        for subject in subjects for q in plan
    ]  # fmt: skip
    Question.objects.bulk_create(questions, batch_size=5000)
    total = Question.objects.filter(subject__study=study).count()
    assert total > 65_535

    url = reverse("admin:experiments_study_delete", args=[study.pk])
    page = admin_client.get(url).content.decode()
    assert f"<li>Questions: {total}</li>" in page and "<li>Responses: 2</li>" in page
    assert f"<li>Subjects: {n + 1}</li>" in page
    with CaptureQueriesContext(connection) as queries:
        assert admin_client.post(url, {"post": "yes"}).status_code == 302
    by_id = [q for q in queries.captured_queries if '"experiments_question"."id" IN' in q["sql"]]
    assert by_id == []  # no walk over the questions: one statement
    assert not Study.objects.filter(pk=study.pk).exists()
    assert not Question.objects.exists() and not Response.objects.exists()
    assert not Subject.objects.exists()


def test_the_results_page_can_leave_out_answers_given_without_their_media(admin_client):
    """An answer given while a candidate could not be loaded may be a guess: the page says how
    many there are, counts them by default and leaves them out on request, keeping the other
    choices of who is counted."""
    study = make_study(per_type=1)
    done, unfinished = make_subject(study), make_subject(study)
    answer_all(done, 6)
    answer_all(unfinished, 2)
    Response.objects.filter(subject=done, question__position=1).update(
        behaviour={"errors": [{"role": "b", "reason": "timeout"}]}
    )
    url = reverse("admin:experiments_study_results", args=[study.pk])
    page = admin_client.get(url).content.decode()
    assert "<strong>6</strong> answers" in page
    assert "1 answer was given while a medium could not be loaded" in page and "counted." in page
    assert 'href="?heard_only=1">leave out the answers given while a medium' in page
    page = admin_client.get(url + "?incomplete=1").content.decode()
    assert 'href="?incomplete=1&amp;heard_only=1">leave out the answers' in page
    page = admin_client.get(url + "?heard_only=1&incomplete=1").content.decode()
    assert "<strong>7</strong> answers" in page and "they are left out." in page
    assert 'href="?incomplete=1">count the answers given while a medium' in page
    assert 'href="?heard_only=1">Count completed subjects only' in page
    download = admin_client.get(url + "?heard_only=1&download=csv")
    assert download["Content-Disposition"].endswith('-preference-heard-only.csv"')
