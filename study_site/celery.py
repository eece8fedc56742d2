"""The Celery app: broker and results in Redis, tasks autodiscovered from Django apps.

Engine work (feature extraction, training, search) is routed to the `gpu` queue, so a GPU host
runs `celery -A study_site worker -Q gpu --concurrency 1` against the shared database and
Redis; everything else goes to `default`.
"""

import logging
import os
import time

from celery import Celery
from celery.signals import worker_init, worker_process_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "study_site.settings")

app = Celery("study_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
logger = logging.getLogger(__name__)


@worker_init.connect
def _remember_pool_size(sender=None, **_):
    os.environ["STUDY_WORKER_POOL_SIZE"] = str(getattr(sender, "concurrency", None) or 1)


@worker_init.connect
def _compile_before_forking(**_):
    """Pool processes inherit the compiled music features instead of compiling them at once."""
    from engine.features.audio import warm_numba_cache

    start = time.monotonic()
    # Up to a minute on a first start; until "ready" the worker takes no task.
    logger.warning("Compiling the music features before taking tasks (a first start: ~1 min)")
    warm_numba_cache()
    logger.warning("Music features compiled in %.0f s", time.monotonic() - start)


@worker_process_init.connect
def _share_cores_among_pool_processes(**_):
    """A forked pool process inherits torch's thread pool in a state that runs training many
    times slower; give each process its own, with the cores shared among the pool."""
    import torch

    pool = int(os.environ.get("STUDY_WORKER_POOL_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // pool))


@app.task(name="study_site.ping")
def ping(value):
    """Round-trip check used by the tests and the demo to prove a worker is listening."""
    return {"pong": value, "pid": os.getpid()}


def redis_answers(url: str) -> bool:
    """Whether a Redis server answers PING at `url` within a second."""
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False
