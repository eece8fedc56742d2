"""A study of two uploaded systems, end to end: uploads → stored plans that follow the
generalised rules → answers through the participant pages → every comparison in the analysis,
the report command, the export and the admin (results and power planning).

Plus the plan rules for several systems as properties (hypothesis), beside test_plans.py's.
"""

import io
import re
from collections import Counter

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.load import responses_frame
from analysis.machine import machine_agreement
from analysis.plots import preference_figure
from analysis.preference import preference_table, split_pair_type
from experiments.export import response_rows
from experiments.models import Question, SearchResult, Study, StudySystem
from experiments.plans import DIRECTIONS, build_plan, default_comparisons, pair_type_name
from experiments.uploads import import_results

from .factories import make_collection, make_subject
from .test_plans import check_plan, make_results, top_result

N_PAIRS, PER_TYPE, N_SUBJECTS = 14, 2, 4
PAIR_TYPES = ["GR", "G-S1", "G-S2", "S1-R", "S2-R", "S1-S2"]
# Known answers: subject k prefers G unless k == 3 (75%), a system over R always (100%), and
# S1 over S2 when k < 2 (50%).
EXPECTED = {"GR": 75.0, "G-S1": 75.0, "G-S2": 75.0, "S1-R": 100.0, "S2-R": 100.0, "S1-S2": 50.0}


def prefers_first(ordinal: int, pair_type: str) -> bool:
    if pair_type.startswith("G"):
        return ordinal != 3
    if pair_type.endswith("R"):
        return True
    return ordinal < 2


def uploaded_systems(collection):
    """S1 from embeddings (neighbours by the engine's search), S2 from a ranked CSV that
    copies S1's ranking for every third query (the two agree there) and otherwise drops S1's
    best result."""
    rng = np.random.default_rng(3)
    keys = [f"clip{i:03d}" for i in range(N_PAIRS)]
    video = rng.normal(size=(N_PAIRS, 6))
    music = video + rng.normal(scale=1.5, size=video.shape)
    buffer = io.BytesIO()
    np.savez(buffer, keys=np.array(keys), video=video, music=music)
    s1 = import_results(collection, "theirs", SimpleUploadedFile("s1.npz", buffer.getvalue()))
    lines = ["query_item,rank,result_item"]
    for direction, (source, target) in zip(
        DIRECTIONS, [("video", "music"), ("music", "video")], strict=True
    ):
        for i, key in enumerate(keys):
            ranked = list(
                SearchResult.objects.filter(system=s1, direction=direction, query__key=key)
                .order_by("rank")
                .values_list("result__key", flat=True)
            )
            if i % 3:
                best = next(r for r in ranked if r != key)
                ranked = [r for r in ranked if r != best]
            lines += [f"{source}:{key},{rank},{target}:{r}" for rank, r in enumerate(ranked, 1)]
    csv = SimpleUploadedFile("s2.csv", "\n".join(lines).encode())
    return s1, import_results(collection, "ours", csv), (keys, video, music)


@pytest.fixture
def two_system_study(db):
    collection = make_collection(N_PAIRS, name="two-systems")
    s1, s2, vectors = uploaded_systems(collection)
    study = Study.objects.create(
        name="Two systems", slug="two", collection=collection, per_type=PER_TYPE, seed=5,
        status=Study.Status.OPEN,
    )  # fmt: skip
    StudySystem.objects.create(study=study, system=s1, label="S1")
    StudySystem.objects.create(study=study, system=s2, label="S2")
    subjects = [make_subject(study) for _ in range(N_SUBJECTS)]
    return study, subjects, vectors


def best(system_label, study, direction, query):
    system = study.studysystem_set.get(label=system_label).system
    return (
        SearchResult.objects.filter(system=system, direction=direction, query=query)
        .exclude(result=query)
        .order_by("rank")
        .first()
        .result
    )


def cosine(vectors, direction, query, candidate):
    keys, video, music = vectors
    queries, candidates = (video, music) if direction == "V2M" else (music, video)
    a, b = queries[keys.index(query.key)], candidates[keys.index(candidate.key)]
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def answer_through_the_pages(subject):
    client = Client()
    page = reverse("subject", args=[subject.token])
    assert client.post(page, {"step": "start", "consent": "1"}).status_code == 302
    block = None
    for q in subject.questions.order_by("position"):
        if block is not None and q.direction != block:
            client.post(page, {"step": "continue", "position": q.position})
        block = q.direction
        a_is_first = q.kind_a == split_pair_type(q.pair_type)[0]
        choice = "a" if a_is_first == prefers_first(subject.ordinal, q.pair_type) else "b"
        response = client.post(page, {"choice": choice, "position": q.position})
        assert response.status_code == 302
    subject.refresh_from_db()
    assert subject.completed_at is not None


@pytest.mark.django_db
def test_a_two_system_study_end_to_end(two_system_study, admin_client):
    study, subjects, vectors = two_system_study
    questions = Question.objects.filter(subject__study=study).select_related(
        "query", "option_a", "option_b"
    )

    # The stored plans follow the generalised rules.
    assert len(questions) == N_SUBJECTS * 2 * PER_TYPE * len(PAIR_TYPES)
    agreeing = set()
    for subject in subjects:
        for direction in DIRECTIONS:
            block = [
                q for q in questions if q.subject_id == subject.pk and q.direction == direction
            ]
            assert Counter(q.pair_type for q in block) == {p: PER_TYPE for p in PAIR_TYPES}
            assert len({q.query_id for q in block}) == len(block), "a query repeats in a block"
    for q in questions:
        found = {"G": q.query, **{s: best(s, study, q.direction, q.query) for s in ("S1", "S2")}}
        if found["S1"] == found["S2"]:
            agreeing.add((q.direction, q.query.key))
            assert q.pair_type != "S1-S2", "two systems' one item shown twice"
        assert q.option_a != q.option_b
        for kind, item in ((q.kind_a, q.option_a), (q.kind_b, q.option_b)):
            if kind == "R":
                assert item not in found.values()
            else:
                assert item == found[kind]
        # Machine judges: S1 by cosine in its uploaded space, S2 by its ranking.
        sim_a, sim_b = (cosine(vectors, q.direction, q.query, c) for c in (q.option_a, q.option_b))
        assert q.machine["S1"] == ("a" if sim_a > sim_b else "b")
        if "S2" in {q.kind_a, q.kind_b} and "R" in {q.kind_a, q.kind_b}:
            assert q.machine["S2"] == ("a" if q.kind_a == "S2" else "b")
    assert agreeing, "the systems agree on some queries: the test would not show the skip"

    for subject in subjects:
        answer_through_the_pages(subject)

    # Known-answer shares per comparison, per direction and in total.
    df = responses_frame(study)
    table = preference_table(df)
    assert list(table.index) == PAIR_TYPES
    for pair_type, share in EXPECTED.items():
        assert table.loc[pair_type].tolist() == [share] * 3, pair_type

    # One box per comparison and direction.
    ticks = preference_figure(df).axes[0].get_xticklabels()
    boxes = {tuple(t.get_text().split("\n")[:2]) for t in ticks}
    assert boxes == {(p, d) for p in PAIR_TYPES for d in DIRECTIONS} and len(ticks) == 12

    # Human–machine agreement per system and comparison, as counted from the stored rows.
    agreement = machine_agreement(df)
    for label in ("S1", "S2"):
        for pair_type in PAIR_TYPES:
            judged = [
                (q.machine[label], q.response.choice)
                for q in Question.objects.filter(subject__study=study, pair_type=pair_type)
                if label in q.machine
            ]
            share = 100 * np.mean([m == h for m, h in judged])
            assert agreement.loc[(label, pair_type), "Total"] == pytest.approx(share)
            assert agreement.loc[(label, pair_type), "n_answers"] == len(judged)

    # The report command, the export and the admin results page include every comparison.
    out, err = io.StringIO(), io.StringIO()
    call_command("preference_report", study.slug, "--mixed", stdout=out, stderr=err)
    assert err.getvalue().startswith("Fitting the mixed model to ")  # before minutes of silence
    report, mixed = out.getvalue().split("## Mixed-effects logistic model")
    assert "Human–machine agreement" in report
    assert "Systems: S1 = theirs, S2 = ours." in report  # which system each label is
    # Unanimous answers (S1-R, S2-R) leave the model nothing to fit: counts only, no crash.
    unanimous = [line for line in mixed.splitlines() if re.match(r"\| S\d-R ", line)]
    assert len(unanimous) == 2 and all("nan" in line for line in unanimous)
    assert {line.split("|")[1].strip() for line in mixed.strip().splitlines()[2:]} == set(
        PAIR_TYPES
    )
    for pair_type in PAIR_TYPES:
        for label in ("S1", "S2"):
            assert re.search(rf"\| {label}\s+\| {pair_type}\s+\|", report), (label, pair_type)
    rows = list(response_rows(study))
    assert len(rows) == len(questions)
    assert {r["pair_type"] for r in rows} == set(PAIR_TYPES)
    assert {"machine_S1", "machine_S2"} <= set(rows[0])
    html = admin_client.get(reverse("admin:experiments_study_results", args=[study.pk]))
    html = html.content.decode()
    agreement_html = html[html.index('id="agreement-table"') :]
    for pair_type in PAIR_TYPES:
        assert f'<th scope="row">{pair_type}</th>' in html
        for label in ("S1", "S2"):
            assert re.search(rf"<th[^>]*>{label}</th>\s*<th[^>]*>{pair_type}</th>", agreement_html)
    assert 'id="disagreements"' in html and "Systems: S1 = theirs, S2 = ours." in html


def power_answer(admin_client, url, effect):
    page = admin_client.get(
        url,
        {
            "comparison": "S1-S2", "effect": effect, "items": 100, "questions_per_subject": 20,
            "subject_sd": 0.5, "item_sd": 0.5, "sims": 60, "max_subjects": 400,
        },
    )  # fmt: skip
    found = re.findall(r"(\d+)% power: (\d+) subjects", page.content.decode())
    return {int(target): int(n) for target, n in found}


@pytest.mark.django_db
def test_power_planning_in_the_admin(two_system_study, admin_client):
    study, _, _ = two_system_study
    url = reverse("admin:experiments_study_power", args=[study.pk])
    change = admin_client.get(f"/admin/experiments/study/{study.pk}/change/").content.decode()
    assert '<a href="../power/">power planning</a>' in change
    assert (
        '<a href="../power/">power planning</a>'
        in admin_client.get("/admin/experiments/study/add/").content.decode()
    )
    # The form starts from the study's design.
    form = admin_client.get(url).context["form"]
    assert form.initial["comparison"] == "G-S1"
    assert (form.initial["items"], form.initial["questions_per_subject"]) == (N_PAIRS, 4)
    assert "G-S1, G-S2, S1-R, S2-R, S1-S2" in admin_client.get(url).content.decode()
    weak, strong = power_answer(admin_client, url, 0.6), power_answer(admin_client, url, 0.7)
    assert set(weak) == set(strong) == {80, 90}
    assert strong[80] < weak[80] and strong[90] < weak[90] and weak[80] <= weak[90]
    blank = reverse("admin:experiments_study_power_new")
    assert power_answer(admin_client, blank, 0.7) == strong  # the same seed, the same answer
    bad = admin_client.get(blank, {"effect": 0.7, "items": 5, "questions_per_subject": 9})
    assert "A subject sees each query item at most once." in bad.content.decode()


# --- Plan rules for several systems (properties) ---------------------------------------------


@settings(max_examples=25, deadline=None)
@given(per_type=st.integers(1, 3), seed=st.integers(0, 2**32 - 1), rounds=st.integers(1, 2))
def test_two_system_comparisons_rotate_over_each_query(per_type, seed, rounds):
    labels = ("S1", "S2")
    comparisons = default_comparisons(labels)
    n_types = len(comparisons)
    keys = [f"k{i}" for i in range(per_type * n_types * rounds)]
    results = make_results(keys, labels, seed)
    counts = Counter()
    for ordinal in range(n_types * rounds):
        plan = build_plan(keys, results, per_type, seed=seed, ordinal=ordinal, labels=labels)
        check_plan(plan, keys, results, per_type, labels)
        for q in plan:
            counts[q.direction, q.query, q.pair_type] += 1
    # n_types consecutive subjects ask every query under every comparison, both directions.
    assert set(counts.values()) == {1}
    assert len(counts) == len(keys) * n_types * 2


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_systems=st.integers(2, 4),
    chosen=st.sets(st.integers(0, 20), min_size=1, max_size=6),
    per_type=st.integers(1, 3),
    agree=st.floats(0.0, 0.3),
)
def test_chosen_comparisons_of_several_systems(seed, n_systems, chosen, per_type, agree):
    """A study may list any comparisons of its systems: each is asked per_type times per
    direction, with the right items, never one item twice, ties never compared."""
    labels = tuple(f"S{i + 1}" for i in range(n_systems))
    every = default_comparisons(labels)
    comparisons = [every[i % len(every)] for i in sorted(chosen)]
    comparisons = list(dict.fromkeys(comparisons))
    keys = [f"k{i}" for i in range(per_type * len(comparisons) * 3 + 4)]
    results = make_results(keys, labels, seed, agree=agree)
    plan = build_plan(keys, results, per_type, seed=seed, comparisons=comparisons, labels=labels)
    names = {pair_type_name(c): c for c in comparisons}
    for direction in DIRECTIONS:
        block = [q for q in plan if q.direction == direction]
        assert Counter(q.pair_type for q in block) == {name: per_type for name in names}
        assert len({q.query for q in block}) == len(block)
        for q in block:
            assert {q.kind_a, q.kind_b} == set(names[q.pair_type])
            assert q.option_a != q.option_b
            tops = {s: top_result(results, s, direction, q.query) for s in labels}
            for kind, item in ((q.kind_a, q.option_a), (q.kind_b, q.option_b)):
                if kind == "G":
                    assert item == q.query
                elif kind == "R":
                    assert item != q.query and item not in tops.values()
                else:
                    assert item == tops[kind]
