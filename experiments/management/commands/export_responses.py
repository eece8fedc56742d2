"""`manage.py export_responses STUDY`: one row per answer, as CSV or JSON.

`--anonymise` replaces subject tokens and external ids with stable pseudonyms; `--dictionary`
writes the data dictionary (one row per column with its meaning) instead of the answers.
"""

import csv
import json
from pathlib import Path

from django.core.management.base import BaseCommand

from experiments.export import column_names, dictionary_rows, response_rows, spreadsheet_safe
from experiments.management import check_output, output_file, study_named


class Command(BaseCommand):
    help = "Export a study's answers, one row per answer (columns: experiments/export.py)."

    def add_arguments(self, parser):
        parser.add_argument("study", help="the study's slug or id")
        parser.add_argument("--format", choices=["csv", "json"], default="csv")
        parser.add_argument("--output", type=Path, help="a file (default: standard output)")
        parser.add_argument(
            "--anonymise", action="store_true", help="pseudonyms instead of tokens and ids"
        )
        parser.add_argument(
            "--dictionary", action="store_true", help="the columns and their meanings"
        )

    def handle(self, *args, **o):
        study = study_named(o["study"])
        if o["output"]:
            check_output(o["output"], "--output")
        if o["dictionary"]:
            rows, what, columns = dictionary_rows(study), "columns", ["column", "meaning"]
        else:
            rows = response_rows(study, anonymise=o["anonymise"])
            what, columns = "answers", column_names(study)
        if o["output"]:
            with output_file(o["output"], "--output") as out:
                n = write(rows, o["format"], out, columns)
            self.stderr.write(f"{n} {what} written to {o['output']}")
        else:
            write(rows, o["format"], self.stdout, columns)


def write(rows, fmt: str, out, columns: list[str]) -> int:
    """JSON: a list of the rows, one a line; CSV: the header of `columns` (even without rows),
    then the rows. Written as they come (a big study's answers held 1.2 GB as one JSON
    string); the number of rows written."""
    n = 0
    if fmt == "json":
        out.write("[")
        for n, row in enumerate(rows, start=1):
            out.write(("\n" if n == 1 else ",\n") + json.dumps(row))
        out.write("\n]\n" if n else "]\n")
        return n
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: spreadsheet_safe(v) for k, v in row.items()})
        n += 1
    return n
