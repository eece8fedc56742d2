"""gunicorn settings: `gunicorn -c study_site/gunicorn.conf.py study_site.wsgi` (`make serve`).

BIND             default 127.0.0.1:8000 (put a TLS proxy in front; it sets X-Forwarded-Proto)
WEB_CONCURRENCY  worker processes; default 2 × cores + 1
WEB_THREADS      threads per worker; default 1 (sync workers); more: gthread workers
ACCESS_LOG       a path, or "-" for standard output; default: none
"""

import multiprocessing
import os

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", 2 * multiprocessing.cpu_count() + 1))
threads = int(os.environ.get("WEB_THREADS", "1"))
# Sync workers: a request is a few short queries; the database, not I/O, bounds throughput.
worker_class = "gthread" if threads > 1 else "sync"
keepalive = 5  # gthread: a browser's next request (the redirect's GET) reuses its connection
# Import Django (and the analysis stack the admin loads) once, then fork: faster (re)starts.
preload_app = True
timeout = 60
graceful_timeout = 20
accesslog = os.environ.get("ACCESS_LOG") or None
