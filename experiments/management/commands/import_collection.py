"""`manage.py import_collection NAME PATH`: music videos (a folder or a CSV manifest) → pairs."""

from django.core.management.base import BaseCommand, CommandError
from django.db import InterfaceError, OperationalError
from tqdm import tqdm

from experiments.ingest import DEFAULT_ENCODER, ManifestError, import_collection, read_source
from experiments.management import bar_interval
from experiments.media import CLIP_S
from experiments.tasks import celery_problem
from study_site.celery import app

SPLIT_SETTINGS = ("test", "test_fraction", "val_fraction", "seed")
SPLIT_NOTE = (
    "--test, --*-fraction and --seed apply to new pairs only: the {n} already imported keep "
    "their split. To change it, import into a new collection."
)


class Command(BaseCommand):
    help = (
        "Import a collection from a folder of music videos or a CSV manifest "
        "(video,music[,title,genre,split]; paths relative to the manifest). Each pair is "
        "transcoded and its features extracted by a Celery task (in-process with --sync). "
        "Re-running skips pairs that are ready (a pair whose files or split the source now "
        "names otherwise is reported, not re-imported: import into a new collection to use "
        "them) and retries the others, with the collection's clip length, encoder and frame "
        "size (those of its first import); new pairs take only the test and validation places "
        "still missing."
    )

    def add_arguments(self, parser):
        parser.add_argument("name", help="the collection's name (created if new)")
        parser.add_argument("path", help="a folder of music videos or a CSV manifest")
        share = parser.add_mutually_exclusive_group()
        share.add_argument(
            "--test",
            type=int,
            help="number of test pairs in the collection (pairs already imported, and manifest "
            "rows naming their split, keep it and count toward it)",
        )
        share.add_argument("--test-fraction", type=float, default=0.2, help="default 0.2")
        parser.add_argument("--val-fraction", type=float, default=0.1, help="default 0.1")
        parser.add_argument("--seed", type=int, default=0, help="of the split assignment")
        parser.add_argument(
            "--clip-seconds",
            type=float,
            help=f"length of the centred clips (default: the collection's, {CLIP_S} for a new one)",
        )
        parser.add_argument(
            "--encoder",
            help=f"the frame CNN (default: the collection's, {DEFAULT_ENCODER} for a new one)",
        )
        parser.add_argument(
            "--frame-size",
            type=int,
            help="CNN input size in pixels (default: the collection's, the encoder's own for "
            "a new one)",
        )
        parser.add_argument("--sync", action="store_true", help="work in this process")

    def handle(self, *args, **o):
        try:
            items = read_source(o["path"])  # a bad manifest is reported before anything else
        except ManifestError as error:
            raise CommandError(str(error)) from None
        queue = app.amqp.router.route({}, "experiments.tasks.import_pair")["queue"].name
        if not o["sync"] and (problem := celery_problem([queue])):
            raise CommandError(f"{problem}; or import with --sync.")
        bar = tqdm(
            total=len(items),
            unit="pair",
            desc="importing",
            file=self.stderr,
            disable=o["verbosity"] < 1,
            mininterval=bar_interval(self.stderr),
        )

        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)  # drawn at most every mininterval

        try:
            summary = import_collection(
                o["name"],
                o["path"],
                test=o["test"],
                test_fraction=o["test_fraction"],
                val_fraction=o["val_fraction"],
                seed=o["seed"],
                clip_s=o["clip_seconds"],
                encoder=o["encoder"],
                frame_size=o["frame_size"],
                sync=o["sync"],
                progress=progress,
            )
        except (ManifestError, ValueError) as error:
            raise CommandError(str(error)) from None
        except (OperationalError, InterfaceError) as error:  # PostgreSQL restarting, say
            raise CommandError(
                f"The database could not be reached ({error}). Run the same command again: "
                "it processes only the pairs not ready."
            ) from None
        finally:
            bar.close()
        for key, error in summary.failures:
            self.stderr.write(f"failed  {key}: {error}")
        for key, kept in summary.changed:
            self.stderr.write(f"kept    {key}: {kept}")
        for note in summary.notes:
            self.stderr.write(f"note    {note}")
        changed = f", {len(summary.changed)} not updated (see above)" if summary.changed else ""
        pending = f", {summary.pending} still pending" if summary.pending else ""
        self.stdout.write(
            f"{summary.collection.name}: {summary.ready} of {summary.total} pairs ready, "
            f"{len(summary.failures)} failed{pending}, {summary.skipped} already imported{changed}"
        )
        parser = self.create_parser("manage.py", "import_collection")
        given = [name for name in SPLIT_SETTINGS if o[name] != parser.get_default(name)]
        if summary.skipped and given:  # settings asked for that the ready pairs do not take
            self.stdout.write(SPLIT_NOTE.format(n=summary.skipped))
        if summary.failures:  # a non-zero exit, so that scripts notice; the rest is imported
            raise CommandError(
                f"{len(summary.failures)} of {summary.total} pairs failed (listed above). Fix or "
                "remove their files and run the same command again: it retries only those.",
                returncode=1,
            )
        if summary.pending:
            raise CommandError(pending_message(summary), returncode=1)


def pending_message(summary) -> str:
    """Why the pending pairs are pending, grouped by their error, and what to do."""
    errors = summary.pending_errors
    unfinished = "did not finish (a worker stopped, or the database stayed busy)"
    if not any(errors):
        return (
            f"{summary.pending} of {summary.total} pairs are still pending: their tasks "
            f"{unfinished}. Run the same command again: it processes only those."
        )
    named = [(error, n) for error, n in errors.most_common() if error]
    groups = [f'{n} with "{error}"' for error, n in named[:3]]
    if rest := sum(n for _, n in named[3:]):  # one error a file, say: the first few tell
        groups.append(f"{rest} with other errors (the admin lists the collection's pairs)")
    if n := errors[""]:
        groups.append(f"{n} whose {'task' if n == 1 else 'tasks'} {unfinished}")
    # A full disk (experiments.tasks.import_pair): the pair waits for room, not for a fix.
    disk = any(error.startswith("not imported yet") for error in errors)
    return (
        f"{summary.pending} of {summary.total} pairs are still pending: {'; '.join(groups)}; "
        f"{'free space, then run' if disk else 'run'} the same command again: it processes "
        "only those."
    )
