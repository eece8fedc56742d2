"""`manage.py export_responses STUDY`: one row per answer, as CSV or JSON."""

import csv
import json

from django.core.management.base import BaseCommand, CommandError

from analysis.load import get_study
from experiments.export import response_rows
from experiments.models import Study


class Command(BaseCommand):
    help = "Export a study's answers, one row per answer (columns: experiments/export.py)."

    def add_arguments(self, parser):
        parser.add_argument("study", help="the study's slug or id")
        parser.add_argument("--format", choices=["csv", "json"], default="csv")
        parser.add_argument("--output", help="a file (default: standard output)")

    def handle(self, *args, **o):
        try:
            study = get_study(o["study"])
        except Study.DoesNotExist:
            raise CommandError(f"No study with slug or id {o['study']!r}.") from None
        rows = list(response_rows(study))
        if o["output"]:
            with open(o["output"], "w", newline="", encoding="utf-8") as out:
                write(rows, o["format"], out)
            self.stderr.write(f"{len(rows)} answers written to {o['output']}")
        else:
            write(rows, o["format"], self.stdout)


def write(rows: list[dict], fmt: str, out):
    if fmt == "json":
        out.write(json.dumps(rows, indent=1) + "\n")
    elif rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
