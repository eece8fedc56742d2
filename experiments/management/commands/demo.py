"""`python manage.py demo`: prepare a real study end to end and serve it.

Generates the engine's synthetic corpus of music videos, imports it, trains VM-NET and a CCA
baseline through the Celery worker, prepares a study, creates an admin user and 3 subjects,
then serves the site and the worker until Ctrl-C. A second run reuses what is prepared.
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from experiments.models import Collection, Pair, Split, Study, StudySystem, System
from study_site.celery import app, redis_answers

DEMO = "demo"
AFRESH = "`manage.py demo --fresh` starts it afresh"


class Command(BaseCommand):
    help = "Prepare the demo study (corpus, import, training, study, subjects) and serve it."

    def add_arguments(self, parser):
        parser.add_argument("--no-serve", action="store_true", help="Prepare, print, and exit.")
        parser.add_argument(
            "--fresh",
            action="store_true",
            help="Delete the demo's study and collection first, to start it afresh (with other "
            "sizes); their media files stay under MEDIA_ROOT.",
        )
        parser.add_argument(
            "--pairs", type=int, default=400, help="Music videos to generate (default: 400)."
        )
        parser.add_argument(
            "--test",
            type=int,
            default=120,
            help="Of which held out (default: 120): a block needs 3 x per-type queries; the more "
            "held out, the fewer items a subject meets twice (docs/guarantees.md).",
        )
        parser.add_argument(
            "--per-type",
            type=int,
            default=20,
            help="Questions per comparison (G-R, G-S, S-R) and direction (default: 20); 6 x this "
            "per subject.",
        )
        parser.add_argument(
            "--subjects",
            type=int,
            default=3,
            help="Subjects whose links are printed, made if the demo has fewer (default: 3).",
        )
        parser.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1)")
        parser.add_argument("--port", type=int, default=8000, help="(default: 8000)")

    def handle(self, *args, **opts):
        started = time.monotonic()
        # What would fail after minutes of preparation fails now.
        if not opts["no_serve"]:
            _check_port(opts["host"], opts["port"])
        call_command("migrate", "--noinput", verbosity=0)  # a fresh machine has no tables
        if opts["fresh"] or not Collection.objects.filter(name=DEMO).exists():
            _check_sizes(opts)  # the sizes of a new demo (an earlier one keeps its own)
        self.children: list[subprocess.Popen] = []
        # `kill` stops the worker and the web server too, as Ctrl-C does.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            self.redis_url = self._ensure_redis()
            if self.redis_url:
                self._start_worker()
            self._prepare(opts)
            self._report(opts, time.monotonic() - started)
            if not opts["no_serve"]:
                self._serve(opts)
        except KeyboardInterrupt:
            self.stdout.write("\nStopping.")
        finally:
            self._stop_children()

    # --- services -------------------------------------------------------------------------

    def _ensure_redis(self) -> str | None:
        """Use the configured Redis; else start a local redis-server; else run tasks in-process."""
        url = settings.CELERY_BROKER_URL
        if redis_answers(url):
            self.stdout.write(f"Redis: using {url}")
            return url
        binary = shutil.which("redis-server")
        parsed = urlparse(url)
        local = parsed.hostname in {"localhost", "127.0.0.1", "::1"}
        if not local:
            why = f"REDIS_URL names {parsed.hostname}: a redis-server is started only here"
        else:
            why = "install it with `apt-get install redis-server`, or set REDIS_URL"
        if binary and local:
            port = parsed.port or 6379
            log = Path(settings.VAR_DIR) / "redis.log"
            server = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(settings.VAR_DIR)],
                stdout=log.open("w"), stderr=subprocess.STDOUT,
            )  # fmt: skip
            self.children.append(server)
            for _ in range(100):
                if redis_answers(url):
                    self.stdout.write(
                        f"Redis: none was running; started redis-server on port {port}"
                    )
                    return url
                if server.poll() is not None:  # it ended: its log says why (a port taken…)
                    break
                time.sleep(0.1)
            # Its last lines, less the pid and time stamp: "… bind: Address already in use",
            # "Failed listening on port 6379 (TCP), aborting."
            said = [line.split(" # ", 1)[-1] for line in log.read_text().splitlines()[-2:]]
            why = f"redis-server on port {port} did not start: {' '.join(said) or 'no output'} (all of it: {log})"
        self.stdout.write(
            self.style.WARNING(
                f"Redis: nothing answers at {url} and no redis-server could be started ({why}). "
                "Tasks run in-process instead of on a Celery worker."
            )
        )
        app.conf.task_always_eager = True
        os.environ["CELERY_ALWAYS_EAGER"] = "1"
        return None

    def _start_worker(self):
        log = Path(settings.VAR_DIR) / "worker.log"
        self.children.append(
            subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "study_site", "worker", "-Q", "default,gpu",
                 "--concurrency", str(os.cpu_count() or 1), "-l", "info", "-n", "demo@%h"],
                cwd=settings.BASE_DIR, stdout=log.open("a"), stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        from celery.exceptions import TimeoutError as CeleryTimeout

        from study_site.celery import ping

        try:
            ping.delay("demo").get(timeout=120)
        except CeleryTimeout:
            raise CommandError(f"the Celery worker did not answer in 120 s; see {log}") from None
        self.stdout.write(f"Celery worker: queues default,gpu (log: {log})")

    def _stop_children(self):
        for child in reversed(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()

    # --- preparation ----------------------------------------------------------------------

    def _prepare(self, opts):
        from engine.corpus import DEMO_FEATURES, DEMO_VMNET_CONFIG, make_demo_corpus

        if opts["fresh"]:
            self._delete_demo()
        # First: a demo whose preparation fails still leaves a login to look at it with.
        self.password = self._admin_password()
        corpus = Path(settings.VAR_DIR) / "demo" / "corpus"
        collection = Collection.objects.filter(name=DEMO).first()
        # An earlier demo's collection keeps its size (an import stopped halfway included).
        pairs = collection.pairs.exclude(split=Split.CATCH) if collection else None
        total = pairs.count() if collection else opts["pairs"]
        ready = pairs.filter(status=Pair.Status.READY).count() if collection else 0
        if ready < total:  # new, or an import that was stopped: it resumes
            if len(list(corpus.glob("*.mp4"))) != total:  # the folder is imported whole
                shutil.rmtree(corpus, ignore_errors=True)
                self.stdout.write(
                    f"Generating {total} synthetic music videos in {corpus} (on this machine's "
                    "cores; a few minutes for 400)"
                )
                # 8 s clips: enough to judge a match, and the demo stays within minutes.
                make_demo_corpus(corpus, total, seed=0, duration=8.0)
            # The synthetic clips are 160x120: a 112-px CNN input loses nothing and is 7x faster.
            call_command(
                "import_collection", DEMO, str(corpus), "--test", str(opts["test"]),
                "--frame-size", "112",
            )  # fmt: skip
            collection = Collection.objects.get(name=DEMO)

        # Settings for a few hundred pairs, the same as bench/corpus_learnability.py's; CCA
        # sees the same features.
        vmnet, _ = System.objects.get_or_create(
            collection=collection,
            name="VM-NET",
            defaults={"kind": System.Kind.VMNET, "config": DEMO_VMNET_CONFIG},
        )
        System.objects.get_or_create(
            collection=collection,
            name="CCA",
            defaults={"kind": System.Kind.CCA, "config": DEMO_FEATURES},
        )
        study, created = Study.objects.get_or_create(
            slug=DEMO,
            defaults={
                "name": "Demo: which music suits this video?",
                "collection": collection,
                "per_type": opts["per_type"],
                "instructions": (
                    "You will see a video or hear a piece of music, then two candidates. "
                    "Pick the candidate that suits it better. There are no right answers."
                ),
                "completion_code": "DEMO-DONE",
            },
        )
        if created:
            StudySystem.objects.create(study=study, system=vmnet, label="S")
        n_test = collection.pairs.filter(split=Split.TEST).count()
        sizes = (total, n_test, study.per_type)
        if sizes != (opts["pairs"], opts["test"], opts["per_type"]) and not created:
            self.stdout.write(
                self.style.WARNING(
                    f"The demo was set up with {total} pairs, {n_test} test pairs and "
                    f"{study.per_type} questions per type; --pairs, --test and --per-type apply "
                    f"to a new demo ({AFRESH})."
                )
            )
        if study.status in {Study.Status.DRAFT, Study.Status.FAILED, Study.Status.PREPARING}:
            try:
                call_command("prepare_study", DEMO, "--wait")
            except CommandError as error:
                raise CommandError(f"{error} ({AFRESH})") from None
            study.refresh_from_db()
        if study.status == Study.Status.FAILED:
            raise CommandError(f"study preparation failed: {study.message} ({AFRESH})")
        baseline = System.objects.get(collection=collection, name="CCA")
        if baseline.status != System.Status.READY:
            from experiments.tasks import gpu_train_system

            self.stdout.write("Training the CCA baseline")
            gpu_train_system.delay(baseline.id).get(timeout=600)
        if study.status == Study.Status.READY:
            study.status = Study.Status.OPEN
            study.save(update_fields=["status"])

        from experiments.subjects import create_subjects

        missing = opts["subjects"] - study.subjects.count()
        if missing > 0:
            create_subjects(study, missing)
        self.study = study

    def _delete_demo(self):
        """The demo's study (its subjects and answers) and collection (pairs, systems)."""
        studies, _ = Study.objects.filter(slug=DEMO).delete()
        collections, _ = Collection.objects.filter(name=DEMO).delete()
        if studies or collections:
            self.stdout.write("Deleted the earlier demo's study and collection")

    def _admin_password(self) -> str | None:
        path = Path(settings.VAR_DIR) / "demo" / "admin-password"
        User = get_user_model()
        if User.objects.filter(username="admin").exists():
            # Made by an earlier demo, or someone's own: a password is never reset.
            return path.read_text().strip() if path.exists() else None
        password = secrets.token_urlsafe(12)
        user, _ = User.objects.get_or_create(
            username="admin", defaults={"email": "admin@localhost"}
        )
        user.is_staff = user.is_superuser = True
        user.set_password(password)
        user.save()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(password)
        path.chmod(0o600)
        return password

    def _report(self, opts, seconds):
        from experiments.subjects import subject_url

        base = f"http://{opts['host']}:{opts['port']}"
        study = self.study
        out = self.stdout.write
        out("")
        out(self.style.SUCCESS(f"Demo ready in {seconds:.0f} s."))
        password = self.password or "(your own: this user was not made by the demo)"
        out(f"Admin:    {base}/admin/   user: admin   password: {password}")
        out("Participant links:")
        for subject in study.subjects.order_by("ordinal")[: opts["subjects"]]:
            out(f"  {subject_url(subject, base)}")
        out("")
        out("Retrieval on the held-out test pairs (Recall@K, %):")
        out(f"  {'system':<10} {'dir':<4} {'R@1':>6} {'R@10':>6} {'R@25':>6}")
        chance = None
        for system in System.objects.filter(collection=study.collection).order_by("id"):
            test = system.metrics.get("test", {})
            chance = test.get("chance", chance)
            for direction in ("V2M", "M2V"):
                out(f"  {system.name:<10} {direction:<4} {_recall_cells(test.get(direction, {}))}")
        if chance:
            out(f"  {'chance':<10} {'':<4} {_recall_cells(chance)}")
        out("")

    def _serve(self, opts):
        addr = f"{opts['host']}:{opts['port']}"
        self.children.append(
            subprocess.Popen(
                [sys.executable, "manage.py", "runserver", addr, "--noreload"],
                cwd=settings.BASE_DIR,
            )
        )
        self.stdout.write(f"Web: http://{addr}/  (Ctrl-C stops the web server and the worker)")
        while all(child.poll() is None for child in self.children):
            time.sleep(0.5)
        if self.children[-1].poll() is not None:
            raise CommandError("the web server stopped unexpectedly (its output is above)")
        log = Path(settings.VAR_DIR) / "worker.log"
        raise CommandError(f"the Celery worker or Redis stopped unexpectedly; see {log}")


def _check_sizes(opts) -> None:
    """The sizes a study can be prepared from, checked before minutes of generating and
    importing: each block asks G-R, G-S and S-R `per_type` times, each with its own test
    query, and training needs pairs beside the test ones."""
    pairs, test, per_type = opts["pairs"], opts["test"], opts["per_type"]
    if per_type < 1 or opts["subjects"] < 0:
        raise CommandError("--per-type must be at least 1 and --subjects 0 or more")
    if test < 3 * per_type:
        raise CommandError(
            f"--test {test} is too few for --per-type {per_type}: a block asks 3 x {per_type} "
            f"questions, each with a test pair of its own (at least --test {3 * per_type})"
        )
    if pairs < test + 10:
        raise CommandError(
            f"--pairs {pairs} leaves too few for training beside --test {test} "
            f"(at least --pairs {test + 10})"
        )


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as runserver binds
        try:
            probe.bind((host, port))
        except OSError as error:
            raise CommandError(
                f"cannot serve on {host}:{port} ({error.strerror}): pass another --port, or "
                "--no-serve"
            ) from None


def _recall_cells(recall: dict) -> str:
    return " ".join(
        f"{100 * recall[f'R@{k}']:6.1f}" if f"R@{k}" in recall else f"{'n/a':>6}"
        for k in (1, 10, 25)
    )


def _interrupt(*_):
    """SIGTERM as Ctrl-C (even where SIGINT is ignored, as for `demo &` in a script)."""
    raise KeyboardInterrupt
