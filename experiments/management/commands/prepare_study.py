"""`manage.py prepare_study STUDY [--wait]`: train and search its systems on the workers
(or in this process, without a broker)."""

import threading
import time
from textwrap import shorten

from django.core.management.base import BaseCommand, CommandError
from django.db import connections
from kombu.exceptions import OperationalError
from tqdm import tqdm

from experiments.management import bar_interval, study_named
from experiments.models import Study
from experiments.tasks import celery_problem, queue_preparation
from study_site.celery import app

FINAL = (Study.Status.READY, Study.Status.FAILED)


class Command(BaseCommand):
    help = (
        "Queue the study's preparation (train what is not trained, store search results, "
        "check that plans can be built); with --wait, follow its progress until it ends. "
        "Without a broker (CELERY_ALWAYS_EAGER=1) the work runs in this process, its progress "
        "shown."
    )

    def add_arguments(self, parser):
        parser.add_argument("study", help="the study's slug or id")
        parser.add_argument("--wait", action="store_true", help="wait until ready or failed")
        parser.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to wait")

    def handle(self, *args, **o):
        study = study_named(o["study"])
        if study.status in (Study.Status.OPEN, Study.Status.CLOSED):
            raise CommandError(f"{study.slug} is {study.status}: its subjects' plans are fixed.")
        if app.conf.task_always_eager:  # no broker (CELERY_ALWAYS_EAGER): the work runs here
            study = self.prepare_here(study, o["timeout"], show=o["verbosity"] >= 1)
        else:
            # Without --wait only the broker must be there: a worker may start later.
            if problem := celery_problem(["default", "gpu"] if o["wait"] else []):
                raise CommandError(f"{problem}.")
            try:
                self.queue(study)
            except OperationalError as error:  # the broker went away since the check
                raise CommandError(f"Cannot queue the preparation: {error}") from None
            if not o["wait"]:
                self.stdout.write(f"{study.slug}: preparation queued")
                return
            study = self.follow(study, o["timeout"], show=o["verbosity"] >= 1)
        if study.status == Study.Status.FAILED:
            raise CommandError(f"{study.slug}: preparation failed: {study.message}")
        self.stdout.write(f"{study.slug}: {study.message}")  # "Ready: N questions per subject"

    def queue(self, study):
        if not queue_preparation(study):
            study.refresh_from_db(fields=["status"])
            why = (
                "its preparation is at work (one lost with its worker: back to draft first)"
                if study.status == Study.Status.PREPARING
                else "its subjects' plans are fixed"
            )
            raise CommandError(f"{study.slug} is {study.status}: {why}.")

    def prepare_here(self, study, timeout, show):
        """The preparation in a thread of this process, followed as a worker's would be (the
        tasks run one after the other in that thread and write their progress as usual)."""
        errors = []

        def work():
            try:
                self.queue(study)  # eager: the work runs here, in this thread
            except Exception as error:  # a failed step has marked the study; this is the rest
                errors.append(error)
            finally:
                connections.close_all()  # this thread's own connection

        thread = threading.Thread(target=work, name="prepare_study", daemon=True)
        thread.start()
        try:
            study = self.follow(study, timeout, show, running=thread.is_alive)
        except (CommandError, KeyboardInterrupt):  # the work ends with this process
            Study.objects.filter(pk=study.pk, status=Study.Status.PREPARING).update(
                status=Study.Status.FAILED,
                message="Stopped with the prepare_study command that ran it; prepare it again",
            )
            raise
        if study.status != Study.Status.FAILED and (errors or study.status not in FINAL):
            raise CommandError(f"{study.slug}: preparation stopped: {errors[0] if errors else '?'}")
        return study

    def follow(self, study, timeout, show, running=None):
        """Show the study's progress until it is ready or failed, or, given `running`, until
        that says the work has ended."""
        deadline = time.monotonic() + timeout
        interval = bar_interval(self.stderr)
        with tqdm(
            total=100, unit="%", file=self.stderr, disable=not show, mininterval=interval
        ) as bar:
            while True:
                ended = running is not None and not running()  # before the last look
                study.refresh_from_db()
                # Cut at a word, marked (the whole message is printed at the end).
                bar.set_description(shorten(study.message, 60, placeholder=" …"), refresh=False)
                bar.update(round(100 * study.progress) - bar.n)  # drawn every mininterval
                if ended or (running is None and study.status in FINAL):
                    return study
                if time.monotonic() > deadline:
                    raise CommandError(f"{study.slug}: still {study.status} after {timeout} s")
                time.sleep(0.5)
