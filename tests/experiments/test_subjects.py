"""Creating subjects stores their plans and the machines' answers, from the database alone."""

import io
import math
from collections import Counter

import numpy as np
import pytest
from django.core.files.base import ContentFile

from experiments.models import Collection, Pair, SearchResult, Split, Study, StudySystem, System
from experiments.plans import PlanError
from experiments.subjects import create_subject, create_subjects, plan_for, subject_url

from .factories import at_once

N = 12


def embeddings_npz(keys) -> bytes:
    """Video i = e_i, music j = e_j + ½ e_(j-1): for the video of i, its own music is nearest,
    then the music of i+1; for the music of i, its own video, then the video of i-1."""
    video = np.eye(len(keys))
    music = video + 0.5 * np.roll(video, 1, axis=0)
    buffer = io.BytesIO()
    np.savez(buffer, keys=np.array(keys), video=video, music=music)
    return buffer.getvalue()


def make_study(n=N, per_type=2, two_systems=False):
    collection = Collection.objects.create(name=f"c{n}-{two_systems}")
    pairs = [
        Pair.objects.create(
            collection=collection, key=f"k{i:02d}", split=Split.TEST, status="ready"
        )
        for i in range(n)
    ]
    Pair.objects.create(collection=collection, key="train", split=Split.TRAIN, status="ready")
    study = Study.objects.create(
        name="s", slug=f"s{n}-{two_systems}", collection=collection, status=Study.Status.READY
    )
    study.per_type = per_type
    study.save()
    nearest = System.objects.create(
        collection=collection, name="nearest", kind="cca", status="ready"
    )
    nearest.embeddings.save("e.npz", ContentFile(embeddings_npz([p.key for p in pairs])))
    systems = [(nearest, 1, -1)]  # V2M: i+1 first, M2V: i-1 first (as its embeddings say)
    if two_systems:
        ranked = System.objects.create(collection=collection, name="ranked", kind="external")
        systems.append((ranked, -1, 1))  # uploaded results, the other way round, no embeddings
    for label, (system, v2m, m2v) in zip(
        ("S1", "S2") if two_systems else ("S",), systems, strict=True
    ):
        StudySystem.objects.create(study=study, system=system, label=label)
        rows = []
        for i, query in enumerate(pairs):
            for direction, step in (("V2M", v2m), ("M2V", m2v)):
                ranked = [pairs[(i + step) % n], query]
                rows += [
                    SearchResult(system=system, direction=direction, query=query, rank=r, result=p)
                    for r, p in enumerate(ranked, start=1)
                ]
        SearchResult.objects.bulk_create(rows)
    return study


@pytest.mark.django_db
def test_subjects_get_their_stored_plans_with_rotating_ordinals():
    study = make_study()
    subjects = create_subjects(study, 3)
    assert [s.ordinal for s in subjects] == [0, 1, 2]
    for subject in subjects:
        questions = list(subject.questions.select_related("query", "option_a", "option_b"))
        plan = plan_for(study, subject.ordinal)
        assert len(questions) == len(plan) == 2 * 3 * study.per_type
        assert [
            (q.position, q.direction, q.pair_type, q.query.key, q.option_a.key, q.option_b.key)
            for q in questions
        ] == [(p.position, p.direction, p.pair_type, p.query, p.option_a, p.option_b) for p in plan]
    assert subjects[0].token != subjects[1].token and len(subjects[0].token) >= 22


@pytest.mark.django_db
def test_machines_answer_every_question_they_can_judge():
    study = make_study(two_systems=True)
    subject = create_subject(study, external_id="PID-1", meta={"source": "test"})
    assert subject.external_id == "PID-1" and subject.meta == {"source": "test"}
    chosen = Counter()
    for q in subject.questions.all():
        for label, choice in q.machine.items():
            chosen[label, q.pair_type, q.kind_a if choice == "a" else q.kind_b] += 1
    # S1 judges by its embeddings (G nearest, then its S), S2 by its ranking (its S first, then G).
    expected = Counter()
    for pair_type, first in [
        ("GR", "G"), ("G-S1", "G"), ("G-S2", "G"), ("S1-R", "S1"), ("S2-R", "S2"), ("S1-S2", "S1"),
    ]:  # fmt: skip
        s1_choice = {"G-S2": "G", "S2-R": None, "S1-S2": "S1"}.get(pair_type, first)
        s2_choice = {"G-S2": "S2", "S1-R": None, "S1-S2": "S2", "G-S1": "G"}.get(pair_type, first)
        for label, choice in (("S1", s1_choice), ("S2", s2_choice)):
            if choice:
                expected[label, pair_type, choice] += 2 * study.per_type
    assert chosen == expected


@pytest.mark.django_db
def test_a_study_too_small_for_its_plan_creates_no_subject():
    study = make_study(n=5, per_type=2)
    with pytest.raises(PlanError, match="too small"):
        create_subject(study)
    assert not study.subjects.exists()


@pytest.mark.django_db
def test_subject_url():
    subject = create_subject(make_study())
    assert subject_url(subject, "https://x.org/") == f"https://x.org/s/{subject.token}/"


@pytest.mark.django_db(transaction=True)
def test_concurrent_creations_get_distinct_ordinals():
    study = make_study(per_type=1)
    errors = at_once(lambda: create_subject(Study.objects.get(pk=study.pk)), 4)
    assert not errors
    assert sorted(study.subjects.values_list("ordinal", flat=True)) == [0, 1, 2, 3]


def stored_plan(subject) -> list[tuple]:
    return [
        (q.position, q.direction, q.pair_type, q.query.key, q.option_a.key, q.option_b.key)
        for q in subject.questions.select_related("query", "option_a", "option_b")
    ]


def planned(study, ordinal) -> list[tuple]:
    return [
        (p.position, p.direction, p.pair_type, p.query, p.option_a, p.option_b)
        for p in plan_for(study, ordinal)
    ]


@pytest.mark.django_db
def test_many_subjects_cost_a_few_queries_a_batch_not_a_few_a_subject(monkeypatch):
    """980 subjects made from the admin took 5,893 queries (lock, last ordinal, subject,
    questions, transaction: 6 a subject) and 140 s: now each batch of subjects is one
    transaction with one lock, one last ordinal and a few inserts."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    monkeypatch.setattr("experiments.subjects.BATCH", 20, raising=False)
    study = make_study(two_systems=True)  # 24 questions a subject
    with CaptureQueriesContext(connection) as few:
        create_subjects(study, 2)
    with CaptureQueriesContext(connection) as many:
        subjects = create_subjects(study, 40)  # two batches

    def counted(queries) -> tuple[int, int]:
        """Queries but the questions' inserts, and those inserts."""
        sqls = [q["sql"] for q in queries.captured_queries]
        inserts = sum(sql.startswith('INSERT INTO "experiments_question"') for sql in sqls)
        return len(sqls) - inserts, inserts

    (others_few, _), (others, inserts) = counted(few), counted(many)
    print(f"2 subjects: {len(few)} queries; 40 subjects: {len(many)} queries, {inserts} of them "
          "questions' inserts")  # fmt: skip
    # The study's inputs are read once a call; a second batch adds its transaction, lock,
    # last ordinal and subjects' insert.
    assert others - others_few <= 7
    # A batch's 480 questions: one insert on PostgreSQL, 6 on SQLite (999 parameters, 90 rows).
    assert inserts <= 2 * math.ceil(20 * 24 / 90)
    assert [s.ordinal for s in subjects] == list(range(2, 42))
    for subject in subjects[::13]:  # a plan of each batch's
        assert stored_plan(subject) == planned(study, subject.ordinal)
        assert any(q.machine for q in subject.questions.all())


@pytest.mark.django_db(transaction=True)
def test_batches_made_at_once_get_distinct_ordinals_and_the_plans_of_theirs(monkeypatch):
    """Each batch's plans are built before its lock for the ordinals due then: a batch
    whose ordinals another took meanwhile gets the plans of those it has."""
    monkeypatch.setattr("experiments.subjects.BATCH", 3, raising=False)
    study = make_study(per_type=1)
    errors = at_once(lambda: create_subjects(Study.objects.get(pk=study.pk), 5), 3)
    assert not errors
    subjects = list(study.subjects.order_by("ordinal"))
    assert [s.ordinal for s in subjects] == list(range(15))
    for subject in subjects:
        assert stored_plan(subject) == planned(study, subject.ordinal), subject.ordinal
