"""`manage.py import_results COLLECTION NAME PATH`: uploaded results as a retrieval system."""

from django.core.management.base import BaseCommand, CommandError

from experiments.models import Collection
from experiments.uploads import DEFAULT_K, KINDS, UploadError, import_results


class Command(BaseCommand):
    help = (
        "Import a system's results: a CSV of ranked results (query_item,rank,result_item"
        "[,score][,direction]; items as video:KEY / music:KEY) or embeddings (.npz with arrays "
        "keys, video, music, or a structured .npy with fields key, video, music), whose "
        "neighbours the engine's search computes. The file is checked in "
        "full; with any error nothing is imported. See experiments/uploads.py for the format."
    )

    def add_arguments(self, parser):
        parser.add_argument("collection", help="the collection's name")
        parser.add_argument("name", help="the system's name (an uploaded system is replaced)")
        parser.add_argument("path", help="the CSV, .npz or .npy file")
        parser.add_argument("--kind", choices=KINDS, help="default: from the file's suffix")
        parser.add_argument(
            "-k", type=int, default=DEFAULT_K, help="neighbours kept per query (embeddings)"
        )

    def handle(self, *args, **o):
        collection = Collection.objects.filter(name=o["collection"]).first()
        if collection is None:
            raise CommandError(f"No collection named {o['collection']!r}.")
        if o["k"] < 1:
            raise CommandError("-k must be at least 1")
        try:
            system = import_results(collection, o["name"], o["path"], kind=o["kind"], k=o["k"])
        except UploadError as error:
            if not error.in_file:  # the name or the collection: the file is not at fault
                problems = "; ".join(str(e) for e in error.errors)
                raise CommandError(f"Nothing imported: {problems}.") from None
            for line in error.summary():
                self.stderr.write(line)
            raise CommandError(
                f"Nothing imported: {len(error.errors)} error(s) in {o['path']}."
            ) from None
        self.stdout.write(f"{system} of {collection}: {system.message} (id {system.pk}).")
