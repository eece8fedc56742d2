"""`manage.py preference_report STUDY`: the paper's Table IV with statistics, and Fig. 7."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from analysis.export import LEFT_OUT, TEXT_FORMATS, build_report, render
from analysis.load import LEFT_OUT_OPTION, left_out, responses_frame, system_names
from analysis.plots import preference_boxplot
from analysis.preference import answers
from experiments.management import check_output, output_file, study_named


class Command(BaseCommand):
    help = (
        "Print a study's preference table (Table IV: human rows and the machine's G-R row) with "
        "per-cell tests against 50%, and optionally write the box plot (Fig. 7)."
    )

    def add_arguments(self, parser):
        parser.add_argument("study", help="the study's slug or id")
        parser.add_argument("--format", choices=TEXT_FORMATS, default="markdown")
        parser.add_argument("--plot", type=Path, help="write the box plot here (.png, .svg, .pdf)")
        parser.add_argument("--subjects-csv", type=Path, help="write per-subject preferences here")
        parser.add_argument(
            "--include-incomplete", action="store_true", help="count subjects who did not finish"
        )
        parser.add_argument(
            "--include-failed", action="store_true", help="count subjects who failed the checks"
        )
        parser.add_argument(
            "--heard-only",
            action="store_true",
            help="leave out answers given while a medium could not be loaded",
        )
        parser.add_argument(
            "--mixed", action="store_true", help="also fit the mixed-effects model per comparison"
        )

    def handle(self, *args, **options):
        study = study_named(options["study"])
        if options["plot"] and options["plot"].suffix.lower() not in (".png", ".svg", ".pdf"):
            raise CommandError("--plot must end in .png, .svg or .pdf")
        for option in ("plot", "subjects_csv"):
            if options[option]:
                check_output(options[option], "--" + option.replace("_", "-"))
        df = responses_frame(
            study,
            include_incomplete=options["include_incomplete"],
            include_failed=options["include_failed"],
        )
        counted = answers(df)
        if counted.empty:
            raise CommandError(
                f"Study '{study.slug}' has no answers to analyse: {why_none(study, options)}."
            )
        if options["mixed"]:  # seconds a comparison in a study of 1,000 subjects: say so first
            self.stderr.write(
                f"Fitting the mixed model to {counted['subject'].nunique()} subjects' "
                f"{len(counted)} answers, one comparison at a time"
            )
        report = build_report(
            df, title=study.name, mixed=options["mixed"], systems=system_names(study),
            left_out=left_out(study, options["include_incomplete"], options["include_failed"]),
            heard_only=options["heard_only"],
        )  # fmt: skip
        self.stdout.write(render(report, options["format"]), ending="")
        # Notes go to stderr, so that stdout stays a clean CSV / JSON document.
        if options["plot"]:
            plot = options["plot"]
            with output_file(plot, "--plot", binary=True) as out:
                preference_boxplot(
                    report.responses, out, title=study.name, format=plot.suffix.lstrip(".")
                )
            self.stderr.write(f"Box plot written to {options['plot']}")
        if options["subjects_csv"]:
            with output_file(options["subjects_csv"], "--subjects-csv") as out:
                report.subjects.to_csv(out, index=False)
            self.stderr.write(f"Per-subject preferences written to {options['subjects_csv']}")


def why_none(study, options) -> str:
    """Which subjects were left out, and the options that count them."""
    if not study.subjects.filter(responses__isnull=False).exists():
        return "nobody has answered yet"
    left = left_out(study, options["include_incomplete"], options["include_failed"])
    if not left:  # only catch questions answered
        return "no answer counts yet (catch questions aside)"
    return "left out are " + " and ".join(
        f"{n} subject(s) {LEFT_OUT[reason]} (--{LEFT_OUT_OPTION[reason].replace('_', '-')})"
        for reason, n in left.items()
    )
