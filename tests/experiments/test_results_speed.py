"""The admin's results page at scale: the loader reads JSON and times a column at once, and
the page and its downloads share one report per distinct input, kept in Django's cache under
a digest of the answers themselves, so that what they show is always what computing it anew
would show, after any change in the database."""

import io
import re
import zipfile

import pandas as pd
import pytest
from django.core.cache import cache
from django.test import override_settings
from django.utils import timezone

import experiments.results
from analysis.load import responses_frame
from analysis.machine import MACHINE_PREFIX
from experiments.models import Question, Response, Study, StudySystem, Subject, System
from tests.analysis.test_commands import PER_CELL, make_study

pytestmark = pytest.mark.django_db

UNCACHED = {"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}}
DOWNLOADS = ["markdown", "csv", "json", "latex", "xlsx", "png", "svg", "zip"]


@pytest.fixture(autouse=True)
def empty_cache():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def get(staff_request):
    """The page or a download as bytes, comparable between requests: without the CSRF token
    and a zip's times."""

    def get(study, **params):
        response = staff_request(study, **params)
        assert response.status_code == 200
        return comparable(f"results.{params.get('download', 'html')}", response.content)

    return get


def comparable(name: str, content: bytes) -> bytes | dict:
    if name.endswith((".zip", ".xlsx")):  # their files' times differ
        archive = zipfile.ZipFile(io.BytesIO(content))
        return {name: comparable(name, archive.read(name)) for name in archive.namelist()}
    content = re.sub(rb'name="csrfmiddlewaretoken" value="[^"]*"', b"", content)
    return re.sub(rb"<dcterms:(created|modified)[^<]*</dcterms:\w+>", b"", content)


def fresh(get, study, **params):
    with override_settings(CACHES=UNCACHED):
        return get(study, **params)


def shares(page: bytes) -> list[str]:
    """The page's numbers: its counts and every cell of its tables."""
    html = page.decode()
    counts = re.findall(r"<strong>(\d+)</strong>", html)
    return counts + re.findall(r'<td class="num">([^<]*)</td>', html)


def answer(subject, position, pair_type, direction, chosen, kind_a, kind_b):
    pairs = list(subject.study.collection.pairs.order_by("key"))
    question = Question.objects.create(
        subject=subject, position=position, direction=direction, pair_type=pair_type,
        query=pairs[0], option_a=pairs[PER_CELL], option_b=pairs[PER_CELL + 1],
        kind_a=kind_a, kind_b=kind_b, machine={"S": "a"},
    )  # fmt: skip
    return Response.objects.create(
        question=question, subject=subject, choice="a" if chosen == kind_a else "b",
        chosen_kind=chosen,
    )  # fmt: skip


@pytest.mark.parametrize(
    "options", [{}, {"incomplete": "1"}, {"failed": "1", "heard_only": "1"}], ids=str
)
def test_kept_page_and_downloads_are_what_computing_them_anew_gives(get, options):
    study = make_study()
    Subject.objects.filter(study=study, ordinal=1).update(completed_at=None)
    unheard = Response.objects.filter(subject__study=study).order_by("pk")[2]
    Response.objects.filter(pk=unheard.pk).update(behaviour={"errors": ["video"]})
    for params in [{}, *({"download": fmt} for fmt in DOWNLOADS)]:
        first = get(study, **options, **params)
        assert get(study, **options, **params) == first == fresh(get, study, **options, **params)


def test_page_and_downloads_of_one_sample_make_one_report(get, monkeypatch):
    """Each request made the report anew (7-12 s at 1,000 subjects); the page and all its
    downloads now share one per sample, and a toggle's sample is another."""
    study = make_study()
    made = []
    build_report = experiments.results.build_report
    monkeypatch.setattr(
        experiments.results,
        "build_report",
        lambda df, **kwargs: made.append(kwargs["heard_only"]) or build_report(df, **kwargs),
    )
    get(study)
    for fmt in DOWNLOADS:
        get(study, download=fmt)
    get(study)
    assert made == [False]
    get(study, heard_only="1")
    get(study, heard_only="1", download="csv")
    assert made == [False, True]


def test_a_new_answer_shows_at_once(get):
    study = make_study()
    before = get(study)
    subject = Subject.objects.create(study=study, ordinal=2, completed_at=timezone.now())
    answer(subject, 1, "GR", "V2M", "R", "G", "R")
    after = get(study)
    assert shares(after) != shares(before)
    assert "<strong>3</strong> subjects" in after.decode()
    assert after == fresh(get, study)


def test_an_answer_changed_in_place_shows_at_once(get):
    """A change that keeps every count and id (a correction made in the database), which a
    key of counts and last ids would not see."""
    study = make_study()
    before, csv_before = get(study), get(study, download="csv")
    first = Response.objects.filter(subject__study=study, question__pair_type="GR")
    changed = first.filter(chosen_kind="G").order_by("pk").first()
    Response.objects.filter(pk=changed.pk).update(
        chosen_kind="R", choice="b" if changed.choice == "a" else "a"
    )
    after = get(study)
    assert shares(after) != shares(before) and after == fresh(get, study)
    assert get(study, download="csv") != csv_before
    judged = {"S": "b" if changed.question.machine["S"] == "a" else "a"}
    Question.objects.filter(pk=changed.question_id).update(machine=judged)  # judged anew
    assert get(study) != after and get(study) == fresh(get, study)


def test_who_is_counted_and_what_the_study_and_systems_are_called_show_at_once(get):
    study = make_study()
    system = System.objects.create(name="VM-NET v1", collection=study.collection)
    StudySystem.objects.create(study=study, system=system, label="S")
    page, png = get(study), get(study, download="png")
    Subject.objects.filter(study=study, ordinal=1).update(outcome=Subject.Outcome.FAILED_ATTENTION)
    failed = get(study)
    assert "Left out: 1 subject who failed" in failed.decode()
    assert shares(failed) != shares(page) and failed == fresh(get, study)
    assert shares(get(study, failed="1")) == shares(page)  # counted again on request
    Subject.objects.filter(study=study, ordinal=1).update(outcome="", completed_at=None)
    assert "Left out: 1 subject yet to finish." in get(study).decode()
    System.objects.filter(pk=system.pk).update(name="VM-NET v2")
    assert "S = VM-NET v2" in get(study, incomplete="1").decode()
    Study.objects.filter(pk=study.pk).update(name="Renamed")  # the plot's title
    renamed = get(study, incomplete="1", download="png")
    assert renamed != png and renamed == fresh(get, study, incomplete="1", download="png")


def test_loader_reads_each_answer_as_stored(django_assert_max_num_queries):
    """The loader reads JSON and times as text, a column at once: the same values as Django
    reads, row by row."""
    study = make_study()
    responses = list(Response.objects.filter(subject__study=study).order_by("pk"))
    logs = [
        {"errors": ["video", "music"]},
        {"errors": []},
        {"errors": "timeout"},  # not a list: no errors counted
        {"errors": {"video": 1}},
        {"errors": 3},
        {"errors": None},
        {"plays": [1, 2]},
        {},
    ]
    for response, log in zip(responses, logs, strict=False):
        Response.objects.filter(pk=response.pk).update(behaviour=log)
    questions = Question.objects.filter(subject__study=study).order_by("pk")
    Question.objects.filter(pk=questions[0].pk).update(machine={})
    Question.objects.filter(pk=questions[1].pk).update(machine={"S": "b", "T": "a"})
    with django_assert_max_num_queries(6):
        df = responses_frame(study)
    rows = (
        Response.objects.filter(subject__study=study)
        .select_related("subject", "question__query", "question__option_a", "question__option_b")
        .order_by("subject__ordinal", "question__position")
    )
    assert len(df) == len(rows)
    for (_, row), response in zip(df.iterrows(), rows, strict=True):
        question = response.question
        errors = response.behaviour.get("errors")
        assert row["media_errors"] == (len(errors) if isinstance(errors, list) else 0)
        assert row["answered_at"] == response.answered_at
        assert (row["subject"], row["position"], row["item"]) == (
            response.subject.ordinal,
            question.position,
            question.query.key,
        )
        assert (row["option_a"], row["option_b"], row["chosen"]) == (
            question.option_a.key,
            question.option_b.key,
            response.chosen_kind,
        )
        for label in ["S", "T"]:
            choice = question.machine.get(label)
            kind = {"a": question.kind_a, "b": question.kind_b}.get(choice)
            value = row[MACHINE_PREFIX + label]
            assert (None if pd.isna(value) else value) == kind
    assert str(df["answered_at"].dtype) == "datetime64[us, UTC]"
    assert df["first"].dtype == object and df["media_errors"].dtype == "int64"
    assert df["media_errors"].tolist()[:8] == [2, 0, 0, 0, 0, 0, 0, 0]
