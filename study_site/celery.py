"""The Celery app: broker and results in Redis, tasks autodiscovered from Django apps.

Engine work (feature extraction, training, search) is routed to the `gpu` queue, so a GPU host
runs `celery -A study_site worker -Q gpu --concurrency 1` against the shared database and
Redis; everything else goes to `default`.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "study_site.settings")

app = Celery("study_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


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
