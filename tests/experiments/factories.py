"""Small real studies for the tests: tiny but real media files, a system, a study, subjects.

The media are encoded once per test session with PyAV (a muted H.264 MP4 and an AAC M4A per
variant, see `clips`) and copied into each pair, so every pair has files a browser can play.
"""

import functools
import re
import tempfile
import threading
from pathlib import Path

from django.core.files.base import ContentFile
from django.db import connection

from experiments.models import (
    Collection,
    Direction,
    Pair,
    SearchResult,
    Split,
    Study,
    StudySystem,
    Subject,
    System,
)
from experiments.subjects import create_subject

from .clips import music_video

VARIANTS = 4  # distinct clips; pairs reuse them in turn


@functools.cache
def _clip(variant: int, video: bool) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.mp4"
        music_video(path, variant, seconds=2.0, size=(160, 96), video=video, audio=not video)
        return path.read_bytes()


def tiny_video(variant: int = 0) -> bytes:
    """A muted 2 s H.264 MP4 (160×96): a coloured field with a moving stripe."""
    return _clip(variant % VARIANTS, video=True)


def tiny_music(variant: int = 0) -> bytes:
    """A 2 s AAC clip in an MP4 container (what the platform serves as .m4a)."""
    return _clip(variant % VARIANTS, video=False)


def make_collection(n_pairs: int = 8, name: str = "tiny", split: str = Split.TEST) -> Collection:
    """A collection of `n_pairs` ready pairs, each with a real muted video and music clip."""
    collection = Collection.objects.create(name=name)
    for i in range(n_pairs):
        pair = Pair(
            collection=collection,
            key=f"clip{i:03d}",
            title=f"Clip {i}",
            split=split,
            status=Pair.Status.READY,
            duration_s=2.0,
        )
        pair.video_file.save(f"v{i}.mp4", ContentFile(tiny_video(i)), save=False)
        pair.music_file.save(f"m{i}.m4a", ContentFile(tiny_music(i)), save=False)
        pair.save()
    return collection


def make_system(collection: Collection, name: str = "vmnet") -> System:
    """A ready system whose ranked results put a neighbour first and the ground truth second."""
    system = System.objects.create(
        collection=collection, name=name, status=System.Status.READY, progress=1.0
    )
    pairs = list(collection.pairs.filter(split=Split.TEST).order_by("key"))
    rows = []
    for i, query in enumerate(pairs):
        ranked = [pairs[(i + 1) % len(pairs)], query, pairs[(i + 2) % len(pairs)]]
        for direction in Direction.values:
            rows += [
                SearchResult(
                    system=system,
                    direction=direction,
                    query=query,
                    rank=rank,
                    result=result,
                    score=1.0 - rank / 10,
                )
                for rank, result in enumerate(ranked, start=1)
            ]
    SearchResult.objects.bulk_create(rows)
    return system


def make_study(
    n_pairs: int = 8, per_type: int = 1, status: str = Study.Status.OPEN, **fields
) -> Study:
    """An open one-system study over a fresh tiny collection (6·per_type questions a subject)."""
    collection = make_collection(n_pairs, name=fields.pop("collection_name", "tiny"))
    system = make_system(collection)
    study = Study.objects.create(
        name=fields.pop("name", "Tiny study"),
        slug=fields.pop("slug", "tiny"),
        collection=collection,
        per_type=per_type,
        status=status,
        **fields,
    )
    StudySystem.objects.create(study=study, system=system, label="S")
    return study


def make_subject(study: Study, external_id: str = "", meta: dict | None = None) -> Subject:
    """A subject with its stored question plan, made the way the platform makes them."""
    return create_subject(study, external_id=external_id, meta=meta)


def without_random_tokens(html: str, subject: Subject) -> str:
    """A subject's page without its random strings (the link's token, the CSRF token), which
    may spell any short word by chance; for checks that the page reveals nothing."""
    html = re.sub(r'name="csrfmiddlewaretoken" value="[^"]*"', "", html)
    return html.replace(subject.token, "")


def at_once(work, times: int) -> list[Exception]:
    """Run `work()` in `times` threads released together; the errors they raised."""
    start, errors = threading.Barrier(times), []

    def run():
        try:
            start.wait()
            work()
        except Exception as error:  # noqa: BLE001 - the caller asserts on them
            errors.append(error)
        finally:
            connection.close()  # each thread's own

    threads = [threading.Thread(target=run) for _ in range(times)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors
