"""The loader, both management commands and the admin results page, on real database rows."""

import contextlib
import errno
import io
import json
import os
import re
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from django.contrib.auth.models import AnonymousUser
from django.core.management import CommandError, call_command
from django.test import RequestFactory
from django.urls import reverse
from django.utils import timezone

from analysis.load import left_out, responses_frame
from experiments.models import (
    Collection,
    Pair,
    Question,
    Response,
    Study,
    StudySystem,
    Subject,
    System,
)
from experiments.results import study_results

pytestmark = pytest.mark.django_db

# Per subject: {(pair_type, direction): answers choosing the first kind of 4}.
SUBJECTS = [
    {("GR", "V2M"): 4, ("GR", "M2V"): 3, ("GS", "V2M"): 2, ("SR", "V2M"): 3},
    {("GR", "V2M"): 2, ("GR", "M2V"): 3, ("GS", "V2M"): 2, ("SR", "V2M"): 4},
]
PER_CELL = 4


def make_study(subjects=SUBJECTS, completed=True, slug="known", meta=None, outcome=""):
    collection = Collection.objects.create(name=f"c-{slug}")
    pairs = [
        Pair.objects.create(collection=collection, key=f"p{i:02d}") for i in range(PER_CELL + 2)
    ]
    study = Study.objects.create(name=f"Study {slug}", slug=slug, collection=collection)
    for ordinal, cells in enumerate(subjects):
        subject = Subject.objects.create(
            study=study,
            ordinal=ordinal,
            completed_at=timezone.now() if completed else None,
            meta=meta or {},
            outcome=outcome,
        )
        position = 0
        for (pair_type, direction), first_chosen in cells.items():
            first, second = pair_type[0], pair_type[1]
            for i in range(PER_CELL):
                position += 1
                # Alternate which candidate is shown first; the machine prefers the first kind
                # on 3 of 4 questions.
                kind_a, kind_b = (first, second) if i % 2 else (second, first)
                machine_kind = first if i < 3 else second
                question = Question.objects.create(
                    subject=subject,
                    position=position,
                    direction=direction,
                    pair_type=pair_type,
                    query=pairs[i],
                    option_a=pairs[PER_CELL],
                    option_b=pairs[PER_CELL + 1],
                    kind_a=kind_a,
                    kind_b=kind_b,
                    machine={"S": "a" if kind_a == machine_kind else "b"},
                )
                chosen = first if i < first_chosen else second
                Response.objects.create(
                    question=question,
                    subject=subject,
                    choice="a" if kind_a == chosen else "b",
                    chosen_kind=chosen,
                    response_ms=900 + i,
                )
    return study


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_loader_builds_the_analysis_frame():
    study = make_study()
    df = responses_frame(study)
    assert len(df) == 2 * 4 * PER_CELL
    row = df.iloc[0]
    assert (row["study"], row["subject"], row["position"], row["direction"]) == (
        "known",
        0,
        1,
        "V2M",
    )
    assert (row["pair_type"], row["first"], row["second"], row["item"]) == ("GR", "G", "R", "p00")
    assert row["response_ms"] == 900
    assert not df["is_catch"].any()
    # The machine's a/b choice becomes the kind it chose.
    gr = df[df.pair_type == "GR"]
    assert (gr["machine_S"] == "G").sum() == 3 * len(gr) // 4
    assert responses_frame(study.slug).equals(df) and responses_frame(study.pk).equals(df)


def test_loader_leaves_out_incomplete_and_failed_subjects():
    partial = make_study(slug="partial", completed=False)
    assert responses_frame("partial").empty
    assert len(responses_frame("partial", include_incomplete=True)) == 32
    assert left_out("partial") == {"not_finished": 2}
    Subject.objects.create(study=partial, ordinal=9)  # a link nobody opened: not counted
    assert left_out("partial") == {"not_finished": 2}
    make_study(slug="failed", outcome=Subject.Outcome.FAILED_ATTENTION)
    assert responses_frame("failed").empty
    assert len(responses_frame("failed", include_failed=True)) == 32
    assert left_out("failed") == {"failed_attention": 2}
    assert left_out("failed", include_failed=True) == {}


def add_catch_questions(subject, answered: list[str], total: int = 4):
    """`total` catch questions after the subject's others; `answered` the kinds chosen so far
    ('G' passes, 'X' fails)."""
    pairs = list(subject.study.collection.pairs.order_by("key")[:2])
    start = subject.questions.count()
    for i in range(total):
        question = Question.objects.create(
            subject=subject, position=start + i + 1, direction="V2M", pair_type="GX",
            query=pairs[0], option_a=pairs[0], option_b=pairs[1], kind_a="G", kind_b="X",
            is_catch=True,
        )  # fmt: skip
        if i < len(answered):
            choice = "a" if answered[i] == "G" else "b"
            Response.objects.create(
                question=question, subject=subject, choice=choice, chosen_kind=answered[i]
            )


def test_loader_leaves_out_subjects_in_progress_who_can_no_longer_pass_the_catch_checks():
    study = make_study(slug="checked", completed=False)
    doomed, hopeful = study.subjects.order_by("ordinal")
    add_catch_questions(doomed, ["X", "X", "G"])  # at most 2 of 4 passed in the end
    add_catch_questions(hopeful, ["X"])  # 0 of 1 so far, but 3 of 4 are still possible
    # Without a threshold, failed catch questions exclude nobody.
    assert set(responses_frame("checked", include_incomplete=True)["subject"]) == {0, 1}
    Study.objects.filter(pk=study.pk).update(attention_checks=True, catch_pass_threshold=0.75)
    assert set(responses_frame("checked", include_incomplete=True)["subject"]) == {1}
    both = responses_frame("checked", include_incomplete=True, include_failed=True)
    assert set(both["subject"]) == {0, 1}
    # The report's counts of who is left out say the same, by reason.
    assert left_out("checked", include_incomplete=True) == {"cannot_pass": 1}
    assert left_out("checked") == {"not_finished": 2}  # counted once, not also as cannot_pass
    assert left_out("checked", include_incomplete=True, include_failed=True) == {}
    Study.objects.filter(pk=study.pk).update(catch_pass_threshold=0.5)  # 2 of 4 still pass
    assert set(responses_frame("checked", include_incomplete=True)["subject"]) == {0, 1}
    assert left_out("checked", include_incomplete=True) == {}


def test_report_markdown_has_table_iv_and_machine_row():
    make_study()
    out, _ = run("preference_report", "known")
    lines = {
        line.split("|")[1].strip() + " " + line.split("|")[2].strip(): line
        for line in out.splitlines()
        if line.startswith("| ")
    }
    cells = lambda key: [c.strip() for c in lines[key].split("|")[3:-1]]  # noqa: E731
    assert cells("Human GR") == ["75.00", "75.00", "75.00"]
    assert cells("Human GS") == ["50.00", "nan", "50.00"]
    assert cells("Human SR") == ["87.50", "nan", "87.50"]
    assert cells("Machine GR") == ["75.00", "75.00", "75.00"]
    assert "Subjects: 2, answers: 32" in out


def test_report_csv_json_latex_formats():
    study = make_study()
    out, _ = run("preference_report", str(study.pk), "--format", "csv")
    table = pd.read_csv(io.StringIO(out))
    gs = table[(table.judge == "Human") & (table.pair_type == "GS") & (table.direction == "V2M")]
    assert gs.iloc[0][["percent", "n_answers", "n_subjects"]].tolist() == [50.0, 8, 2]
    out, _ = run("preference_report", "known", "--format", "json")
    assert json.loads(out)["counts"] == {
        "subjects": 2,
        "answers": 32,
        "answers_with_media_errors": 0,
    }
    out, _ = run("preference_report", "known", "--format", "latex")
    assert "\\begin{tabular}" in out and "87.50" in out


def test_report_writes_plot_and_subject_csv(tmp_path):
    make_study()
    plot, subjects = tmp_path / "fig7.svg", tmp_path / "subjects.csv"
    out, err = run(
        "preference_report", "known", "--plot", str(plot), "--subjects-csv", str(subjects)
    )
    assert plot.read_bytes().startswith(b"<?xml") and str(plot) in err
    rows = pd.read_csv(subjects)
    first = rows[(rows.subject == 0) & (rows.pair_type == "GR") & (rows.direction == "V2M")]
    assert first.iloc[0][["n", "preferred", "preference"]].tolist() == [4, 4, 100.0]
    assert len(rows) == 8


def disk_full_halfway(binary: bool):
    """A writer of a frame (or plot) to a path or file that gets half its output written,
    then finds the disk full."""

    def write(df, target, *args, **kwargs):
        with contextlib.ExitStack() as opened:
            if isinstance(target, str | Path):  # it opens the path itself
                target = opened.enter_context(open(target, "wb" if binary else "w"))
            target.write(b"<?xml half" if binary else "subject,n\n0,")
            target.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


@pytest.mark.parametrize("option", ["--plot", "--subjects-csv"])
def test_report_outputs_replace_a_previous_file_only_once_written_whole(
    tmp_path, monkeypatch, option
):
    make_study()
    target = tmp_path / ("fig7.svg" if option == "--plot" else "subjects.csv")
    run("preference_report", "known", option, str(target))
    before = target.read_bytes()
    if option == "--plot":
        command = "experiments.management.commands.preference_report"
        monkeypatch.setattr(f"{command}.preference_boxplot", disk_full_halfway(binary=True))
    else:
        monkeypatch.setattr(pd.DataFrame, "to_csv", disk_full_halfway(binary=False))
    with pytest.raises(CommandError) as error:
        run("preference_report", "known", option, str(target))
    assert str(error.value) == f"{option} {target}: cannot write it (No space left on device)."
    assert target.read_bytes() == before and list(tmp_path.iterdir()) == [target]


def test_report_refuses_clearly_without_answers():
    collection = Collection.objects.create(name="empty")
    Study.objects.create(name="Empty", slug="empty", collection=collection)
    with pytest.raises(CommandError, match="no answers to analyse: nobody has answered yet"):
        run("preference_report", "empty")
    with pytest.raises(CommandError, match="No study"):
        run("preference_report", "nope")
    make_study(slug="partial", completed=False)
    with pytest.raises(CommandError, match=r"2 subject\(s\) yet to finish \(--incl"):
        run("preference_report", "partial")
    make_study(slug="failed", outcome=Subject.Outcome.FAILED_ATTENTION)
    with pytest.raises(
        CommandError, match=r"2 subject\(s\) who failed the attention checks \(--include-f"
    ):
        run("preference_report", "failed")  # completed, all of them, but left out
    out, _ = run("preference_report", "partial", "--include-incomplete", "--format", "json")
    assert json.loads(out)["counts"]["subjects"] == 2


def test_report_names_its_systems_and_who_it_leaves_out(admin_client):
    study = make_study(slug="told")
    system = System.objects.create(name="VM-NET v2", collection=study.collection)
    StudySystem.objects.create(study=study, system=system, label="S")
    Subject.objects.filter(study=study, ordinal=1).update(outcome=Subject.Outcome.FAILED_ATTENTION)
    out, _ = run("preference_report", "told")
    assert "Systems: S = VM-NET v2." in out
    assert "Left out: 1 subject who failed the attention checks." in out
    assert json.loads(run("preference_report", "told", "--format", "json")[0])["left_out"] == {
        "failed_attention": 1
    }
    out, _ = run("preference_report", "told", "--include-failed")
    assert "Left out" not in out and "Subjects: 2," in out

    # The admin's results page says the same, and counts them on request.
    Study.objects.filter(pk=study.pk).update(attention_checks=True)
    page = reverse("admin:experiments_study_results", args=[study.pk])
    html = admin_client.get(page).content.decode()
    assert "Systems: S = VM-NET v2." in html
    assert "Left out: 1 subject who failed the attention checks." in html
    assert re.search(r"<strong>1</strong> subject,", html)
    html = admin_client.get(page, {"failed": "1"}).content.decode()
    assert "Left out" not in html and re.search(r"<strong>2</strong> subjects,", html)
    assert "including those who failed the attention checks" in html
    download = admin_client.get(page, {"failed": "1", "download": "json"})
    assert json.loads(download.content)["counts"]["subjects"] == 2
    assert "-with-failed.json" in download["Content-Disposition"]


def test_plan_power_command_prints_both_targets():
    out, _ = run(
        "plan_power",
        "--comparison",
        "S1-S2",
        "--effect",
        "0.7",
        "--items",
        "40",
        "--questions-per-subject",
        "10",
        "--sims",
        "100",
        "--max-subjects",
        "60",
    )
    assert out.startswith("S1-S2: preference 70.0%, 40 items, 10 questions per subject")
    lines = out.splitlines()
    n80 = int(lines[1].removeprefix("80% power: ").split()[0])
    n90 = int(lines[2].removeprefix("90% power: ").split()[0])
    assert 2 < n80 <= n90 <= 60
    with pytest.raises(CommandError, match="effect"):
        run("plan_power", "--effect", "1.5", "--items", "10", "--questions-per-subject", "5")


def test_results_page_shows_table_plot_and_links(staff_request):
    study = make_study()
    page = staff_request(study).content.decode()
    assert "75.0<" in page and "87.5<" in page and "Machine" in page  # one decimal
    assert "binom_<wbr>p_<wbr>holm" in page and "Holm" in page  # may wrap at underscores
    assert "judged 16 of 16 G-R questions (100%)" in page
    assert "data:image/png;base64," in page
    # Cells without answers (GS and SR in M2V) and tests not made read "–", never "nan".
    text = re.sub(r"data:image/png;base64,[^\"]+", "", page)
    assert not re.search(r"\bnan\b", text, re.IGNORECASE) and "–" in text
    assert 'id="kappa-table"' in page and "Fleiss" in page
    for fmt in ["csv", "xlsx", "json", "latex", "png", "svg", "zip"]:
        assert f"?download={fmt}" in page


def test_results_downloads(staff_request):
    study = make_study()
    csv = staff_request(study, download="csv")
    assert csv["Content-Disposition"] == 'attachment; filename="known-preference.csv"'
    assert pd.read_csv(io.BytesIO(csv.content))["percent"].notna().any()
    archive = zipfile.ZipFile(io.BytesIO(staff_request(study, download="zip").content))
    assert "preference.svg" in archive.namelist()
    assert staff_request(study, download="png").content.startswith(b"\x89PNG")
    assert staff_request(study, download="docx").status_code == 400


def test_results_page_without_answers_and_for_non_staff(staff_request):
    study = make_study(completed=False)
    page = staff_request(study).content.decode()
    assert "No answers to analyse yet from the subjects counted." in page
    assert "Left out: 2 subjects yet to finish." in page
    assert staff_request(study, incomplete="1").content.decode().count("75.0<") >= 1
    assert staff_request(study, download="csv").status_code == 400
    request = RequestFactory().get("/")
    request.user = AnonymousUser()
    assert study_results(request, study.pk).status_code == 302  # to the admin login
