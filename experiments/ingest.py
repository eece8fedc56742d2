"""Importing a collection: a folder of music videos or a CSV manifest becomes ready pairs.

`import_collection` reads the source, creates one Pair per music video (a re-run skips pairs
that are already ready, reporting those whose files or split the source now names otherwise,
and retries the others), assigns train/val/test splits (seeded, see `assign_splits`) and
processes every pair as its own Celery task (`experiments.tasks.import_pair`), or in-process
with `sync=True`. Processing a pair (`process_pair`) makes its study media and its features;
a file that cannot be used marks that pair failed with the reason, and the rest goes on.
The clip length, encoder and frame size are the collection's, stored at its first import
(`import_settings`): every pair of a collection is made alike.
"""

import contextlib
import csv
import io
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from django.core.files import File
from django.core.files.base import ContentFile
from django.db import InterfaceError, OperationalError, connection, transaction
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.features import MediaError
from engine.files import VIDEO_SUFFIXES, find_videos
from experiments.media import CLIP_S, make_items
from experiments.models import Collection, Pair, Split

DEFAULT_ENCODER = "efficientnet-lite0"
# The platform's own attention-check pair (experiments.tasks.CATCH_KEY, split 'catch'): a
# source may not name that key or that split.
RESERVED_KEYS = frozenset({"__catch__"})
SOURCE_SPLITS = (Split.TRAIN, Split.VAL, Split.TEST)


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
    ready: int = 0  # the source's pairs ready after this run
    failures: list[tuple[str, str]] = field(default_factory=list)  # the source's: (key, error)
    changed: list[tuple[str, str]] = field(default_factory=list)  # (key, what was kept)
    notes: list[str] = field(default_factory=list)  # about the collection (its splits)
    # The source's pending pairs by their error ("": none, their tasks did not finish).
    pending_errors: Counter = field(default_factory=Counter)

    @property
    def pending(self) -> int:
        """The source's pairs neither ready nor failed: their tasks did not finish."""
        return self.total - self.ready - len(self.failures)


@dataclass
class AddedPairs:
    collection: Collection
    todo: list[Pair]  # the pairs to process
    keys: list[str]  # the source's, in its order
    changed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    assigned: dict[str, str] = field(default_factory=dict)  # new pairs split by the seed


def read_source(path: str | Path) -> list[SourceItem]:
    """The pairs in a folder of music videos (recursively) or in a CSV manifest."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _read_manifest(path)
    raise ManifestError(f"{path}: neither a folder of music videos nor a CSV manifest")


def _read_folder(path: Path) -> list[SourceItem]:
    """Every video file under `path` (hidden ones aside); its key is its path without suffix."""
    root = path.absolute()  # a worker may run elsewhere; symlinks are kept as named
    files = find_videos(root)
    if not files:
        raise ManifestError(f"{path}: no video files ({', '.join(sorted(VIDEO_SUFFIXES))})")
    if odd := [p for p in files if not _utf8(str(p.relative_to(root)))]:
        names = ", ".join(ascii(p.relative_to(root).as_posix()) for p in odd[:5])
        raise ManifestError(f"{path}: file names that are not UTF-8 (rename them): {names}")
    by_key: dict[str, list[Path]] = {}
    for p in files:
        by_key.setdefault(p.relative_to(root).with_suffix("").as_posix(), []).append(p)
    errors = []
    if repeats := [ps for ps in by_key.values() if len(ps) > 1]:
        named = "; ".join(
            " and ".join(repr(p.relative_to(root).as_posix()) for p in ps) for ps in repeats[:10]
        )
        more = f" (and {len(repeats) - 10} more)" if len(repeats) > 10 else ""
        errors.append(
            "files that would be the same pair (same name, another extension; rename or "
            f"remove one): {named}{more}"
        )
    for key in RESERVED_KEYS & by_key.keys():
        names = ", ".join(repr(p.relative_to(root).as_posix()) for p in by_key[key])
        errors.append(
            f"{names}: the key {key!r} is reserved for the platform's attention-check pair "
            "(rename the file)"
        )
    if errors:
        raise ManifestError(f"{path}: " + "; ".join(errors))
    return [SourceItem(key, ps[0]) for key, ps in by_key.items()]


def _read_manifest(path: Path) -> list[SourceItem]:
    """Rows `video,music[,title,genre,split]`; paths relative to the manifest's folder.

    A path must lie inside the manifest's folder as written (`..` and absolute paths may not
    leave it; a symlink inside it may lead anywhere) or, symlinks followed, inside the real
    folder. It is stored as written, normalised."""
    root = Path(os.path.normpath(path.parent.absolute()))
    real_root = root.resolve()
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
        written = Path(os.path.normpath(root / value))  # symlinks not followed
        if written.is_relative_to(root):
            return written
        resolved = (root / value).resolve()
        if resolved.is_relative_to(real_root):
            return resolved
        errors.append(f"row {row}: {column} {value!r} lies outside the manifest's folder")
        return None

    for row, values in enumerate(rows, start=2):  # row 1 is the header
        if not values.get("video"):
            errors.append(f"row {row}: no video")
            continue
        video = inside(values["video"], row, "video")
        music = inside(values["music"], row, "music") if values.get("music") else None
        split = values.get("split", "").lower()
        if split == Split.CATCH:
            errors.append(
                f"row {row}: split {split!r} is reserved for the platform's attention-check "
                f"pair (a source's pairs are {', '.join(SOURCE_SPLITS)})"
            )
        elif split and split not in SOURCE_SPLITS:
            errors.append(f"row {row}: split {split!r} is not one of {', '.join(SOURCE_SPLITS)}")
        key = Path(values["video"]).with_suffix("").as_posix()
        if key in RESERVED_KEYS:
            errors.append(
                f"row {row}: key {key!r} is reserved for the platform's attention-check pair "
                "(rename the video)"
            )
        if key in seen:
            first_row, first_video = seen[key]
            same = "" if first_video == values["video"] else f" (the same key {key!r})"
            errors.append(f"row {row}: video {values['video']!r} repeats row {first_row}{same}")
        else:
            seen[key] = row, values["video"]
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


def split_targets(
    total: int, test: int | None = None, test_fraction=0.2, val_fraction=0.1
) -> tuple[int, int]:
    """How many of `total` pairs are to be test and validation pairs."""
    n_test = test if test is not None else round(test_fraction * total)
    n_val = round(val_fraction * total)
    if n_test < 0 or n_val < 0 or n_test + n_val > total:
        raise ManifestError(f"cannot take {n_test} test and {n_val} validation pairs from {total}")
    return n_test, n_val


def assign_splits(
    keys,
    test: int | None = None,
    test_fraction=0.2,
    val_fraction=0.1,
    seed: int = 0,
    placed: dict[str, str] | None = None,
) -> dict[str, str]:
    """Seeded splits for the new `keys`, given the pairs `placed` already (key → split).

    The rule: keys and placed pairs together (n of them) are to hold `test` test pairs (or
    round(test_fraction × n)) and round(val_fraction × n) validation pairs. Placed pairs keep
    their split and count toward these numbers; the new keys take only the places still
    missing (as many as there are new keys), test first, then validation, the rest train.
    Which new keys take them follows a seeded permutation of the sorted new keys, so the
    same keys and placed pairs always give the same splits, in whatever order they come (and
    a first import splits as it always has).
    """
    placed = dict(placed or {})
    keys = sorted(set(keys) - placed.keys())
    n_test, n_val = split_targets(len(keys) + len(placed), test, test_fraction, val_fraction)
    have = list(placed.values())
    missing_test = min(max(0, n_test - have.count(Split.TEST)), len(keys))
    missing_val = min(max(0, n_val - have.count(Split.VAL)), len(keys) - missing_test)
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    splits = [Split.TEST] * missing_test + [Split.VAL] * missing_val
    splits += [Split.TRAIN] * (len(keys) - len(splits))
    return {key: str(split) for key, split in zip(order, splits, strict=True)}


BULK_ROWS = 2000  # rows a statement writes at most (the database may take fewer)
SOURCE_FIELDS = ["title", "genre", "source_video", "source_music"]  # what a source says


def add_pairs(
    name: str, path: str | Path, test=None, test_fraction=0.2, val_fraction=0.1, seed=0
) -> AddedPairs:
    """Create the collection's new pairs: the collection, the pairs to process, the source's
    keys, and what the source now says otherwise of pairs that keep theirs (`changed`, `notes`).

    All or nothing: a source that cannot be read, or a failure while writing, writes no row.
    New pairs are split by `assign_splits`: the collection's pairs (the attention-check pair
    aside) keep their split and count toward `test` and the validation share, as do manifest
    rows naming their split; new pairs take only the places still missing.
    """
    items = read_source(path)
    path = Path(path)
    root = path.absolute() if path.is_dir() else path.parent.absolute()
    roots = (Path(os.path.normpath(root)), root.resolve())
    with transaction.atomic():
        collection, _ = Collection.objects.get_or_create(
            name=name, defaults={"source": str(path.resolve())}
        )
        # Another import of this collection adds its pairs first: this one then finds them.
        Collection.objects.select_for_update().filter(pk=collection.pk).exists()
        existing = {p.key: p for p in collection.pairs.all()}
        placed = {k: p.split for k, p in existing.items() if p.split != Split.CATCH}
        placed |= {i.key: i.split for i in items if i.key not in existing and i.split}
        unassigned = [i.key for i in items if i.key not in existing and not i.split]
        splits = assign_splits(unassigned, test, test_fraction, val_fraction, seed, placed)
        added = AddedPairs(collection, [], [item.key for item in items], assigned=splits)
        new, again, edited = [], [], []
        for item in items:
            pair = existing.get(item.key)
            if pair is not None:
                if change := _kept(pair, item, roots):
                    added.changed.append((item.key, change))
                if pair.status == Pair.Status.READY:
                    continue
                again.append(pair)
            else:
                split = item.split or splits[item.key]
                pair = Pair(collection=collection, key=item.key, split=split)
                new.append(pair)
            was = [getattr(pair, field) for field in SOURCE_FIELDS]
            pair.title, pair.genre = item.title or pair.title, item.genre or pair.genre
            pair.source_video = str(item.video)
            pair.source_music = str(item.music or "")
            pair.status, pair.error = Pair.Status.PENDING, ""
            if pair.pk is not None and was != [getattr(pair, field) for field in SOURCE_FIELDS]:
                edited.append(pair)
            added.todo.append(pair)
        # In bulk: a row at a time, 200,000 rows held SQLite's write lock for minutes, and
        # every other writer (a worker, a participant's answer) gave up meanwhile.
        Pair.objects.bulk_create(new, batch_size=BULK_ROWS)
        for start in range(0, len(again), BULK_ROWS):
            chunk = [pair.pk for pair in again[start : start + BULK_ROWS]]
            Pair.objects.filter(pk__in=chunk).update(status=Pair.Status.PENDING, error="")
        Pair.objects.bulk_update(edited, SOURCE_FIELDS, batch_size=BULK_ROWS)
    have = list((placed | splits).values())
    n_test, n_val = split_targets(len(have), test, test_fraction, val_fraction)
    shares = {Split.TEST: test_fraction, Split.VAL: val_fraction}
    for split, want in ((Split.TEST, n_test), (Split.VAL, n_val)):
        if have.count(split) != want:
            asked = (
                "asked"
                if split == Split.TEST and test is not None
                else (f"of the default {shares[split]:.0%} of {len(have)}")
            )
            added.notes.append(
                f"{collection}: {have.count(split)} {split.label} pairs, not the {want} {asked} "
                "(pairs already imported, and manifest rows naming their split, keep it; "
                "import into a new collection to split anew)"
            )
    return added


def refill_places(collection: Collection, assigned: dict[str, str], seed: int = 0) -> list[str]:
    """Give the test places of pairs that failed to this run's ready training pairs, so that
    a broken file does not shrink the test set; notes on what moved.

    Only pairs split by the seed in this run move (a manifest's named splits stay), so no
    system has trained on a pair that becomes a test pair. Which ones take the places follows
    a seeded permutation, as `assign_splits` does.
    """
    pairs = {p.key: p for p in collection.pairs.filter(key__in=list(assigned))}
    failed = sorted(
        (p for p in pairs.values() if p.status == Pair.Status.FAILED and p.split == Split.TEST),
        key=lambda p: p.key,
    )
    spare = sorted(
        p.key for p in pairs.values() if p.status == Pair.Status.READY and p.split == Split.TRAIN
    )
    spare = [spare[i] for i in np.random.default_rng(seed).permutation(len(spare))]
    moves = list(zip(failed, spare, strict=False))
    with transaction.atomic():
        for pair, taker in moves:
            pairs[taker].split, pair.split = Split.TEST, Split.TRAIN
            pairs[taker].save(update_fields=["split"])
            pair.save(update_fields=["split"])
    notes = []
    if moves:
        notes.append(
            f"{collection}: the test places of {len(moves)} failed pair(s) went to ready "
            f"training pairs: {', '.join(taker for _, taker in moves)}"
        )
    if held := len(failed) - len(moves):
        notes.append(
            f"{collection}: {held} test place(s) held by failed pairs: fix their files and run "
            "again to fill them"
        )
    return notes


def _kept(pair: Pair, item: SourceItem, roots) -> str | None:
    """What the source now says otherwise about an existing pair, which keeps what it has."""
    other_split = bool(item.split) and item.split != pair.split
    if pair.status == Pair.Status.READY:
        details = [
            f"{kind} {_shown(old, roots)}, now {_shown(new, roots)}"
            for kind, old, new in (
                ("video", pair.source_video, str(item.video)),
                ("music", pair.source_music, str(item.music or "")),
            )
            if not _same_file(old, new)
        ]
        if details:
            if other_split:
                details.append(f"split {pair.split}, now {item.split}")
            return (
                f"already imported from other files ({'; '.join(details)}); "
                "import into a new collection to use the new ones"
            )
    if other_split:
        return (
            f"keeps its split {pair.split} (the source now says {item.split}); "
            "import into a new collection to split anew"
        )
    return None


def _same_file(old: str, new: str) -> bool:
    if old == new or not old or not new:
        return old == new
    try:
        return os.path.samefile(old, new)
    except OSError:  # one of them is gone
        return False


def _shown(path: str, roots) -> str:
    """`path` relative to the source's folder where it lies inside."""
    if not path:
        return "the video's own soundtrack"
    for root in roots:
        if Path(path).is_relative_to(root):
            return Path(path).relative_to(root).as_posix()
    return path


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
            _store(pair, [
                (pair.video_file, f"{pair.video_token}.mp4", File(web.open("rb"))),
                (pair.music_file, f"{pair.music_token}.m4a", File(clip.open("rb"))),
                (pair.features_file, f"{pair.collection_id}/{pair.pk}.npz",
                 ContentFile(features.getvalue())),
            ])  # fmt: skip
    except MediaError as error:
        pair.status, pair.error = Pair.Status.FAILED, str(error)
    else:
        pair.status, pair.error, pair.duration_s = Pair.Status.READY, "", info.duration_s
    pair.save()
    return pair


def _store(pair: Pair, files) -> None:
    """Save (field, name, content) files under exactly their names, or none of them: a save
    stopped halfway (a full disk) leaves no partial file, and a retry no suffixed copy."""
    stored = []
    try:
        for field_file, name, content in files:
            with content:
                field_file.delete(save=False)
                target = field_file.field.generate_filename(pair, name)
                field_file.storage.delete(target)  # an earlier attempt's leftover, if any
                stored.append((field_file.storage, target))
                field_file.save(name, content, save=False)
    except BaseException:
        for storage, target in stored:
            storage.delete(target)
        raise


def import_settings(
    collection: Collection,
    clip_s: float | None = None,
    encoder: str | None = None,
    frame_size: int | None = None,
) -> dict:
    """The collection's clip length, encoder and frame size, {"clip_s", "encoder",
    "frame_size"}: stored at its first import (from those given, else the defaults); later,
    any given must agree (ValueError: other clips or features would not compare with its
    pairs'). A collection imported before they were stored must be given them. An unknown
    encoder or a frame size it cannot take is a ValueError too."""
    from engine.features.video import input_size

    asked = {"clip_s": clip_s, "encoder": encoder, "frame_size": frame_size}
    stored = collection.import_settings
    legacy = collection.pairs.filter(status=Pair.Status.READY).exclude(split=Split.CATCH).exists()
    if not stored and legacy and (clip_s is None or encoder is None):
        # Imported before settings were kept: defaults could differ from what made its pairs.
        raise ValueError(
            f"{collection} was imported before its import settings were kept: run "
            "`manage.py import_collection` once with its first import's --clip-seconds and "
            "--encoder (and --frame-size if it gave one); they are kept from then on"
        )
    if not stored:
        defaults = {"clip_s": CLIP_S, "encoder": DEFAULT_ENCODER, "frame_size": None}
        stored = {k: v if v is not None else defaults[k] for k, v in asked.items()}
        input_size(stored["encoder"], stored["frame_size"])
        collection.import_settings = stored
        Collection.objects.filter(pk=collection.pk).update(import_settings=stored)
    elif differ := [f"{k} {stored[k]!r}, not {v!r}" for k, v in asked.items()
                    if v is not None and v != stored[k]]:  # fmt: skip
        raise ValueError(
            f"{collection} was imported with {', '.join(differ)}: its pairs are made alike; "
            "import into a new collection to use other settings"
        )
    return stored


# Waiting this long with no pair done, an import asks whether its tasks still exist.
QUIET_S = 120
# Redis (broker and result store) down or restarting: the tasks may still be there after.
_BROKER_DOWN = (RedisConnectionError, RedisTimeoutError, KombuOperationalError)


def _lost(results, queue: str) -> bool:
    """`tasks_lost`, False while the broker cannot be asked."""
    from experiments.tasks import tasks_lost

    try:
        return tasks_lost(results, queue)
    except _BROKER_DOWN:
        return False


def waited_for(results, queue: str, progress=None) -> list:
    """Wait for each result of tasks sent to `queue` in turn; the results left when their
    tasks were lost (`tasks_lost` after QUIET_S without one done), else none. Redis out of
    reach (restarting) counts as not done yet, and as not lost."""
    from celery.exceptions import TimeoutError as NotYet

    last = time.monotonic()
    for done, result in enumerate(results, start=1):
        while True:
            try:
                result.get(propagate=False, timeout=5)
                break
            except NotYet:
                pass
            except _BROKER_DOWN:
                time.sleep(1)  # fails at once while Redis is down: no busy loop
            if time.monotonic() - last > QUIET_S and _lost(results[done - 1 :], queue):
                return results[done - 1 :]
        last = time.monotonic()
        if progress:
            progress(done, len(results))
    return []


def import_collection(
    name: str,
    path: str | Path,
    test: int | None = None,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
    clip_s: float | None = None,
    encoder: str | None = None,
    frame_size: int | None = None,
    sync: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ImportSummary:
    """Import (or complete the import of) collection `name` from `path`; waits for the tasks.

    `progress(done, total)` is called as pairs finish. A re-run skips the pairs that are ready
    (and reports in `changed` those whose files or split the source now names otherwise) and
    retries the others; new pairs are split as `add_pairs` says. `clip_s`, `encoder` and
    `frame_size` are the collection's (`import_settings`). The summary counts the source's
    pairs only. Raises ManifestError for a bad source and ValueError for settings that are
    not the collection's, an unknown encoder or a frame size it cannot take (nothing written).
    """
    from experiments.tasks import import_pair
    from study_site.celery import app

    # Tasks that run in-process run where they are sent: one by one, so progress shows.
    sync = sync or app.conf.task_always_eager
    with transaction.atomic():  # settings refused: no collection, no pairs
        added = add_pairs(name, path, test, test_fraction, val_fraction, seed)
        made = import_settings(added.collection, clip_s, encoder, frame_size)
    clip_s, encoder, frame_size = made["clip_s"], made["encoder"], made["frame_size"]
    collection, todo, total = added.collection, added.todo, len(added.keys)
    if progress:
        progress(0, len(todo))
    if sync:
        for done, pair in enumerate(todo, start=1):
            # The database failed: the pair stays pending, reported.
            with contextlib.suppress(OperationalError, InterfaceError):
                import_pair(pair.pk, clip_s, encoder, frame_size)
            if progress:
                progress(done, len(todo))
    lost = []
    if not sync:
        results = [import_pair.delay(pair.pk, clip_s, encoder, frame_size) for pair in todo]
        queue = app.amqp.router.route({}, "experiments.tasks.import_pair")["queue"].name
        lost = waited_for(results, queue, progress)
    if not connection.in_atomic_block:
        # The wait may be long: a database that restarted meanwhile dropped this connection.
        connection.close()
    notes = added.notes + refill_places(collection, added.assigned, seed)
    if lost:
        notes.append(
            f"{len(lost)} pairs' tasks were lost (the broker restarted without its queue?): "
            "no worker has them and no queue holds them; they stay pending"
        )
    keys = set(added.keys)  # not the collection's other pairs, nor its attention-check pair
    rows = [row for row in collection.pairs.values_list("key", "status", "error") if row[0] in keys]
    return ImportSummary(
        collection=collection,
        total=total,
        skipped=total - len(todo),
        ready=sum(status == Pair.Status.READY for _, status, _ in rows),
        failures=[(key, error) for key, status, error in rows if status == Pair.Status.FAILED],
        changed=added.changed,
        notes=notes,
        pending_errors=Counter(e for _, status, e in rows if status == Pair.Status.PENDING),
    )
