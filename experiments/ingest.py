"""Importing a collection: a folder of music videos or a CSV manifest becomes ready pairs.

`import_collection` reads the source, creates one Pair per music video (a re-run skips pairs
that are already ready and retries the others), assigns train/val/test splits (seeded) and
processes every pair as its own Celery task (`experiments.tasks.import_pair`), or in-process
with `sync=True`. Processing a pair (`process_pair`) makes its study media and its features;
a file that cannot be used marks that pair failed with the reason, and the rest goes on.
"""

import csv
import io
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from django.core.files import File
from django.core.files.base import ContentFile

from engine.features import MediaError
from experiments.media import CLIP_S, make_items
from experiments.models import Collection, Pair, Split

VIDEO_SUFFIXES = {
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv",
    ".ogv",
}  # fmt: skip
DEFAULT_ENCODER = "efficientnet-lite0"


class ManifestError(ValueError):
    """The source cannot be imported at all (bad manifest rows); nothing has been written."""


@dataclass(frozen=True)
class SourceItem:
    key: str
    video: Path
    music: Path | None = None  # None: the video's own soundtrack
    title: str = ""
    genre: str = ""
    split: str = ""  # empty: assigned by the seeded split


@dataclass
class ImportSummary:
    collection: Collection
    total: int = 0  # pairs in the source
    skipped: int = 0  # already ready before this run
    ready: int = 0  # ready after this run (all of them)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (key, error)


def read_source(path: str | Path) -> list[SourceItem]:
    """The pairs in a folder of music videos (recursively) or in a CSV manifest."""
    path = Path(path)
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in VIDEO_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise ManifestError(f"{path}: no video files ({', '.join(sorted(VIDEO_SUFFIXES))})")
        if odd := [p for p in files if not _utf8(str(p.relative_to(path)))]:
            names = ", ".join(ascii(p.relative_to(path).as_posix()) for p in odd[:5])
            raise ManifestError(f"{path}: file names that are not UTF-8 (rename them): {names}")
        return [SourceItem(p.relative_to(path).with_suffix("").as_posix(), p) for p in files]
    if path.is_file() and path.suffix.lower() == ".csv":
        return _read_manifest(path)
    raise ManifestError(f"{path}: neither a folder of music videos nor a CSV manifest")


def _read_manifest(path: Path) -> list[SourceItem]:
    """Rows `video,music[,title,genre,split]`; paths relative to the manifest's folder."""
    root = path.parent.resolve()
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = {c.strip().lower() for c in reader.fieldnames or []}
            if not {"video", "music"} <= columns:
                raise ManifestError(f"{path.name}: the header must name the columns video,music")
            rows = [
                {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
                for row in reader
            ]
    except UnicodeDecodeError as error:
        raise ManifestError(f"{path.name}: not UTF-8 text (save it as UTF-8): {error}") from None
    errors, items, seen = [], [], {}

    def inside(value: str, row: int, column: str) -> Path | None:
        resolved = (root / value).resolve()
        if not resolved.is_relative_to(root):
            errors.append(f"row {row}: {column} {value!r} lies outside the manifest's folder")
            return None
        return resolved

    for row, values in enumerate(rows, start=2):  # row 1 is the header
        if not values.get("video"):
            errors.append(f"row {row}: no video")
            continue
        video = inside(values["video"], row, "video")
        music = inside(values["music"], row, "music") if values.get("music") else None
        split = values.get("split", "").lower()
        if split and split not in Split.values:
            errors.append(f"row {row}: split {split!r} is not one of {', '.join(Split.values)}")
        key = Path(values["video"]).with_suffix("").as_posix()
        if key in seen:
            errors.append(f"row {row}: video {values['video']!r} repeats row {seen[key]}")
        seen[key] = row
        if video is not None:
            title, genre = values.get("title", ""), values.get("genre", "")
            items.append(SourceItem(key, video, music, title, genre, split))
    if errors:
        raise ManifestError(f"{path.name}: " + "; ".join(errors))
    if not items:
        raise ManifestError(f"{path.name}: no rows")
    return items


def _utf8(text: str) -> bool:
    """Whether a file name can be stored (undecodable bytes come back as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def assign_splits(
    keys, test: int | None = None, test_fraction=0.2, val_fraction=0.1, seed: int = 0
) -> dict[str, str]:
    """A seeded split of `keys`: `test` pairs (or a share) for testing, a share for validation."""
    keys = sorted(keys)
    n_test = test if test is not None else round(test_fraction * len(keys))
    n_val = round(val_fraction * len(keys))
    if n_test < 0 or n_val < 0 or n_test + n_val > len(keys):
        raise ManifestError(
            f"cannot take {n_test} test and {n_val} validation pairs from {len(keys)}"
        )
    order = np.random.default_rng(seed).permutation(len(keys))
    splits = [Split.TEST] * n_test + [Split.VAL] * n_val
    splits += [Split.TRAIN] * (len(keys) - len(splits))
    return {keys[i]: str(split) for i, split in zip(order, splits, strict=True)}


def add_pairs(
    name: str, path: str | Path, test=None, test_fraction=0.2, val_fraction=0.1, seed=0
) -> tuple[Collection, list[Pair], int]:
    """Create the collection's new pairs; returns it, the pairs to process and the total."""
    items = read_source(path)
    collection, _ = Collection.objects.get_or_create(
        name=name, defaults={"source": str(Path(path).resolve())}
    )
    existing = {p.key: p for p in collection.pairs.all()}
    unassigned = [item.key for item in items if not item.split]
    splits = assign_splits(unassigned, test, test_fraction, val_fraction, seed)
    todo = []
    for item in items:
        pair = existing.get(item.key)
        if pair is not None and pair.status == Pair.Status.READY:
            continue
        if pair is None:
            pair = Pair(collection=collection, key=item.key, split=item.split or splits[item.key])
        pair.title, pair.genre = item.title or pair.title, item.genre or pair.genre
        pair.source_video = str(item.video)
        pair.source_music = str(item.music or "")
        pair.status, pair.error = Pair.Status.PENDING, ""
        pair.save()
        todo.append(pair)
    return collection, todo, len(items)


def process_pair(
    pair: Pair,
    clip_s: float | None = CLIP_S,
    encoder: str = DEFAULT_ENCODER,
    frame_size: int | None = None,
):
    """Make the pair's web video, audio clip and features; mark it ready, or failed with why.

    `frame_size` overrides the encoder's input size (smaller is faster on a CPU; must be the
    same for every pair of a collection)."""
    from engine.features.audio import music_features
    from engine.features.video import frame_features

    video = Path(pair.source_video)
    music = Path(pair.source_music) if pair.source_music else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            web, clip = Path(tmp) / "video.mp4", Path(tmp) / "music.m4a"
            info = make_items(video, web, clip, music_path=music, clip_s=clip_s)
            features = io.BytesIO()
            np.savez(
                features,
                music=music_features(music or video),
                frames=frame_features(video, encoder=encoder, image_size=frame_size),
            )
            for field_file, name, source in (
                (pair.video_file, f"{pair.video_token}.mp4", web),
                (pair.music_file, f"{pair.music_token}.m4a", clip),
            ):
                field_file.delete(save=False)
                with source.open("rb") as f:
                    field_file.save(name, File(f), save=False)
            pair.features_file.delete(save=False)
            pair.features_file.save(
                f"{pair.collection_id}/{pair.pk}.npz", ContentFile(features.getvalue()), save=False
            )
    except MediaError as error:
        pair.status, pair.error = Pair.Status.FAILED, str(error)
    else:
        pair.status, pair.error, pair.duration_s = Pair.Status.READY, "", info.duration_s
    pair.save()
    return pair


def import_collection(
    name: str,
    path: str | Path,
    test: int | None = None,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
    clip_s: float | None = CLIP_S,
    encoder: str = DEFAULT_ENCODER,
    frame_size: int | None = None,
    sync: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ImportSummary:
    """Import (or complete the import of) collection `name` from `path`; waits for the tasks.

    `progress(done, total)` is called as pairs finish.
    """
    from experiments.tasks import import_pair

    collection, todo, total = add_pairs(name, path, test, test_fraction, val_fraction, seed)
    if progress:
        progress(0, len(todo))
    if sync:
        for done, pair in enumerate(todo, start=1):
            import_pair(pair.pk, clip_s, encoder, frame_size)
            if progress:
                progress(done, len(todo))
    else:
        results = [import_pair.delay(pair.pk, clip_s, encoder, frame_size) for pair in todo]
        for done, result in enumerate(results, start=1):
            result.get(propagate=False)
            if progress:
                progress(done, len(todo))
    pairs = collection.pairs.all()
    return ImportSummary(
        collection=collection,
        total=total,
        skipped=total - len(todo),
        ready=pairs.filter(status=Pair.Status.READY).count(),
        failures=list(pairs.filter(status=Pair.Status.FAILED).values_list("key", "error")),
    )
