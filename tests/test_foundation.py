import os
import subprocess
import sys

import pytest
from django.conf import settings
from django.db import connection

from study_site.celery import app, ping


def test_celery_round_trip_through_a_real_worker(celery_worker):
    result = ping.delay({"n": 42})
    reply = result.get(timeout=60)
    assert reply["pong"] == {"n": 42}
    assert reply["pid"] == celery_worker.proc.pid or reply["pid"] != os.getpid()
    assert "study_site.ping" in celery_worker.output()


def test_celery_uses_json_late_acks_and_a_gpu_queue():
    assert app.conf.task_serializer == "json"
    assert app.conf.accept_content == ["json"]
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.task_routes["experiments.tasks.gpu_*"] == {"queue": "gpu"}


@pytest.mark.django_db
def test_database_answers():
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone()[0] == 1
    expected = (
        "postgresql" if os.environ.get("DATABASE_URL", "").startswith("postgres") else "sqlite"
    )
    assert connection.vendor == expected


def test_secret_key_is_generated_not_committed():
    assert len(settings.SECRET_KEY) >= 40
    assert "django-insecure" not in settings.SECRET_KEY


def test_production_settings_pass_check_deploy(tmp_path):
    env = {
        **os.environ,
        "DJANGO_ENV": "production",
        "SECRET_KEY": "x" * 60 + "-Production-1!",
        "ALLOWED_HOSTS": "study.example.org",
        "VAR_DIR": str(tmp_path),
    }
    show = "from django.conf import settings as s; print(s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE)"
    for ssl, secure in (("1", "True True"), ("0", "False False")):
        # 0: a local trial without TLS, where browsers drop secure cookies (the admin's login)
        env["SECURE_SSL_REDIRECT"] = ssl
        for command in (["check", "--deploy", "--fail-level", "WARNING"], ["shell", "-c", show]):
            proc = subprocess.run(
                [sys.executable, "manage.py", *command],
                env=env,
                capture_output=True,
                text=True,
                cwd=settings.BASE_DIR,
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.splitlines()[-1] == secure


def test_a_command_whose_reader_stops_early_ends_without_a_traceback(tmp_path):
    """`manage.py export_responses STUDY | head`: the reader closes the pipe halfway."""
    lines = "import sys\nfor i in range(200_000): sys.stdout.write(f'row {i}\\n')"
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "shell", "-c", lines],
        env={**os.environ, "VAR_DIR": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=settings.BASE_DIR,
    )
    proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(60) == 1
    assert b"Traceback" not in proc.stderr.read()
