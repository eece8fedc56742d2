"""A worker killed with SIGKILL in the middle of preparing a study: the task runs again.

Tasks are acknowledged late (CELERY_TASK_ACKS_LATE) and rejected when their worker process is
lost (CELERY_TASK_REJECT_ON_WORKER_LOST). When the whole worker dies, nothing is left to
reject: Redis keeps the unacknowledged message and hands it out again once the broker's
visibility timeout has passed (CELERY_VISIBILITY_TIMEOUT, 2 h in production, longer than the
longest task; 5 s for the new worker here). The study must still become ready, with exactly
one set of search results and one checkpoint and embedding file for its system.

The two workers use their own Redis database, so that the session's shared worker (if
another test started it) cannot take the task in their place.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from django.conf import settings

from experiments.models import SearchResult, Study, System
from experiments.tasks import prepare_study
from study_site.celery import app
from tests.conftest import start_celery_worker, subprocess_database_url
from tests.experiments.test_tasks import make_collection, make_study

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def start_worker(broker: str, log: Path, visibility_timeout: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "REDIS_URL": broker,
        "DATABASE_URL": subprocess_database_url(),
        "MEDIA_ROOT": str(settings.MEDIA_ROOT),
        "CELERY_ALWAYS_EAGER": "0",
        "CELERY_VISIBILITY_TIMEOUT": str(visibility_timeout),
        "PYTHONUNBUFFERED": "1",
    }
    # its own process group: the kill takes the pool too
    return start_celery_worker(env, log, "crash", "--without-heartbeat", start_new_session=True)


def wait(condition, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text(errors='replace')[-3000:]}")


def test_a_worker_killed_mid_training_is_replaced_and_the_study_becomes_ready(redis_url, tmp_path):
    broker = redis_url.rsplit("/", 1)[0] + "/7"
    collection = make_collection("crash")
    # VM-NET with many short epochs: long enough to be caught in the middle.
    config = {"max_epochs": 30, "patience": 30}
    study, system = make_study(collection, config, slug="crash", kind="vmnet")
    log = Path(os.environ.get("CRASH_LOG_DIR", tmp_path)) / "workers.log"

    first = start_worker(broker, log, visibility_timeout=5)
    try:
        with app.connection_for_write(broker) as connection:
            prepare_study.apply_async((study.pk,), connection=connection)

        def training():
            system.refresh_from_db()
            return system.status == System.Status.RUNNING and system.message.startswith("epoch")

        wait(training, 180, "training to start", log)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    study.refresh_from_db()
    assert study.status == Study.Status.PREPARING  # killed half-way: not ready

    second = start_worker(broker, log, visibility_timeout=5)
    try:

        def settled():
            study.refresh_from_db()
            return study.status in (Study.Status.READY, Study.Status.FAILED)

        wait(settled, 300, "the study to be ready after the redelivery", log)
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        try:
            second.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(second.pid, signal.SIGKILL)

    assert study.status == Study.Status.READY, study.message
    system.refresh_from_db()
    assert system.status == System.Status.READY
    # Exactly one ranked list per query and direction: ranks 1..8 over the 8 test pairs.
    results = SearchResult.objects.filter(system=system)
    assert results.count() == 8 * 2 * 8
    for direction in ("V2M", "M2V"):
        for query in collection.pairs.filter(split="test"):
            ranks = results.filter(direction=direction, query=query).values_list("rank", flat=True)
            assert sorted(ranks) == list(range(1, 9))
    # One checkpoint and one embeddings file for the system: no copies from the first try.
    files = sorted(p.name for p in (Path(settings.MEDIA_ROOT) / "systems").glob(f"{system.pk}-*"))
    assert files == [f"{system.pk}-embeddings.npz", f"{system.pk}-vmnet-0.pt"]
    # The training task was received twice: by the killed worker and by its replacement.
    assert log.read_text().count("Task experiments.tasks.gpu_train_system") >= 2
