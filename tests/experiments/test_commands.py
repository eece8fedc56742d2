"""The researcher's commands: import, create subjects, prepare, export, report, plan."""

import csv
import errno
import io
import json
import os
import re
import threading

import pytest
from django.core.management import CommandError, call_command

from experiments import subjects, tasks
from experiments.models import Collection, Response, Study
from experiments.power import LIMITS, PowerForm
from study_site.celery import app
from tests.analysis.test_commands import make_study as make_answered_study

from .clips import music_video
from .test_subjects import make_study
from .test_tasks import make_collection
from .test_tasks import make_study as make_prepared_study


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.mark.django_db
def test_import_collection_reports_failures_and_is_idempotent(tmp_path):
    music_video(tmp_path / "song.mp4", 1, seconds=2.0)
    music_video(tmp_path / "mute.mp4", 5, seconds=2.0, audio=False)
    out, err = io.StringIO(), io.StringIO()
    args = ("import_collection", "cmd", str(tmp_path), "--test", "1", "--sync")
    with pytest.raises(CommandError, match="1 of 2 pairs failed") as failed:
        call_command(*args, stdout=out, stderr=err)
    assert failed.value.returncode == 1  # scripts see the failure; the good pair is imported
    assert "cmd: 1 of 2 pairs ready, 1 failed, 0 already imported" in out.getvalue()
    assert "failed  mute: mute.mp4: no audio track" in err.getvalue()
    assert err.getvalue().count("importing:") <= 2  # not a terminal: no redraw per pair
    with pytest.raises(CommandError):
        call_command(*args, stdout=out, stderr=err)
    assert "cmd: 1 of 2 pairs ready, 1 failed, 1 already imported" in out.getvalue()
    (tmp_path / "mute.mp4").unlink()  # the bad file removed: the command succeeds
    out, _ = run(*args)
    assert "cmd: 1 of 1 pairs ready, 0 failed, 1 already imported" in out


@pytest.mark.django_db
def test_import_collection_rejects_a_bad_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("video,music\n../../etc/x.mp4,\n")
    with pytest.raises(CommandError, match="lies outside the manifest's folder"):
        run("import_collection", "bad", str(tmp_path / "m.csv"))


@pytest.mark.django_db
@pytest.mark.parametrize(
    "option, says",
    [
        (("--encoder", "resnet"), "unknown encoder 'resnet'"),
        (("--encoder", "inception-v3", "--frame-size", "64"), "at least 75 pixels, not 64"),
    ],
)
def test_import_collection_refuses_an_encoder_it_cannot_run(tmp_path, option, says):
    music_video(tmp_path / "song.mp4", 1, seconds=2.0)
    with pytest.raises(CommandError, match=says):
        run("import_collection", "enc", str(tmp_path), "--sync", *option)
    assert not Collection.objects.filter(name="enc").exists()  # refused before anything


@pytest.mark.django_db
def test_create_subjects_prints_their_links():
    study = make_study()
    out, _ = run("create_subjects", study.slug, "--count", "3", "--base-url", "https://x.org/")
    tokens = re.findall(r"^https://x\.org/s/([\w-]+)/$", out, re.M)
    assert len(tokens) == 3
    assert sorted(study.subjects.values_list("token", flat=True)) == sorted(tokens)
    # Without the site's address the links only work here, and it says so (not in the links).
    out, err = run("create_subjects", study.slug, "--count", "1")
    assert re.fullmatch(r"http://localhost:8000/s/[\w-]+/\n", out)
    assert "pass --base-url with your site's address" in err
    assert all(s.questions.count() == 12 for s in study.subjects.all())
    with pytest.raises(CommandError, match="No study"):
        run("create_subjects", "nope", "--count", "1")


@pytest.mark.django_db
def test_create_subjects_for_too_small_a_collection_says_so():
    study = make_study(n=5)
    with pytest.raises(CommandError, match="too small"):
        run("create_subjects", study.slug, "--count", "1")
    assert not study.subjects.exists()


@pytest.mark.django_db
def test_create_subjects_waits_for_a_prepared_study():
    study = make_study()
    for status, says in (
        (Study.Status.DRAFT, "draft: prepare it first"),
        (Study.Status.PREPARING, "preparing: prepare it first"),
        (Study.Status.FAILED, "failed: prepare it first"),
        (Study.Status.CLOSED, "closed: open it again first"),
    ):
        Study.objects.filter(pk=study.pk).update(status=status)
        with pytest.raises(CommandError, match=says):
            run("create_subjects", study.slug, "--count", "1")
    assert not study.subjects.exists()


@pytest.mark.django_db(transaction=True)
def test_prepare_study_waits_for_the_worker(celery_worker):
    study, _ = make_prepared_study(make_collection("cmd-prep"), {"n_components": 4}, slug="cp")
    out, _ = run("prepare_study", study.slug, "--wait", "--timeout", "180")
    assert "cp: Ready: 12 questions per subject" in out
    Study.objects.filter(pk=study.pk).update(per_type=5, status=Study.Status.DRAFT)
    with pytest.raises(CommandError, match="preparation failed: .*too small"):
        run("prepare_study", study.slug, "--wait", "--timeout", "180")
    # A preparation at work is not started twice (one chain would undo the other's work).
    Study.objects.filter(pk=study.pk).update(status=Study.Status.PREPARING, preparation=7)
    with pytest.raises(CommandError, match="cp is preparing: its preparation is at work"):
        run("prepare_study", study.slug)
    assert Study.objects.get(pk=study.pk).preparation == 7


class Terminal(io.StringIO):
    """A terminal (bars redraw in place) that notes when the bar shows a system's step."""

    def __init__(self):
        super().__init__()
        self.step_shown = threading.Event()

    def isatty(self):
        return True

    def write(self, text):
        if "ch: " in text:
            self.step_shown.set()
        return super().write(text)


@pytest.mark.django_db(transaction=True)
def test_prepare_study_without_a_broker_works_here_and_shows_its_progress(monkeypatch):
    monkeypatch.setitem(app.conf, "task_always_eager", True)
    study, _ = make_prepared_study(make_collection("cmd-here"), {"n_components": 4}, slug="ch")
    out, err = io.StringIO(), Terminal()
    # The last step waits until the bar has shown an earlier one: the bar must follow the
    # work while it runs (with a bar drawn only after the work, it waits in vain).
    plan_for = subjects.plan_for

    def after_the_bar_showed_a_step(*args, **kwargs):
        err.step_shown.wait(timeout=30)
        return plan_for(*args, **kwargs)

    monkeypatch.setattr(subjects, "plan_for", after_the_bar_showed_a_step)
    call_command("prepare_study", study.slug, stdout=out, stderr=err)
    assert err.step_shown.is_set(), err.getvalue()
    assert out.getvalue().startswith("ch: Ready: 12 questions per subject. Note: ")
    assert "100%" in err.getvalue() and Study.objects.get(pk=study.pk).status == Study.Status.READY


@pytest.mark.django_db(transaction=True)
def test_in_process_preparation_stopped_or_broken_says_so(monkeypatch):
    monkeypatch.setitem(app.conf, "task_always_eager", True)
    study, _ = make_prepared_study(make_collection("cmd-stop"), {"n_components": 4}, slug="cs")
    release = threading.Event()

    def training(study_id):  # longer than --timeout
        Study.objects.filter(pk=study_id).update(status=Study.Status.PREPARING, message="Training")
        release.wait(10)

    monkeypatch.setattr(tasks.prepare_study, "delay", training)
    with pytest.raises(CommandError, match="still preparing after 0.5 s"):
        run("prepare_study", "cs", "--timeout", "0.5")
    release.set()
    study.refresh_from_db()  # not left "preparing" with nothing at work
    assert study.status == Study.Status.FAILED and "prepare it again" in study.message

    Study.objects.filter(pk=study.pk).update(status=Study.Status.READY, message="Ready")

    def broken(study_id):
        raise RuntimeError("the broker's connection broke")

    monkeypatch.setattr(tasks.prepare_study, "delay", broken)
    with pytest.raises(CommandError, match="preparation stopped: the broker's connection broke"):
        run("prepare_study", "cs")  # not "Ready", as it read before


@pytest.mark.django_db
def test_export_responses_as_csv_and_json(tmp_path):
    study = make_study(two_systems=True, per_type=1)
    out, _ = run("create_subjects", study.slug, "--count", "2")
    answered = []
    for subject in study.subjects.order_by("ordinal"):
        subject.external_id = f"PID{subject.ordinal}"
        subject.save()
        for q in subject.questions.all()[:3]:
            choice = "b" if q.position % 2 else "a"
            kind = q.kind_b if choice == "b" else q.kind_a
            Response.objects.create(
                question=q, subject=subject, choice=choice, chosen_kind=kind, response_ms=900
            )
            answered.append((subject.token, q, choice, kind))

    out, _ = run("export_responses", study.slug)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == len(answered) == 6
    for row, (token, q, choice, kind) in zip(rows, answered, strict=True):
        assert row["study"] == study.slug and row["subject"] == token
        # The analysis outputs (subjects.csv, the report's Subjects) name subjects by ordinal.
        assert row["subject_ordinal"] == str(q.subject.ordinal)
        assert row["external_id"] == f"PID{q.subject.ordinal}"
        assert (row["position"], row["direction"], row["pair_type"]) == (
            str(q.position),
            q.direction,
            q.pair_type,
        )
        assert (row["query"], row["option_a"], row["option_b"]) == (
            q.query.key,
            q.option_a.key,
            q.option_b.key,
        )
        chosen = q.option_b if choice == "b" else q.option_a
        assert (row["chosen_item"], row["chosen"], row["response_ms"]) == (chosen.key, kind, "900")
        assert row["answered_at"].startswith("20")
        machine_s1 = {"a": q.kind_a, "b": q.kind_b}.get(q.machine.get("S1"), "")
        assert row["machine_S1"] == machine_s1 and "machine_S2" in row

    assert list(rows[0])[:3] == ["study", "subject", "subject_ordinal"]
    anonymised, _ = run("export_responses", study.slug, "--anonymise")
    assert [r["subject_ordinal"] for r in csv.DictReader(io.StringIO(anonymised))] == [
        r["subject_ordinal"] for r in rows
    ]

    target = tmp_path / "answers.json"
    _, err = run("export_responses", str(study.pk), "--format", "json", "--output", str(target))
    assert "6 answers written" in err
    assert [r["chosen"] for r in json.loads(target.read_text())] == [r["chosen"] for r in rows]


@pytest.mark.django_db
def test_export_responses_without_answers_writes_the_header():
    from experiments.export import COLUMNS

    study = make_study(two_systems=True, per_type=1)
    run("create_subjects", study.slug, "--count", "1")
    out, _ = run("export_responses", study.slug, "--format", "csv")
    assert out.splitlines() == [",".join([*COLUMNS, "machine_S1", "machine_S2"])]
    out, _ = run("export_responses", study.slug, "--format", "json")
    assert json.loads(out) == []


@pytest.mark.django_db
@pytest.mark.parametrize("option", ["--plot", "--subjects-csv"])
def test_preference_report_checks_its_output_paths_before_the_report(tmp_path, option):
    make_answered_study()
    folder = tmp_path / ("box.png" if option == "--plot" else "s.csv")
    folder.mkdir()
    for path, says in (
        (tmp_path / "nosuch" / folder.name, f"the folder {tmp_path / 'nosuch'} does not exist"),
        (folder, "it is a folder; give a file name"),
    ):
        out, err = io.StringIO(), io.StringIO()
        with pytest.raises(CommandError) as refused:
            call_command("preference_report", "known", option, str(path), stdout=out, stderr=err)
        assert str(refused.value) == f"{option} {path}: {says}."
        assert out.getvalue() == "" and err.getvalue() == ""  # no report printed before it
    assert list(tmp_path.iterdir()) == [folder] and not any(folder.iterdir())


@pytest.mark.django_db
def test_export_responses_to_a_missing_folder_says_so(tmp_path):
    study = make_study(per_type=1)
    target = tmp_path / "nosuch" / "x.csv"
    with pytest.raises(CommandError, match=f"--output {target}: the folder .* does not exist"):
        run("export_responses", study.slug, "--output", str(target))
    (tmp_path / "file").write_text("")
    with pytest.raises(CommandError, match="file is not a folder"):
        run("export_responses", study.slug, "--output", str(tmp_path / "file" / "x.csv"))
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]


@pytest.mark.django_db
def test_export_responses_replaces_a_previous_file_only_once_written_whole(tmp_path, monkeypatch):
    """A full disk halfway through an export leaves the previous export as it was, and
    nothing beside it."""
    study = make_study(per_type=1)
    target = tmp_path / "answers.json"
    run("export_responses", study.slug, "--format", "json", "--output", str(target))
    before = target.read_bytes()

    def disk_full_halfway(rows, fmt, out, columns):
        out.write("study,subject,")
        out.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("experiments.management.commands.export_responses.write", disk_full_halfway)
    with pytest.raises(CommandError) as error:
        run("export_responses", study.slug, "--output", str(target))
    assert str(error.value) == f"--output {target}: cannot write it (No space left on device)."
    assert target.read_bytes() == before and list(tmp_path.iterdir()) == [target]


PLAN = {"--effect": "0.7", "--items": "10", "--questions-per-subject": "5", "--sims": "20"}


@pytest.mark.parametrize(
    "option, value, says",
    [
        ("--alpha", "2", "--alpha must be between 0.0001 and 0.5, not 2.0"),
        ("--alpha", "0", "--alpha must be between"),
        ("--sims", "0", "--sims must be at least 20, not 0"),
        ("--subject-sd", "-1", "--subject-sd must be at least 0.0, not -1.0"),
        ("--item-sd", "nan", "--item-sd must be a finite number, not nan"),
        ("--items", "0", "--items must be at least 2, not 0"),
        ("--questions-per-subject", "0", "--questions-per-subject must be at least 1, not 0"),
        ("--questions-per-subject", "11", "is more than --items 10: a subject sees each query"),
        ("--effect", "1.5", "--effect must be between 0.01 and 0.99, not 1.5"),
        ("--max-subjects", "3", "--max-subjects must be at least 4, not 3"),
    ],
)
def test_plan_power_refuses_values_out_of_range(option, value, says):
    args = [a for o, v in {**PLAN, option: value}.items() for a in (o, v)]
    with pytest.raises(CommandError, match=re.escape(says)):
        run("plan_power", *args)


def test_the_admin_power_form_has_the_commands_limits():
    initial = {"comparison": "GS", "effect": 0.6, "items": 10, "questions_per_subject": 5}
    initial |= {"subject_sd": 0.5, "item_sd": 0.5, "sims": 20, "max_subjects": 10}
    assert PowerForm(initial).is_valid()
    for name, (low, _) in LIMITS.items():
        if name in PowerForm.base_fields:
            below = low - (0.001 if isinstance(low, float) else 1)
            assert not PowerForm({**initial, name: below}).is_valid(), name
            option = "--" + name.replace("_", "-")
            with pytest.raises(CommandError, match=f"{option} must be"):
                run("plan_power", *(a for o, v in {**PLAN, option: below}.items() for a in (o, v)))


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_export_responses_writes_each_answer_as_it_comes(fmt):
    """A big study's answers held 1.2 GB as one JSON string: each row is written before the
    next is read, and the output is the same rows."""
    from experiments.management.commands.export_responses import write

    drawn, seen = [], []

    def rows():
        for i in range(3):
            drawn.append(i)
            yield {"position": i + 1, "choice": "a"}

    class Out(io.StringIO):
        def write(self, text):
            seen.append(len(drawn))
            return super().write(text)

    out = Out()
    assert write(rows(), fmt, out, ["position", "choice"]) == 3
    assert seen[:2] == [0, 1]  # the first answer written before the second was read
    text = out.getvalue()
    parsed = json.loads(text) if fmt == "json" else list(csv.DictReader(io.StringIO(text)))
    assert [int(r["position"]) for r in parsed] == [1, 2, 3]
    empty = io.StringIO()
    assert write(iter([]), fmt, empty, ["position", "choice"]) == 0
    assert (json.loads(empty.getvalue()) if fmt == "json" else empty.getvalue()) in (
        [],
        "position,choice\r\n",
    )
