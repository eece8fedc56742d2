"""Celery tasks: importing pairs, training systems, searching, preparing studies.

Engine work (tasks whose names start with `gpu_`, and `import_pair`) runs on the `gpu` queue
(settings.CELERY_TASK_ROUTES); the rest on `default`. Every task can run again after a worker
died half-way (late acks): a ready pair or system is skipped, a checkpoint already written is
loaded instead of trained again, and search results are replaced in one transaction. Progress
and errors are written to the rows (System/Study progress and message), where the admin shows
them. A step of a preparation that is no longer at work (back to draft, prepared again), or
of a system changed since the step started, stops and writes nothing.
"""

import errno
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from celery import shared_task, signature
from celery.exceptions import Ignore
from django.conf import settings
from django.core.files.base import ContentFile
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from engine.features import MediaError
from engine.features.audio import N_FEATURES
from engine.files import embeddings_npz, load_embeddings
from experiments.ingest import DEFAULT_ENCODER, process_pair
from experiments.media import CLIP_S, MediaInfo, broken_items, probe
from experiments.models import EDITABLE_DESIGN, Pair, Split, Study, StudySystem, System
from experiments.uploads import neighbours, replace_search_results

logger = logging.getLogger(__name__)


# Seconds to wait before each new try when the database, not the work, failed: busy
# (SQLite's write lock), restarting, unreachable.
DATABASE_RETRIES_S = (1, 2, 4, 8, 16)
DATABASE_ERRORS = (OperationalError, InterfaceError)


def with_database_retries(work, what: str):
    """`work()`, tried again on a new connection while the database fails, for up to 31 s.

    A connection PostgreSQL dropped as it restarted stays dead: without a new one every later
    query fails too, and a progress note lost to a restart would end hours of training and
    leave its study preparing for ever. Not inside a transaction (it is the caller's to redo).
    """
    for wait in (*DATABASE_RETRIES_S, None):
        try:
            return work()
        except DATABASE_ERRORS:
            if wait is None or connection.in_atomic_block:
                raise
            logger.warning("%s: database error, again in %s s", what, wait)
            connection.close()
            time.sleep(wait)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or one it was raised from, is a full disk or quota."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


@shared_task
def import_pair(
    pair_id: int,
    clip_s: float | None = CLIP_S,
    encoder: str = DEFAULT_ENCODER,
    frame_size: int | None = None,
):
    """Make one pair's media and features; a pair that is already ready is left alone.
    A database error is tried again a few times, then raised: the pair stays pending (a
    re-run of the import takes it up), not failed as a broken file would be; so does a full
    disk, at once."""
    return with_database_retries(
        lambda: _import_pair(pair_id, clip_s, encoder, frame_size), f"importing pair {pair_id}"
    )


def _import_pair(pair_id: int, clip_s, encoder: str, frame_size: int | None):
    pair = Pair.objects.filter(pk=pair_id).first()
    if pair is None or pair.status == Pair.Status.READY:
        return pair and pair.status
    try:
        return process_pair(pair, clip_s, encoder, frame_size).status
    except DATABASE_ERRORS:
        raise
    except Exception as error:  # one broken file must not stop the collection
        if is_disk_full(error):
            # The disk, not the file: the pair stays pending (a re-run takes it up) and
            # keeps its test place; its error says why.
            logger.error("importing pair %s: %s", pair_id, error)
            Pair.objects.filter(pk=pair_id).update(error=f"not imported yet: {error}")
            return Pair.Status.PENDING
        logger.exception("importing pair %s failed", pair_id)
        Pair.objects.filter(pk=pair_id).update(
            status=Pair.Status.FAILED,
            error=f"{pair.source_video}: {type(error).__name__}: {error}",
        )
        return Pair.Status.FAILED


def load_features(collection_id: int, split: str):
    """The engine's Features of a collection's ready pairs in one split (sorted by key)."""
    from engine.pipeline import Features

    keys, frames, music = [], [], []
    pairs = Pair.objects.filter(collection_id=collection_id, split=split, status=Pair.Status.READY)
    for pair in pairs.order_by("key"):
        with pair.features_file.open("rb") as f, np.load(f) as data:
            keys.append(pair.key)
            frames.append(data["frames"])
            music.append(data["music"])
    return Features(keys, frames, np.stack(music) if music else np.empty((0, N_FEATURES)))


@shared_task
def gpu_train_system(
    system_id: int,
    study_id: int | None = None,
    step=(0, 1),
    preparation: int | None = None,
    then=(),
):
    """Train the system on its collection's train split (validating on val), save the
    checkpoint, embed the test pairs and evaluate on them. A saved checkpoint is reused.
    Then send the preparation's next step (`then`)."""
    _train_system(system_id, study_id, step, preparation)
    _send_next(then, study_id, preparation)


def _train_system(system_id: int, study_id: int | None, step, preparation: int | None):
    from engine.pipeline import evaluate, load_system, train_system

    system = System.objects.get(pk=system_id)
    if _in_fixed_design(system):
        return
    written = []  # files this step wrote
    with _failing(system, study_id, preparation):
        if system.kind == System.Kind.EXTERNAL:
            raise ValueError(f"{system.name}: uploaded results cannot be trained")
        report = _reporter(system, study_id, step, preparation)
        test = load_features(system.collection_id, Split.TEST)
        if not test.keys:
            raise ValueError(f"{system.collection}: no ready test pairs")
        if system.checkpoint and system.checkpoint.storage.exists(system.checkpoint.name):
            report(0.0, "Loading the checkpoint")
            trained = load_system(system.checkpoint.path)
        else:
            report(0.0, "Loading features")
            train = load_features(system.collection_id, Split.TRAIN)
            val = load_features(system.collection_id, Split.VAL)
            if not train.keys or not val.keys:
                raise ValueError(
                    f"{system.collection}: training needs ready train and validation pairs "
                    f"(has {len(train.keys)} and {len(val.keys)})"
                )
            trained = train_system(
                system.kind,
                train,
                val,
                config=system.config or None,
                progress=lambda fraction, message="": report(0.9 * fraction, message or "Training"),
            )
            # per generation: a superseded step still training never writes over this one's
            name = f"systems/{system.pk}-{system.kind}-{system.generation}.pt"
            path = Path(settings.MEDIA_ROOT) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            trained.save(path)
            system.checkpoint.name = name
            written.append(name)
        report(0.95, "Embedding the test pairs")
        video, music = trained.embed(test.frames, test.music)
        system.embeddings.delete(save=False)
        system.embeddings.save(
            f"{system.pk}-embeddings.npz",
            ContentFile(embeddings_npz(test.keys, video, music)),
            save=False,
        )
        written.append(system.embeddings.name)
        metrics = {**trained.metrics, "test": evaluate(trained, test)}
        ready = dict(
            checkpoint=system.checkpoint.name,
            embeddings=system.embeddings.name,
            metrics=_json_safe(metrics),
            status=System.Status.READY,
            progress=1.0,
            message=f"Ready; test {recall_summary(metrics['test'])}",
        )
        if not with_database_retries(
            lambda: _this_generation(system).update(**ready), f"{system.name}: recording it"
        ):
            for name in written:  # nobody's now
                system.embeddings.storage.delete(name)
            raise Superseded(f"{system.name} changed while it was trained")


@shared_task
def gpu_search(
    system_id: int,
    k: int = 10,
    study_id: int | None = None,
    step=(0, 1),
    preparation: int | None = None,
    then=(),
):
    """Store the system's top-k results for every test query in both directions, then send
    the preparation's next step (`then`)."""
    stored = _search(system_id, k, study_id, step, preparation)
    _send_next(then, study_id, preparation)
    return stored


def _search(system_id: int, k: int, study_id: int | None, step, preparation: int | None):
    system = System.objects.get(pk=system_id)
    if _in_fixed_design(system):
        return None
    with _failing(system, study_id, preparation):
        if not system.embeddings:
            raise ValueError(f"{system.name}: no embeddings to search (train it first)")
        _reporter(system, study_id, step, preparation)(0.0, "Searching")
        with system.embeddings.open("rb") as f:
            keys, video, music = load_embeddings(f)
        known = set(
            Pair.objects.filter(collection_id=system.collection_id, key__in=keys).values_list(
                "key", flat=True
            )
        )
        if missing := [key for key in keys if key not in known]:
            raise ValueError(f"{system.name}: embeddings name unknown pairs: {missing[:5]}")
        rows = neighbours(keys, video, music, k)

        @transaction.atomic
        def store():
            if not _this_generation(system).select_for_update().exists():
                raise Superseded(f"{system.name} changed while it was searched")
            replace_search_results(system, rows)
            _this_generation(system).update(
                status=System.Status.READY,
                progress=1.0,
                message=f"Ready; test {recall_summary(system.metrics.get('test', {}))}; "
                f"{len(rows)} search results",
            )

        with_database_retries(store, f"{system.name}: storing its search results")
    return len(rows)


def queue_preparation(study: Study) -> bool:
    """Queue the study's preparation; False, with nothing queued, when it is preparing already
    or its design is fixed. One conditional update: two clicks, two researchers or a command
    racing them queue it once. Its progress clock starts now, so that a preparation lost
    before a worker took it (the broker restarted) shows its age as one that stopped later
    does. A broker that cannot be reached leaves the study as it was, and raises."""
    if not Study.objects.filter(pk=study.pk, status__in=EDITABLE_DESIGN).update(
        status=Study.Status.PREPARING, message="Queued", progress=0.0, progress_at=timezone.now()
    ):
        return False
    try:
        prepare_study.delay(study.pk)
    except Exception:
        Study.objects.filter(pk=study.pk).update(
            status=study.status, message=study.message, progress=study.progress,
            progress_at=study.progress_at,
        )  # fmt: skip
        raise
    return True


@shared_task
def prepare_study(study_id: int):
    """Train and search every system of the study that needs it, then mark the study ready.

    The work is a chain of `gpu_` tasks ending in `finish_study`, each sending the next as it
    ends (`_send_next`); a failing step marks the study failed with its message and stops the
    chain.
    """
    work = with_database_retries(lambda: _planned(study_id), f"preparing study {study_id}")
    if isinstance(work, str):  # nothing to do, or failed
        return work
    work.apply_async()
    return Study.Status.PREPARING


def _planned(study_id: int):
    """The chain that prepares the study, recorded as its preparation at work; or the
    study's status where there is nothing to prepare (failed: why in its message)."""
    study = Study.objects.get(pk=study_id)
    if study.status in (Study.Status.OPEN, Study.Status.CLOSED):
        return study.status  # subjects hold plans built from the current results
    links = StudySystem.objects.filter(study=study).select_related("system").order_by("label")
    if not links:
        return _fail_study(study_id, "The study has no systems to compare.")
    steps = []
    for link in links:
        system = link.system
        if system.collection_id != study.collection_id:
            return _fail_study(study_id, f"{system.name} belongs to another collection.")
        if system.kind == System.Kind.EXTERNAL:
            if system.results.exists():
                continue
            if not system.embeddings:
                return _fail_study(study_id, f"{system.name}: upload its results or embeddings.")
            steps.append((gpu_search, system.pk))
            continue
        if system.status == System.Status.READY and system.results.exists():
            continue
        if system.status != System.Status.READY or not system.embeddings:
            steps.append((gpu_train_system, system.pk))
        steps.append((gpu_search, system.pk))
    if problem := _design_problem(study):  # before hours of training, not after
        return _fail_study(study_id, problem)
    with transaction.atomic():
        study = Study.objects.select_for_update().get(pk=study_id)
        if study.status in (Study.Status.OPEN, Study.Status.CLOSED):  # opened meanwhile
            return study.status
        study.status, study.progress = Study.Status.PREPARING, 0.0
        study.message, study.preparation = f"Queued {len(steps)} steps", study.preparation + 1
        study.progress_at = timezone.now()
        study.save(update_fields=["status", "progress", "message", "preparation", "progress_at"])
    at_work = {"study_id": study_id, "preparation": study.preparation}
    signatures = [
        task.si(system_id, step=(i, len(steps)), **at_work)
        for i, (task, system_id) in enumerate(steps)
    ]
    first, *then = [*signatures, finish_study.si(**at_work)]
    if then:  # finish_study takes none
        first.kwargs["then"] = then
    return first


def _send_next(then, study_id: int | None, preparation: int | None) -> None:
    """Send the next of a preparation's steps (`then`: the rest, in order) as one ends well.

    Not Celery's chain: it sends the next step after the task has returned, and where Redis
    stays away longer than the publish retries (~40 s) it gives up in a log line, leaving the
    study preparing for ever. Here the study is marked failed, with what to do.
    """
    if not then:
        return
    step, *rest = then
    step = signature(step)
    if rest:
        step.kwargs["then"] = rest
    try:
        step.apply_async()
    except Exception as error:
        if step.app.conf.task_always_eager:  # run here, not sent: the step's own failure
            raise
        _fail_study(
            study_id,
            f"The next step could not be queued ({type(error).__name__}: {error}): Redis "
            "(REDIS_URL) did not answer. Prepare the study again: what is done is kept.",
            _preparing(study_id, preparation),
        )
        raise


def _design_problem(study: Study) -> str | None:
    """What makes the study impossible whatever its systems find: too few test pairs, a bad
    comparison, test items of unequal lengths; None when nothing does."""
    from experiments.plans import PlanError
    from experiments.subjects import check_study_design

    try:
        check_study_design(study)
        return unequal_item_lengths(served_items(study.collection_id))
    except (PlanError, MediaError) as error:
        return str(error)


@shared_task
def finish_study(study_id: int, preparation: int | None = None):
    """Mark the study ready once a first subject's plan can be built from its results; a
    study that cannot be (unequal or unreadable items, no plan) is marked failed with why.
    A study no longer in this preparation (`preparation`, or any while it is preparing) is
    left as it is."""
    return with_database_retries(
        lambda: _finish_study(study_id, preparation), f"finishing study {study_id}"
    )


def _finish_study(study_id: int, preparation: int | None):
    from experiments.plans import PlanError
    from experiments.subjects import check_study_design, plan_for

    at_work = _preparing(study_id, preparation)
    study = at_work.first()
    if study is None:
        return Study.objects.values_list("status", flat=True).get(pk=study_id)
    try:
        served = served_items(study.collection_id)
        if problem := unequal_item_lengths(served):
            return _fail_study(study_id, problem, at_work)
        if study.attention_checks and study.catch_count:
            ensure_catch_pair(study.collection_id, served)
        plan = plan_for(study, ordinal=0)
        note = check_study_design(study)
    except (PlanError, MediaError) as error:
        return _fail_study(study_id, str(error), at_work)
    except DATABASE_ERRORS:
        raise  # tried again
    except Exception as error:  # not left "preparing" for ever: say what broke, then raise
        _fail_study(study_id, f"{type(error).__name__}: {error}", at_work)
        raise
    at_work.update(
        status=Study.Status.READY,
        progress=1.0,
        message=f"Ready: {len(plan)} questions per subject" + (f". Note: {note}." if note else ""),
    )
    return Study.Status.READY


CATCH_KEY = "__catch__"
# Test items' lengths may differ by this much: what encoders round (a video frame, an AAC
# frame), not what a player's clock shows (an audit told ground truths from others by length
# with a 1 s allowance).
ITEM_LENGTH_SPREAD_S = 0.1


@dataclass(frozen=True)
class ServedItem:
    kind: str  # "video" or "music"
    info: MediaInfo
    size: int  # bytes


def served_items(collection_id: int) -> list[ServedItem]:
    """The collection's ready test items, videos and music, as served (probed, sized);
    MediaError names a pair whose file is missing or unreadable."""
    items = []
    pairs = Pair.objects.filter(collection_id=collection_id, split=Split.TEST, status="ready")
    for pair in pairs.only("key", "video_file", "music_file"):
        for kind, item in (("video", pair.video_file), ("music", pair.music_file)):
            if not item:
                continue
            try:
                items.append(ServedItem(kind, probe(item.path), os.path.getsize(item.path)))
            except (MediaError, OSError) as error:
                raise MediaError(f"test pair {pair.key}: {error}") from error
    return items


def unequal_item_lengths(served: list[ServedItem]) -> str | None:
    """Why the test items' lengths would give answers away, or None when they do not.

    An item is the centred clip of its music video, or the whole file when that is shorter:
    then a query and its ground truth (cut from the same file) last equally long, and a
    player's clock shows it beside an unrelated candidate of another length.
    """
    lengths = [item.info.duration_s for item in served]
    if not lengths or max(lengths) - min(lengths) <= ITEM_LENGTH_SPREAD_S:
        return None
    return (
        f"The test items last {min(lengths):.1f} to {max(lengths):.1f} s: a candidate as long "
        "as its query would give the match away. Import it into a new collection with clips "
        f"of {np.floor(min(lengths) * 10) / 10:g} s (`--clip-seconds`, or the upload's clip "
        "length), every item cut to the shortest length, or leave the shorter videos out."
    )


def ensure_catch_pair(collection_id: int, served: list[ServedItem] | None = None) -> Pair:
    """The collection's broken pair (split 'catch') for attention checks, made once.

    Its video is black and frozen and its music silent, so its wrong answer is plain to
    anyone who plays it; nothing else tells it apart before it plays: it lasts as long as the
    collection's test items as served (their median), its video has their frame size and
    rate, and each file is as large as theirs (a bot skipped the tiny catch files, unplayed).
    """
    pair, _ = Pair.objects.get_or_create(
        collection_id=collection_id,
        key=CATCH_KEY,
        defaults={"split": Split.CATCH, "title": "Attention check (broken media)"},
    )
    if pair.status == Pair.Status.READY and pair.video_file and pair.music_file:
        return pair
    if served is None:  # not probed by the caller yet
        served = served_items(collection_id)
    videos = [item for item in served if item.kind == "video"]
    music = [item for item in served if item.kind == "music"]
    lengths = [item.info.duration_s for item in served]
    seconds = float(np.clip(np.median(lengths), 1.0, CLIP_S)) if lengths else CLIP_S
    look = Counter((v.info.width, v.info.height, round(v.info.fps or 25, 3)) for v in videos)
    width, height, fps = look.most_common(1)[0][0] if look else (320, 180, 10)
    folder = Path(settings.MEDIA_ROOT) / "items"
    folder.mkdir(parents=True, exist_ok=True)
    video, audio = folder / f"catch-{collection_id}.mp4", folder / f"catch-{collection_id}.m4a"
    broken_items(video, audio, seconds, (width, height), fps, sizes=(
        int(np.median([v.size for v in videos])) if videos else 0,
        int(np.median([m.size for m in music])) if music else 0,
    ))  # fmt: skip
    pair.video_file.name = str(video.relative_to(settings.MEDIA_ROOT))
    pair.music_file.name = str(audio.relative_to(settings.MEDIA_ROOT))
    pair.split, pair.status, pair.duration_s, pair.error = (
        Split.CATCH,
        Pair.Status.READY,
        seconds,
        "",
    )
    pair.save()
    return pair


def celery_problem(queues, timeout: float = 1.0) -> str | None:
    """Why tasks sent to `queues` would not run now (no broker, or no worker consuming one of
    them), as a sentence for the researcher; None when they would, or run in-process."""
    from kombu.utils.url import maybe_sanitize_url

    from study_site.celery import app, redis_answers

    if app.conf.task_always_eager:
        return None
    if not redis_answers(app.conf.broker_url):
        return (
            f"Redis (the Celery broker) does not answer at "
            f"{maybe_sanitize_url(app.conf.broker_url)}: start it (`redis-server`) or set "
            "REDIS_URL; without Redis, CELERY_ALWAYS_EAGER=1 runs tasks in the process that "
            "sends them"
        )
    if queues and (missing := queues_without_workers(queues, timeout)):
        return (
            f"No Celery worker consumes the {' and '.join(missing)} queue: start one (`make "
            "worker`; one just started takes up to a minute to say it is ready)"
        )
    return None


def queues_without_workers(queues, timeout: float = 1.0) -> list[str]:
    """Those of `queues` that no worker consumes (none in eager mode; all without a broker):
    tasks sent there would wait for ever."""
    from kombu.exceptions import OperationalError as NoBroker
    from redis.exceptions import RedisError

    from study_site.celery import app

    if app.conf.task_always_eager:
        return []
    try:
        replies = app.control.inspect(timeout=timeout).active_queues() or {}
    except (NoBroker, RedisError):  # no broker, or one that restarted under the connection
        return list(queues)
    consumed = {queue["name"] for found in replies.values() for queue in found}
    return [queue for queue in queues if queue not in consumed]


def tasks_lost(results, queue: str) -> bool:
    """Whether none of these tasks, sent to `queue`, can run any more: none has a result, no
    worker holds one (running or reserved) and the queue is empty (a broker restarted
    without it)."""
    from study_site.celery import app

    if any(result.ready() for result in results):
        return False
    inspect = app.control.inspect(timeout=1)
    found = [inspect.active() or {}, inspect.reserved() or {}]
    held = {task["id"] for replies in found for tasks in replies.values() for task in tasks}
    if held & {result.id for result in results}:
        return False
    with app.connection_for_write() as connection:
        return connection.default_channel.queue_declare(queue).message_count == 0


class Superseded(Exception):
    """The step's preparation is no longer at work, or its system changed since it began."""


def _this_generation(system: System):
    """The system, as a query, while it is as the step read it (not changed since)."""
    return System.objects.filter(pk=system.pk, generation=system.generation)


class _failing:
    """Mark the system (and the study being prepared) failed when the block raises; a step
    superseded (at its start or since) stops quietly, and its chain with it."""

    def __init__(self, system: System, study_id: int | None, preparation: int | None):
        self.system, self.study_id, self.preparation = system, study_id, preparation

    def __enter__(self):
        if self.study_id is not None and not _preparing(self.study_id, self.preparation).exists():
            logger.warning(
                "%s: not run, study %s's preparation %s ended",
                self.system, self.study_id, self.preparation,
            )  # fmt: skip
            raise Ignore()
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, Superseded):
            logger.warning("%s: stopped, %s", self.system, error)
            before = self.system  # as the step found it, unless it changed since
            with_database_retries(
                lambda: _this_generation(before).update(
                    status=before.status, progress=before.progress, message=before.message,
                    progress_at=before.progress_at,
                ),
                f"{before.name}: restoring it",
            )  # fmt: skip
            raise Ignore() from error  # the rest of the chain is not sent either
        if error is not None and isinstance(error, Exception):
            logger.exception("%s failed", self.system, exc_info=(kind, error, tb))
            message = f"{self.system.name}: {error}"
            if is_disk_full(error):  # torch says "unexpected pos 34816 vs 34768"
                message = (
                    f"{self.system.name}: no space left on the disk of MEDIA_ROOT "
                    f"({settings.MEDIA_ROOT}); free space and prepare again"
                )
            with_database_retries(
                lambda: _this_generation(self.system).update(
                    status=System.Status.FAILED, message=message
                ),
                f"{self.system.name}: marking it failed",
            )
            if self.study_id is not None:
                _fail_study(self.study_id, message, _preparing(self.study_id, self.preparation))
        return False  # re-raise: a chain stops at a failed step


def _reporter(system: System, study_id: int | None, step, preparation: int | None = None):
    """progress(fraction, message) for one step, written to the system and the study."""
    index, count = step

    def write(fraction: float, message: str):
        now = timezone.now()
        if study_id is not None and not _preparing(study_id, preparation).update(
            progress=(index + fraction) / max(count, 1),
            message=f"{system.name}: {message}",
            progress_at=now,
        ):
            raise Superseded(f"study {study_id}'s preparation {preparation} ended")
        if not _this_generation(system).update(
            status=System.Status.RUNNING, progress=fraction, message=message, progress_at=now
        ):
            raise Superseded(f"{system.name} was changed since the step began")

    def report(fraction: float, message: str):
        with_database_retries(lambda: write(fraction, message), f"{system.name}: progress")

    return report


def _fail_study(study_id: int, message: str, studies=None):
    """Mark the study failed (through `studies`, a query that may no longer find it)."""
    if studies is None:
        studies = Study.objects.filter(pk=study_id)
    with_database_retries(
        lambda: studies.update(status=Study.Status.FAILED, message=message),
        f"study {study_id}: marking it failed",
    )
    return Study.Status.FAILED


def _in_fixed_design(system: System) -> bool:
    """Whether a study's fixed design holds the system: then a task sent before it opened, or
    delivered again after a worker died, leaves its checkpoint and results alone (new
    subjects' plans are drawn from them)."""
    serving = Q(status__in=[Study.Status.OPEN, Study.Status.CLOSED]) | Q(subjects__isnull=False)
    if locked := list(system.studies.filter(serving).distinct()):
        logger.warning(
            "%s: not trained or searched again, it is in the fixed design of %s",
            system.name, ", ".join(map(str, locked)),
        )  # fmt: skip
    return bool(locked)


def _preparing(study_id: int, preparation: int | None = None):
    """The study, as a query, while it is preparing (in preparation number `preparation`)."""
    studies = Study.objects.filter(pk=study_id, status=Study.Status.PREPARING)
    return studies if preparation is None else studies.filter(preparation=preparation)


def recall_summary(metrics: dict) -> str:
    """'R@10 V2M 0.420, M2V 0.380' from evaluate()'s {'V2M': {'R@10': …}, …}."""
    recalls = [
        f"{d} {metrics[d]['R@10']:.3f}" for d in ("V2M", "M2V") if "R@10" in metrics.get(d, {})
    ]
    return "R@10 " + ", ".join(recalls) if recalls else "evaluated"


def _json_safe(value):
    """Metrics as plain JSON (numpy scalars and arrays become numbers and lists)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return value
