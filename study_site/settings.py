"""Settings from environment variables, with embedded defaults that work on a bare machine.

VAR_DIR        default: ./var; by default it holds the SQLite database, the media and the
               secret key (so every study and answer), and the demo's files
DATABASE_URL   default: SQLite at $VAR_DIR/db.sqlite3 (postgres://… for PostgreSQL)
DB_CONN_MAX_AGE  seconds a database connection is kept for reuse; default 60
DB_PREPARED_STATEMENTS  PostgreSQL: "1" (default) binds parameters on the server and prepares
               repeated statements; "0" behind a connection pooler in transaction mode
REDIS_URL      default: redis://localhost:6379/0 (Celery broker and result backend)
MEDIA_ROOT     default: $VAR_DIR/media
SECRET_KEY     default: generated once and kept in $VAR_DIR/secret_key
DEBUG          default: on, unless DJANGO_ENV=production
ALLOWED_HOSTS  comma-separated; default: localhost names (any host in DEBUG)
CSRF_TRUSTED_ORIGINS  comma-separated origins (https://…) trusted for POSTs; default: none
DJANGO_ENV     "production" turns on the hardened settings that pass `check --deploy`
SECURE_SSL_REDIRECT  production only: redirect HTTP to HTTPS; default on
SECURE_HSTS_SECONDS  production only: the HSTS max-age; default 31536000 (a year)
LOG_LEVEL      the root logger's level; default WARNING
CELERY_ALWAYS_EAGER  "1" runs tasks in-process (the demo's fallback when no Redis can be had)
CELERY_VISIBILITY_TIMEOUT  seconds after which Redis hands out again a task whose worker died
               (the task runs again from its start); default 7200, longer than the longest task
ADMIN_UPLOAD_MAX_BYTES  the largest admin upload (a collection's files together, or a results
               file); default 200 MiB; larger ones go through the commands
PARTICIPANT_FRAME_ANCESTORS  origins (space- or comma-separated) that may show participant
               pages in a frame; default: MTurk's worker sites; "" for none
TRUSTED_PROXY_COUNT  how many reverse proxies of our own stand before the site, each adding
               the address it was reached from to X-Forwarded-For; the login lockout and the
               join link's limit count per client address, the one the outermost of them saw;
               default 0: the connection's own address (REMOTE_ADDR), and X-Forwarded-For is
               ignored
JOIN_UNSTARTED_PER_ADDRESS  how many subjects one client address may make through a study's
               join link that have not started (consented) within 30 minutes; more are asked
               to wait a minute (429); default 10; 0: no limit
AXES_FAILURE_LIMIT  failed logins from one client address that lock it out for an hour;
               default 5
"""

import os
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in {"1", "true", "yes", "on"}


def _secret_key() -> str:
    if key := os.environ.get("SECRET_KEY"):
        return key
    path = VAR_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


PRODUCTION = os.environ.get("DJANGO_ENV", "").lower() == "production"
SECRET_KEY = _secret_key()
DEBUG = _flag("DEBUG", not PRODUCTION)
ALLOWED_HOSTS = [h for h in os.environ.get("ALLOWED_HOSTS", "").split(",") if h] or (
    ["*"] if DEBUG else ["localhost", "127.0.0.1", "[::1]"]
)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "axes",
    "experiments",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",
    # Inside XFrameOptionsMiddleware: exempts the participant pages MTurk may frame.
    "study_site.middleware.ContentSecurityPolicyMiddleware",
    "study_site.middleware.DatabaseUnavailableMiddleware",
]
ADMIN_URL_PREFIX = "admin/"

ROOT_URLCONF = "study_site.urls"
WSGI_APPLICATION = "study_site.wsgi.application"
ASGI_APPLICATION = "study_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}"),
        conn_max_age=int(os.environ.get("DB_CONN_MAX_AGE", "60")),
        # A kept connection is checked before a request reuses it: after PostgreSQL restarted,
        # each thread's old connection would otherwise fail one request with a 500.
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL and a busy timeout let the web server and a worker write the same file.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
    }
    # A file, not memory, so that a Celery worker started by the tests sees the test data.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test_db.sqlite3")}
elif os.environ.get("DB_PREPARED_STATEMENTS", "1") == "1":
    # A participant's page or answer runs the same few statements: prepared once per
    # connection, PostgreSQL plans them once (planning took more CPU than running them).
    DATABASES["default"]["OPTIONS"] = {"server_side_binding": True, "prepare_threshold": 2}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = int(os.environ.get("AXES_FAILURE_LIMIT", "5"))
AXES_COOLOFF_TIME = 1  # hours
AXES_RESET_ON_SUCCESS = True
# Failures count per client address, whatever the username: one address gets AXES_FAILURE_LIMIT
# guesses an hour in all, and locks out nobody elsewhere. Per username and address together
# would lock out nobody elsewhere either, but give one address that many guesses for each
# username; per username alone would let anyone lock any named researcher out.
AXES_LOCKOUT_PARAMETERS = ["ip_address"]
TRUSTED_PROXY_COUNT = int(os.environ.get("TRUSTED_PROXY_COUNT", "0"))
if TRUSTED_PROXY_COUNT < 0:
    raise ImproperlyConfigured("TRUSTED_PROXY_COUNT is the number of proxies: 0 or more")
AXES_CLIENT_IP_CALLABLE = "study_site.client.client_address"
JOIN_UNSTARTED_PER_ADDRESS = int(os.environ.get("JOIN_UNSTARTED_PER_ADDRESS", "10"))
if JOIN_UNSTARTED_PER_ADDRESS < 0:
    raise ImproperlyConfigured(
        "JOIN_UNSTARTED_PER_ADDRESS is a number of subjects: 0 (no limit) or more"
    )

LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("de", "Deutsch")]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"
MEDIA_URL = "media/"
MEDIA_ROOT = Path(os.environ.get("MEDIA_ROOT", VAR_DIR / "media"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "whitenoise.storage.CompressedManifestStaticFilesStorage"
            if PRODUCTION
            else "django.contrib.staticfiles.storage.StaticFilesStorage"
        )
    },
}
DATA_UPLOAD_MAX_MEMORY_SIZE = 2_621_440
FILE_UPLOAD_MAX_MEMORY_SIZE = 2_621_440
ADMIN_UPLOAD_MAX_BYTES = int(os.environ.get("ADMIN_UPLOAD_MAX_BYTES", str(200 * 1024 * 1024)))

# Celery: JSON only, late acks so a task whose worker dies runs again elsewhere.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Longer than the longest task (training on a large collection), so a slow task is not
# redelivered while it still runs; a task whose worker died is redelivered after this.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": int(os.environ.get("CELERY_VISIBILITY_TIMEOUT", "7200"))
}
CELERY_TASK_DEFAULT_QUEUE = "default"
# A preparation's next step is sent by the worker as a step ends: with Redis restarting just
# then, Celery's default (3 tries within a second) lost it and the preparation stalled. Tried
# for ~40 s instead; web requests check that Redis answers before they send anything.
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 12, "interval_start": 0.5, "interval_step": 0.5, "interval_max": 5,
}  # fmt: skip
# Engine work on the accelerator's workers: training, search and a pair's features (CNN).
CELERY_TASK_ROUTES = {
    "experiments.tasks.gpu_*": {"queue": "gpu"},
    "experiments.tasks.import_pair": {"queue": "gpu"},
}
CELERY_TASK_ALWAYS_EAGER = _flag("CELERY_ALWAYS_EAGER", False)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_RESULT_EXPIRES = 24 * 3600

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "WARNING")},
}

SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# MTurk's ExternalQuestion shows the study in a frame on MTurk's sites (worker, sandbox and the
# classic www site, where turkSubmitTo points). Only participant pages (/s/…, /join/…) may be
# framed, by these origins only (CSP frame-ancestors); everything else keeps DENY.
PARTICIPANT_FRAME_ANCESTORS = (
    os.environ.get(
        "PARTICIPANT_FRAME_ANCESTORS",
        "https://worker.mturk.com https://workersandbox.mturk.com https://www.mturk.com",
    )
    .replace(",", " ")
    .split()
)
if any(";" in origin or "'" in origin for origin in PARTICIPANT_FRAME_ANCESTORS):
    raise ImproperlyConfigured(
        "PARTICIPANT_FRAME_ANCESTORS takes origins such as https://worker.mturk.com"
    )
CSRF_FAILURE_VIEW = "experiments.errors.csrf_failure"  # "please allow cookies", translated
if PRODUCTION:
    SECURE_SSL_REDIRECT = _flag("SECURE_SSL_REDIRECT", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS", "31536000"))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    # A local trial without TLS (SECURE_SSL_REDIRECT=0): a browser drops secure cookies
    # over plain HTTP anywhere but localhost, and the admin's login with them.
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = SECURE_SSL_REDIRECT
    if not SECURE_SSL_REDIRECT:  # chosen: `check --deploy` need not fail `make serve` for it
        SILENCED_SYSTEM_CHECKS = ["security.W008", "security.W012", "security.W016"]
    # Participant pages need no cookie (their link's token is the credential), so MTurk's
    # frame, where this site is third-party, needs none sent cross-site: both stay Lax.
    CSRF_COOKIE_SAMESITE = "Lax"
    SESSION_COOKIE_SAMESITE = "Lax"
CSRF_TRUSTED_ORIGINS = [o for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o]
