"""The database dropping a connection (PostgreSQL restarted) or out of reach: nothing a
participant or a preparation has done is lost, and nobody waits on a page that cannot work.

The dropped connection is real: PostgreSQL ends the connection's server process
(`pg_terminate_backend`), as a restart does. Those tests need PostgreSQL (CI has it)."""

from contextlib import contextmanager

import pytest
from django.core.handlers.wsgi import WSGIHandler
from django.db import connection
from django.test import Client, RequestFactory

from experiments.models import Study, System
from experiments.tasks import _failing, _reporter
from experiments.views import subject_path

from ..experiments.factories import make_study, make_subject

pytestmark = pytest.mark.django_db(transaction=True)
postgresql = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="drops a connection the way PostgreSQL does"
)


def drop(conn):
    """End `conn`'s server process from another connection, as a PostgreSQL restart does."""
    import psycopg

    conn.ensure_connection()
    pid = conn.connection.info.backend_pid
    s = conn.settings_dict
    with psycopg.connect(
        host=s["HOST"], port=s["PORT"] or 5432, user=s["USER"], dbname=s["NAME"], autocommit=True
    ) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])


def served(path: str) -> tuple[int, dict]:
    """GET `path` through Django's WSGI handler in this thread, as a server's thread would:
    unlike the test client's, its requests check the kept connection first."""
    environ = RequestFactory()._base_environ(PATH_INFO=path, REQUEST_METHOD="GET")
    started = {}

    def start_response(status, headers):
        started.update(status=int(status.split()[0]), headers=dict(headers))

    body = WSGIHandler()(environ, start_response)
    b"".join(body)
    body.close()  # request_finished: the connection is kept, as between two requests
    return started["status"], started["headers"]


@postgresql
def test_a_kept_connection_the_database_dropped_is_not_a_participants_error():
    subject = make_subject(make_study(per_type=1))
    assert connection.settings_dict["CONN_MAX_AGE"] > 0  # kept between requests
    assert served(subject_path(subject))[0] == 200
    drop(connection)
    assert served(subject_path(subject))[0] == 200


@contextmanager
def database_out_of_reach():
    """Point the connection where no database answers (a stopped server, a lost disk)."""
    saved = dict(connection.settings_dict)
    connection.close()
    if connection.vendor == "postgresql":
        connection.settings_dict["PORT"] = 1  # nothing listens there
    else:
        connection.settings_dict["NAME"] = "/nonexistent/folder/db.sqlite3"
    try:
        yield
    finally:
        connection.close()
        connection.settings_dict.update(saved)


def test_a_database_out_of_reach_gets_a_page_that_tries_again_by_itself():
    subject = make_subject(make_study(per_type=1, language="de"))
    path = subject_path(subject)
    with database_out_of_reach():
        response = Client().get(path)
        answer = Client().post(path, {"choice": "a", "position": 1}, HTTP_ACCEPT="application/json")
    assert response.status_code == 503 and response["Retry-After"] == "10"
    html = response.content.decode()
    assert '<meta http-equiv="refresh" content="10">' in html
    assert "Back in a moment" in html  # no study known: the site's language
    assert answer.status_code == 503  # the page's script sends it again
    assert Client().get(path).status_code == 200  # back


def preparing_study():
    study = make_study(per_type=1, status=Study.Status.PREPARING)
    Study.objects.filter(pk=study.pk).update(preparation=1)
    system = System.objects.get(studies=study)
    return Study.objects.get(pk=study.pk), system


@postgresql
def test_a_training_goes_on_when_the_database_drops_its_connection():
    """A progress note written after PostgreSQL restarted: it ended the training, and the
    study stayed preparing for ever."""
    study, system = preparing_study()
    report = _reporter(system, study.pk, (0, 2), preparation=1)
    report(0.1, "epoch 1")
    drop(connection)
    report(0.2, "epoch 2")
    assert Study.objects.values_list("progress", "message").get(pk=study.pk) == (
        0.1,
        "vmnet: epoch 2",
    )
    assert System.objects.get(pk=system.pk).message == "epoch 2"


@postgresql
def test_a_step_that_fails_after_the_database_dropped_its_connection_says_so():
    study, system = preparing_study()
    with pytest.raises(ValueError, match="no ready test pairs"), _failing(system, study.pk, 1):
        drop(connection)
        raise ValueError("no ready test pairs")
    assert Study.objects.get(pk=study.pk).status == Study.Status.FAILED
    assert System.objects.get(pk=system.pk).message == "vmnet: no ready test pairs"


def test_a_full_disk_is_named_in_a_failed_steps_message():
    study, system = preparing_study()
    with pytest.raises(RuntimeError), _failing(system, study.pk, 1):
        try:
            raise OSError(28, "No space left on device")
        except OSError as error:  # as torch's writer reports it
            raise RuntimeError("[enforce fail at inline_container.cc:672]") from error
    message = Study.objects.get(pk=study.pk).message
    assert message.startswith("vmnet: no space left on the disk of MEDIA_ROOT")
