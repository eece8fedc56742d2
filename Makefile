# Two commands set everything up: `make demo` and `make test` (see README.md).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist workers; the suite's slow end-to-end checks run in parallel with the rest.
TEST_WORKERS ?= 3

.PHONY: install demo test lint format serve worker system-deps device-bundle clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch is pinned to the build on this machine's disk; install it first so pip never
	# reaches for a newer multi-gigabyte release.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) manage.py demo

# Debian packages the tests use: Chromium (browser tests) and real songs (feature parity).
SYSTEM_PACKAGES := chromium fretsonfire-songs-sectoid
system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "not installed: $$missing (tests that need them are skipped; sudo apt-get install $$missing)"; fi; \
	fi

test: install system-deps
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The production server: gunicorn (study_site/gunicorn.conf.py: BIND, default 127.0.0.1:8000;
# WEB_CONCURRENCY, default one worker per core; WEB_THREADS, default 6 threads each) with
# whitenoise serving the static files. Production settings (HSTS, secure cookies, HTTPS
# redirect) expect a TLS proxy that sets X-Forwarded-Proto.
serve: export DJANGO_ENV ?= production
serve: export ACCESS_LOG ?= -
serve: install
	$(PY) manage.py check --deploy --fail-level WARNING
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput -v0
	$(VENV)/bin/gunicorn -c study_site/gunicorn.conf.py study_site.wsgi

worker: install
	$(VENV)/bin/celery -A study_site worker -Q default,gpu --concurrency 1 -l info

# What a bare GPU host needs for bench/device_check.sh (bench/README.md): wheels and songs.
device-bundle: install system-deps
	$(PY) bench/device_bundle.py

clean:
	rm -rf $(VENV) var .whl
