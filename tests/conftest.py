"""Shared fixtures: a real Redis and a real Celery worker process, both per test session.

Tests that use the worker need `transactional_db` (the worker is another process and only
sees committed rows). The worker gets the test database's URL and the test media folder.
"""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """In the controlling process, before the xdist workers start: compile the music
    features' numba functions once, the naive oracle's too, so the workers read numba's
    cache instead of writing it at the same time (concurrent writes can pair files that
    crash a reader)."""
    if not hasattr(config, "workerinput"):
        from engine.features.audio import warm_numba_cache

        warm_numba_cache(reference=True)


@pytest.fixture
def chromium():
    """A Chromium for one test (tests/browsers.py)."""
    from tests.browsers import launched

    with launched() as browser:
        yield browser


@pytest.fixture
def staff_request():
    """`get(study, **params)`: the admin's results page of `study` (or a download) as a
    researcher with only the permission to view studies sees it, rendered."""
    from django.contrib.auth.models import Permission, User
    from django.test import RequestFactory

    from experiments.results import study_results

    staff = User.objects.create_user("researcher", password="x", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_study"))

    def get(study, **params):
        request = RequestFactory().get("/", params)
        request.user = staff
        response = study_results(request, study.pk)
        return response.render() if hasattr(response, "render") else response

    return get


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A redis-server of our own on a free port; REDIS_URL (a database per xdist worker)
    when no binary is installed."""
    from study_site.celery import redis_answers

    binary = shutil.which("redis-server")
    if binary is None:
        url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        if worker.startswith("gw"):
            # One server for every xdist worker: a database each (8, 9, …; 6 and 7 are for
            # test_demo and test_worker_crash), or one session's Celery worker would take
            # another's tasks and look for their rows in its own test database.
            url = urlparse(url)._replace(path=f"/{8 + int(worker[2:]) % 8}").geturl()
        if not redis_answers(url):
            pytest.fail(f"no redis-server binary and nothing answers at {url}")
        yield url
        return
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while not redis_answers(url):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("redis-server did not start")
        time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session", autouse=True)
def media_root(tmp_path_factory):
    """Every test session writes media under its own temporary folder. Static files come
    from the app folders; an empty STATIC_ROOT stands for `collectstatic`'s (whitenoise
    warns on every request when the folder is missing)."""
    if importlib.util.find_spec("django") is None:  # the engine's tests on a GPU host
        yield None
        return
    from django.test import override_settings

    path = tmp_path_factory.mktemp("media")
    static = tmp_path_factory.mktemp("static")
    with override_settings(MEDIA_ROOT=str(path), STATIC_ROOT=str(static)):
        yield path


def subprocess_database_url() -> str:
    """The URL of the database this test session uses (the test database, once set up)."""
    from django.db import connection

    s = connection.settings_dict
    if s["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{s['NAME']}"
    auth = s["USER"] + (f":{s['PASSWORD']}" if s.get("PASSWORD") else "")
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def start_celery_worker(env: dict, log: Path, name: str, *options: str, **popen):
    """A real `celery worker` process (one child) on the default and gpu queues, its output
    appended to `log`."""
    command = [sys.executable, "-m", "celery", "-A", "study_site", "worker"]
    command += ["-Q", "default,gpu", "--concurrency", "1", "-l", "info"]
    command += ["--without-gossip", "--without-mingle", *options]
    command += ["-n", f"{name}-{uuid.uuid4().hex[:8]}@%h"]
    with log.open("a") as out:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, **popen
        )


class Worker:
    def __init__(self, proc, log: Path, env: dict):
        self.proc, self.log, self.env = proc, log, env

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="session")
def celery_worker(redis_url, media_root, django_db_setup, django_db_blocker, tmp_path_factory):
    """A real `celery worker` process on the default and gpu queues."""
    from study_site.celery import app, ping

    with django_db_blocker.unblock():
        db_url = subprocess_database_url()
    app.conf.update(broker_url=redis_url, result_backend=redis_url, task_always_eager=False)
    # A result backend or broker connections made before this (by a test that sent a task or
    # asked the workers first) would keep using the old URL: Celery caches them, so drop them.
    app._backend_cache = None
    vars(app._local).pop("backend", None)
    if app._pool is not None:
        app._pool.force_close_all()
    app._pool = None
    if "amqp" in vars(app):
        app.amqp._producer_pool = None
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "DATABASE_URL": db_url,
        "MEDIA_ROOT": str(media_root),
        "CELERY_ALWAYS_EAGER": "0",
        "PYTHONUNBUFFERED": "1",
    }
    proc = start_celery_worker(env, log, name="test")
    try:
        ping.delay("ready").get(timeout=120)
    except Exception:
        proc.kill()
        pytest.fail("celery worker did not answer:\n" + log.read_text(errors="replace")[-3000:])
    yield Worker(proc, log, env)
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """pytest-django's, waiting at the end until no other session uses the test database:
    PostgreSQL ends a session shortly after its client (a worker process, a thread's
    connection) has gone, and dropping the database before then fails ("being accessed by
    other users"). A session still there after 10 s is named in a warning."""
    yield
    with django_db_blocker.unblock():
        from django.db import connection

        if connection.vendor != "postgresql":
            return
        deadline = time.monotonic() + 10
        with connection.cursor() as cursor:
            while True:
                cursor.execute(
                    "SELECT application_name, state, backend_start, left(query, 200)"
                    " FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                others = cursor.fetchall()
                if not others:
                    return
                if time.monotonic() > deadline:
                    warnings.warn(f"sessions left on the test database: {others}", stacklevel=1)
                    return
                time.sleep(0.1)
