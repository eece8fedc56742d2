"""gunicorn settings: `gunicorn -c study_site/gunicorn.conf.py study_site.wsgi` (`make serve`).

BIND             default 127.0.0.1:8000 (put a TLS proxy in front; it sets X-Forwarded-Proto)
WEB_CONCURRENCY  worker processes; default one per core
WEB_THREADS      threads per worker; default 6 (gthread workers); 1: sync workers
ACCESS_LOG       a path, or "-" for standard output; default: none
"""

import multiprocessing
import os

bind = os.environ.get("BIND", "127.0.0.1:8000")
# A request is CPU in Python and short waits on the database: one process per core keeps the
# cores busy, a few threads each cover the waits, and gthread workers keep a browser's
# connection open between its requests (one answer after another). On 2 cores shared with
# PostgreSQL and the load client (bench/load.py, 500 subjects) 2 × 6 threads spent 4.2–4.5 ms
# of CPU an answer (p99 301–570 ms), 4 × 3: 5.3 ms (p99 668 ms); sync workers, which close
# every connection, served less than half as many answers.
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count()))
threads = int(os.environ.get("WEB_THREADS", "6"))
worker_class = "gthread" if threads > 1 else "sync"
keepalive = 5  # seconds an idle connection stays open: longer than most think times
# Import Django (and the analysis stack the admin loads) once, then fork: faster (re)starts.
preload_app = True
timeout = 60
graceful_timeout = 20
accesslog = os.environ.get("ACCESS_LOG") or None
control_socket_disable = True  # unused; two sites of one user would share ~/.gunicorn's
