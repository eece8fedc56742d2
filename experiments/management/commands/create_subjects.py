"""`manage.py create_subjects STUDY --count N`: new subjects with their plans; prints links."""

from django.core.management.base import BaseCommand, CommandError

from experiments.management import study_named
from experiments.plans import PlanError
from experiments.subjects import create_subjects, subject_url

LOCAL_URL = "http://localhost:8000"


class Command(BaseCommand):
    help = "Create subjects (each with its stored question plan) and print their links."

    def add_arguments(self, parser):
        parser.add_argument("study", help="the study's slug or id")
        parser.add_argument("--count", type=int, required=True)
        parser.add_argument(
            "--base-url",
            help=f"the site's address, as participants reach it (default: {LOCAL_URL})",
        )

    def handle(self, *args, **o):
        if o["count"] < 1:
            raise CommandError("--count must be at least 1")
        study = study_named(o["study"])
        try:
            subjects = create_subjects(study, o["count"])
        except PlanError as error:
            raise CommandError(f"{study.slug}: {error}") from None
        if not o["base_url"]:  # links that only work on this machine: say so, beside them
            self.stderr.write(f"Links on {LOCAL_URL}: pass --base-url with your site's address")
        for subject in subjects:
            self.stdout.write(subject_url(subject, o["base_url"] or LOCAL_URL))
