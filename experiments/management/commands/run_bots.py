"""`manage.py run_bots STUDY --subjects N [--strategy …] [--base-url URL]`: test a study.

Bots take the study through its real participant pages over HTTP (see experiments/bots.py).
Without --base-url the command serves the site itself on a free local port for the run.
"""

import threading
from contextlib import contextmanager

from django.core.management.base import BaseCommand, CommandError

from analysis.load import responses_frame
from analysis.preference import preference_table
from experiments.bots import STRATEGIES, BotError, run_bots
from experiments.management import study_named
from experiments.models import Study


class Command(BaseCommand):
    help = "Simulated participants answer a study through its real pages (HTTP)."

    def add_arguments(self, parser):
        parser.add_argument("study", help="the study's slug or id (it must be open)")
        parser.add_argument("--subjects", type=int, default=1, help="how many bots (default 1)")
        parser.add_argument("--strategy", choices=STRATEGIES, default="random")
        parser.add_argument(
            "--base-url", help="the running site, e.g. http://127.0.0.1:8000 (default: serve here)"
        )
        parser.add_argument("--seed", type=int, help="seed of the bots' choices")

    def handle(self, *args, **o):
        study = study_named(o["study"])
        if study.status != Study.Status.OPEN:
            raise CommandError(f"{study.slug} is {study.status}: open it first (bots join it).")
        if o["subjects"] < 1:
            raise CommandError("--subjects must be at least 1")
        with _site(o["base_url"]) as base_url:
            try:
                runs = run_bots(study, base_url, o["subjects"], o["strategy"], seed=o["seed"])
            except BotError as error:
                raise CommandError(str(error)) from error
        for run in runs:
            self.stdout.write(
                f"#{run.subject.ordinal} {run.subject.external_id}: {run.answers} answers, "
                f"{run.outcome or 'unfinished'}" + (f", code {run.code}" if run.code else "")
            )
        frame = responses_frame(study)
        if not frame.empty:
            self.stdout.write("\nPreference (% choosing the first-named kind), completed subjects:")
            self.stdout.write(preference_table(frame).round(1).to_string())


@contextmanager
def _site(base_url: str | None):
    """The given site, or this project served on a free local port while the block runs."""
    if base_url:
        yield base_url
        return
    from django.contrib.staticfiles.handlers import StaticFilesHandler
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
    from django.core.wsgi import get_wsgi_application

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadedWSGIServer(("127.0.0.1", 0), Quiet)
    server.set_app(StaticFilesHandler(get_wsgi_application()))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
