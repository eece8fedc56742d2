"""`manage.py demo` end to end on a tiny corpus, as a user runs it: its own SQLite database,
its own Celery worker on a real Redis, then one subject answered over HTTP and the report."""

import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
PAIRS = ("clip_0003", "clip_0017")  # two of the demo corpus's keys


def _manage(env, *args, timeout=900):
    proc = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, f"manage.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def demo_env(tmp_path, redis_url):
    # A Redis database of its own, so the session's test worker never takes the demo's tasks
    # (nor the workers of test_worker_crash, on database 7, or the demo's worker theirs).
    redis_db = redis_url.rsplit("/", 1)[0] + "/6"
    env = {**os.environ, "VAR_DIR": str(tmp_path / "var"), "REDIS_URL": redis_db,
           "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    env.pop("MEDIA_ROOT", None)
    return env  # no migrate: the demo makes its own tables on a fresh machine


def test_demo_prepares_a_study_that_a_subject_can_finish(demo_env):
    args = ["demo", "--no-serve", "--pairs", "24", "--test", "8", "--per-type", "2"]
    out = _manage(demo_env, *args)
    links = re.findall(r"http://127\.0\.0\.1:8000(/s/[\w-]+/)", out)
    assert len(links) == 3, out
    password = re.search(r"password: (\S+)", out).group(1)
    assert re.search(r"VM-NET\s+V2M\s+[\d.]+\s+[\d.]+\s+[\d.]+", out), out
    assert re.search(r"CCA\s+M2V\s+[\d.]+", out), out
    assert "chance" in out

    # A stopped import (Ctrl-C while pairs were processed) is finished by the next run.
    database = demo_env["DATABASE_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(database) as db:
        db.execute("UPDATE experiments_pair SET status = 'pending' WHERE key IN (?, ?)", PAIRS)

    # A second run reuses everything else: same links, same password, no new work.
    started = time.monotonic()
    again = _manage(demo_env, *args)
    assert time.monotonic() - started < 120
    with sqlite3.connect(database) as db:
        statuses = db.execute("SELECT status FROM experiments_pair WHERE key IN (?, ?)", PAIRS)
        assert [status for (status,) in statuses] == ["ready", "ready"]
    assert re.findall(r"http://127\.0\.0\.1:8000(/s/[\w-]+/)", again) == links
    assert f"password: {password}" in again
    assert "already prepared" not in again
    # Other sizes cannot apply to a prepared demo: it says so. An admin it did not make (its
    # password file gone) keeps the password it has.
    (Path(demo_env["VAR_DIR"]) / "demo" / "admin-password").unlink()
    with sqlite3.connect(database) as db:
        hashed = db.execute("SELECT password FROM auth_user WHERE username = 'admin'").fetchall()
    other = _manage(demo_env, "demo", "--no-serve", "--pairs", "24", "--test", "6")
    assert "set up with 24 pairs, 8 test pairs and 2 questions per type" in other
    assert "--fresh" in other
    assert "password: (your own: this user was not made by the demo)" in other
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT password FROM auth_user WHERE username = 'admin'").fetchall() == (
            hashed
        )

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "manage.py", *[a for a in args if a != "--no-serve"], "--port", str(port)],
        cwd=ROOT, env=demo_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # the demo starts its worker first
            try:
                requests.get(base + links[0], timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        page = requests.get(base + links[0], timeout=10)
        assert page.status_code == 200 and "Start" in page.text
        bots = _manage(demo_env, "run_bots", "demo", "--subjects", "1",
                       "--strategy", "ground-truth", "--base-url", base)  # fmt: skip
        assert re.search(r"12 answers, completed", bots), bots
    finally:
        server.terminate()  # SIGTERM: the demo stops its web server and worker too
        assert server.wait(30) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(base + links[0], timeout=2)

    # The ground-truth bot always picks G, so G-R and G-S read 100 %.
    report = _manage(demo_env, "preference_report", "demo", "--format", "json")
    assert '"GR"' in report and "V2M" in report, report

    # Other sizes start afresh on request: a new study and collection of those sizes.
    fresh = _manage(demo_env, "demo", "--no-serve", "--fresh", "--pairs", "20", "--test", "6",
                    "--per-type", "2")  # fmt: skip
    assert "Deleted the earlier demo's study and collection" in fresh
    assert not set(re.findall(r"http://127\.0\.0\.1:8000(/s/[\w-]+/)", fresh)) & set(links)
    with sqlite3.connect(database) as db:
        splits = dict(db.execute("SELECT split, COUNT(*) FROM experiments_pair GROUP BY split"))
        assert splits.get("test") == 6 and sum(splits.values()) - splits.get("catch", 0) == 20
        assert db.execute("SELECT COUNT(*) FROM experiments_response").fetchone() == (0,)


def test_the_demo_says_why_the_redis_it_started_did_not_run(tmp_path, settings, monkeypatch):
    """A port taken by something else: redis-server exits at once, and its reason is shown."""
    import io
    import shutil

    from experiments.management.commands.demo import Command
    from study_site.celery import app

    if not shutil.which("redis-server"):
        pytest.skip("no redis-server binary")
    monkeypatch.setitem(app.conf, "task_always_eager", app.conf.task_always_eager)
    monkeypatch.setenv("CELERY_ALWAYS_EAGER", os.environ.get("CELERY_ALWAYS_EAGER", "0"))
    with socket.socket() as taken:  # listens, never answers PING
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{taken.getsockname()[1]}/0"
        settings.VAR_DIR = tmp_path
        command = Command(stdout=io.StringIO())
        command.children = []
        assert command._ensure_redis() is None  # tasks run in-process
    said = command.stdout.getvalue()
    assert "did not start" in said and "Address already in use" in said
    assert str(tmp_path / "redis.log") in said


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--test", "5", "--per-type", "2"], "--test 5 is too few for --per-type 2"),
        (["--pairs", "24", "--test", "20", "--per-type", "2"], "at least --pairs 30"),
        (["--per-type", "0"], "--per-type must be at least 1"),
    ],
)
def test_demo_sizes_no_study_can_take_are_refused_before_any_work(args, message, db):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    from experiments.models import Collection

    with pytest.raises(CommandError, match=re.escape(message)):
        call_command("demo", "--no-serve", *args)
    assert not Collection.objects.exists()


def test_the_demo_refuses_a_port_in_use_before_any_work(db):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    from experiments.models import Collection

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        with pytest.raises(CommandError, match=f"cannot serve on 127.0.0.1:{port}"):
            call_command("demo", "--port", port, "--pairs", "24", "--test", "6", "--per-type", "2")
    assert not Collection.objects.exists()


def test_the_demo_says_it_starts_no_redis_for_another_host(tmp_path, settings, monkeypatch):
    import io

    from experiments.management.commands.demo import Command
    from study_site.celery import app

    monkeypatch.setitem(app.conf, "task_always_eager", app.conf.task_always_eager)
    monkeypatch.setenv("CELERY_ALWAYS_EAGER", os.environ.get("CELERY_ALWAYS_EAGER", "0"))
    settings.CELERY_BROKER_URL = f"redis://127.0.0.2:{_free_port()}/0"  # nothing listens there
    settings.VAR_DIR = tmp_path
    command = Command(stdout=io.StringIO())
    command.children = []
    assert command._ensure_redis() is None and command.children == []  # in-process
    assert "REDIS_URL names 127.0.0.2: a redis-server is started only here" in (
        command.stdout.getvalue()
    )
