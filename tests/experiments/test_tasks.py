"""Study preparation through a real Celery worker and Redis: train, search, ready; failures.

The collection's features are generated with a planted relation (a hidden 4-d value drives
both the frame features and the music features), so that a trained system has something to
find and its search results are not noise; extracting features from 30 real clips would cost
a minute here and is covered, pair by pair, by test_ingest.
"""

import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from celery.exceptions import Ignore
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.management import CommandError, call_command

from experiments.models import (
    Collection,
    Pair,
    SearchResult,
    Split,
    Study,
    StudySystem,
    System,
)
from experiments.subjects import create_subject
from experiments.tasks import (
    celery_problem,
    finish_study,
    gpu_search,
    gpu_train_system,
    import_pair,
    prepare_study,
    queues_without_workers,
)
from study_site.celery import app

from .clips import music_video
from .factories import make_collection as make_media_collection

pytestmark = pytest.mark.django_db(transaction=True)
SPLITS = [Split.TRAIN] * 18 + [Split.VAL] * 4 + [Split.TEST] * 8


def make_collection(name="planted"):
    rng = np.random.default_rng(0)
    to_frames, to_music = rng.normal(size=(4, 1280)), rng.normal(size=(4, 1140))
    collection = Collection.objects.create(name=name)
    for i, split in enumerate(SPLITS):
        z = rng.normal(size=4)
        buffer = io.BytesIO()
        np.savez(
            buffer,
            frames=np.abs(z @ to_frames + 0.3 * rng.normal(size=(3, 1280))).astype(np.float32),
            music=(z @ to_music + 0.3 * rng.normal(size=1140)).astype(np.float32),
        )
        pair = Pair(collection=collection, key=f"p{i:02d}", split=split, status="ready")
        pair.features_file.save(f"{name}-{i}.npz", ContentFile(buffer.getvalue()), save=False)
        pair.save()
    return collection


def make_study(collection, config, slug="prep", per_type=2, kind="cca"):
    system = System.objects.create(collection=collection, name=slug, kind=kind, config=config)
    study = Study.objects.create(name=slug, slug=slug, collection=collection, per_type=per_type)
    StudySystem.objects.create(study=study, system=system, label="S")
    return study, system


def wait_for(study, worker, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        study.refresh_from_db()
        if study.status in (Study.Status.READY, Study.Status.FAILED):
            return study
        time.sleep(0.2)
    pytest.fail(f"study stuck at {study.status} {study.message}:\n{worker.output()[-3000:]}")


def test_engine_tasks_go_to_the_gpu_queue():
    route = app.amqp.router.route
    assert route({}, "experiments.tasks.gpu_train_system")["queue"].name == "gpu"
    assert route({}, "experiments.tasks.gpu_search")["queue"].name == "gpu"
    assert route({}, "experiments.tasks.import_pair")["queue"].name == "gpu"  # the CNN
    assert route({}, "experiments.tasks.prepare_study")["queue"].name == "default"


def test_a_queue_no_worker_consumes_is_named(celery_worker):
    assert queues_without_workers(["default", "gpu"], timeout=5) == []
    assert queues_without_workers(["gpu", "elsewhere"], timeout=5) == ["elsewhere"]
    assert celery_problem(["default", "gpu"], timeout=5) is None
    problem = celery_problem(["gpu", "elsewhere"], timeout=5)
    assert problem.startswith("No Celery worker consumes the elsewhere queue")


def test_without_redis_the_commands_say_so_and_how_to_do_without(monkeypatch, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setitem(app.conf, "broker_url", f"redis://:secret@127.0.0.1:{port}/0")
    monkeypatch.setitem(app.conf, "task_always_eager", False)
    problem = celery_problem(["gpu"])
    assert f"does not answer at redis://:**@127.0.0.1:{port}/0" in problem  # no password shown
    assert "CELERY_ALWAYS_EAGER=1" in problem
    music_video(tmp_path / "song.mp4", 1, seconds=2.0)
    with pytest.raises(CommandError, match="does not answer at .*or import with --sync"):
        call_command("import_collection", "c", str(tmp_path), stdout=io.StringIO())
    assert not Collection.objects.exists()
    study, _ = make_study(make_collection(), {}, slug="s")
    with pytest.raises(CommandError, match="does not answer at"):
        call_command("prepare_study", "s", stdout=io.StringIO())
    assert Study.objects.get(pk=study.pk).status == Study.Status.DRAFT
    monkeypatch.setitem(app.conf, "task_always_eager", True)  # in-process: nothing to reach
    assert celery_problem(["gpu"]) is None


def test_preparing_a_study_trains_searches_and_makes_it_ready(celery_worker):
    collection = make_collection()
    study, system = make_study(collection, {"n_components": 4})
    prepare_study.delay(study.pk).get(timeout=60)
    study = wait_for(study, celery_worker)
    assert (study.status, study.progress) == (Study.Status.READY, 1.0), study.message
    assert study.message == (
        "Ready: 12 questions per subject. Note: 8 test pairs for 6 queries a block: subjects "
        "meet items again, and remembering them can hint at the ground truth; 60 or more test "
        "pairs avoid most of it."
    )

    system.refresh_from_db()
    assert system.status == System.Status.READY and system.progress == 1.0
    assert system.checkpoint.name.startswith("systems/") and system.checkpoint.storage.exists(
        system.checkpoint.name
    )
    test_keys = sorted(collection.pairs.filter(split=Split.TEST).values_list("key", flat=True))
    with np.load(system.embeddings.path) as embeddings:
        assert list(embeddings["keys"]) == test_keys
        assert embeddings["video"].shape == embeddings["music"].shape
        norms = np.linalg.norm(embeddings["video"], axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-4)
    test = system.metrics["test"]
    assert test["n"] == 8 and test["V2M"]["R@10"] == 1.0  # 8 test pairs: all within 10
    assert test["V2M"]["R@1"] + test["M2V"]["R@1"] > 2 * test["chance"]["R@1"]  # planted relation
    assert "R@10 V2M" in system.message

    # Every test query, both directions, ranks 1..8 over the 8 test pairs.
    results = SearchResult.objects.filter(system=system)
    assert results.count() == 8 * 2 * 8
    for direction in ("V2M", "M2V"):
        ranked = results.filter(direction=direction, query__key="p22").order_by("rank")
        assert [r.rank for r in ranked] == list(range(1, 9))
        assert sorted(r.result.key for r in ranked) == test_keys
        scores = [r.score for r in ranked]
        assert scores == sorted(scores, reverse=True)

    # Searching again replaces the results instead of adding to them.
    assert gpu_search.delay(system.pk).get(timeout=60) == 128
    assert SearchResult.objects.filter(system=system).count() == 128

    # Subjects now get plans from those results, with the machine's answers.
    subject = create_subject(study)
    questions = list(subject.questions.all())
    assert len(questions) == 12 and all(set(q.machine) == {"S"} for q in questions)

    # A study asking more than the collection holds fails with the reason; systems stay ready.
    Study.objects.filter(pk=study.pk).update(per_type=3, status=Study.Status.DRAFT)
    prepare_study.delay(study.pk).get(timeout=60)
    study = wait_for(study, celery_worker)
    assert study.status == Study.Status.FAILED
    assert "too small" in study.message and "only 8" in study.message


def test_a_failing_training_fails_the_system_and_the_study(celery_worker):
    study, system = make_study(make_collection("bad"), {"no_such_option": 1}, slug="bad")
    prepare_study.delay(study.pk).get(timeout=60)
    study = wait_for(study, celery_worker)
    system.refresh_from_db()
    assert study.status == Study.Status.FAILED and system.status == System.Status.FAILED
    assert "unknown config keys" in study.message and "no_such_option" in system.message


def test_a_pair_is_imported_by_the_worker(celery_worker, tmp_path):
    collection = Collection.objects.create(name="worker")
    good = Pair.objects.create(
        collection=collection, key="good", source_video=str(music_video(tmp_path / "g.mp4", 1))
    )
    bad = Pair.objects.create(
        collection=collection,
        key="mute",
        source_video=str(music_video(tmp_path / "m.mp4", 2, audio=False)),
    )
    assert import_pair.delay(good.pk).get(timeout=120) == "ready"
    assert import_pair.delay(bad.pk).get(timeout=60) == "failed"
    bad.refresh_from_db()
    assert bad.error == "m.mp4: no audio track"
    assert import_pair.delay(good.pk).get(timeout=60) == "ready"  # done already: skipped


def test_a_redelivered_import_leaves_a_ready_pair_and_its_media_alone(tmp_path):
    """A task delivered again must not rewrite the media of a live study's pair."""
    pair = make_media_collection(n_pairs=1, name="live").pairs.get()
    pair.source_video = str(music_video(tmp_path / "source.mp4", 3))  # could be re-made
    pair.save()
    before = {
        field: (getattr(pair, field).name, getattr(pair, field).path)
        for field in ("video_file", "music_file")
    }
    mtimes = {field: os.stat(path).st_mtime_ns for field, (_, path) in before.items()}
    assert import_pair(pair.pk) == "ready"
    pair.refresh_from_db()
    assert pair.status == Pair.Status.READY
    assert {f: (getattr(pair, f).name, getattr(pair, f).path) for f in before} == before
    assert {field: os.stat(path).st_mtime_ns for field, (_, path) in before.items()} == mtimes


def test_a_chain_no_longer_at_work_leaves_its_study_and_systems_alone():
    """The steps of an earlier preparation (the study prepared again), or of one that went
    back to draft, do nothing: no training, no progress, no failure, no ready study."""
    study, system = make_study(make_collection(), {"n_components": 4})
    Study.objects.filter(pk=study.pk).update(status=Study.Status.PREPARING, preparation=2)
    with pytest.raises(Ignore):  # the rest of its chain is not sent
        gpu_train_system(system.pk, study_id=study.pk, step=(0, 2), preparation=1)
    with pytest.raises(Ignore):
        gpu_search(system.pk, study_id=study.pk, step=(1, 2), preparation=1)
    assert finish_study(study.pk, preparation=1) == Study.Status.PREPARING
    study.refresh_from_db()
    assert (study.status, study.progress, study.message) == (Study.Status.PREPARING, 0.0, "")
    system.refresh_from_db()
    assert (study.progress_at, system.progress_at, system.status) == (None, None, "new")
    gpu_train_system(system.pk, study_id=study.pk, step=(0, 2), preparation=2)
    gpu_search(system.pk, study_id=study.pk, step=(1, 2), preparation=2)
    assert finish_study(study.pk, preparation=2) == Study.Status.READY

    Study.objects.filter(pk=study.pk).update(status=Study.Status.DRAFT, message="Back to draft")
    System.objects.filter(pk=system.pk).update(embeddings="")
    with pytest.raises(Ignore):  # not "no embeddings": it does not run at all
        gpu_search(system.pk, study_id=study.pk, step=(1, 2))
    assert finish_study(study.pk) == Study.Status.DRAFT
    study.refresh_from_db()
    assert (study.status, study.message) == (Study.Status.DRAFT, "Back to draft")
    assert System.objects.get(pk=system.pk).status == System.Status.READY


def test_a_next_step_that_cannot_be_sent_fails_the_study_and_says_what_to_do(monkeypatch):
    """Celery's chain gave up sending the next step after ~40 s without Redis in a log line,
    and the study stayed preparing for ever."""
    from kombu.exceptions import OperationalError as BrokerError

    from experiments.tasks import _send_next

    study, system = make_study(make_collection(), {"n_components": 4})
    Study.objects.filter(pk=study.pk).update(status=Study.Status.PREPARING, preparation=1)
    sent = []
    monkeypatch.setattr("celery.canvas.Signature.apply_async", lambda step: sent.append(step))
    then = [gpu_search.si(system.pk, study_id=study.pk, preparation=1), finish_study.si()]
    _send_next(then, study.pk, 1)
    _send_next(then[1:], study.pk, 1)
    assert [step.task for step in sent] == [
        "experiments.tasks.gpu_search",
        "experiments.tasks.finish_study",
    ]
    assert sent[0].kwargs["then"] == [finish_study.si()]  # the rest goes with it
    assert "then" not in sent[1].kwargs  # the last step takes none

    def unreachable(step):
        raise BrokerError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr("celery.canvas.Signature.apply_async", unreachable)
    with pytest.raises(BrokerError):
        _send_next(then, study.pk, 1)
    study.refresh_from_db()
    assert study.status == Study.Status.FAILED
    assert study.message.startswith("The next step could not be queued (OperationalError: ")
    assert study.message.endswith("Prepare the study again: what is done is kept.")


def test_a_preparation_with_nothing_to_train_or_search_only_finishes():
    from experiments.tasks import _planned

    from .factories import make_study as make_ready_study

    study = make_ready_study(status=Study.Status.DRAFT)  # its system has its results
    step = _planned(study.pk)
    assert (step.task, step.kwargs) == (
        "experiments.tasks.finish_study",
        {"study_id": study.pk, "preparation": 1},
    )
    assert step.apply().get() == Study.Status.READY


def test_training_stops_with_its_preparation_or_a_change_of_its_system(celery_worker, admin_client):
    """Back to draft stops the training at work at its next report, and a system changed
    since its training began keeps nothing of it: no status, metrics or files of the old
    settings (it used to end "ready" with them, and a study prepared again served them)."""
    collection = make_collection("changed")
    old = {"max_epochs": 20000, "patience": 20000, "batch_size": 8}
    study, system = make_study(collection, old, slug="changed", kind="vmnet")
    files = Path(settings.MEDIA_ROOT) / "systems"
    deadline = time.monotonic() + 150

    def wait(condition):
        while not condition():
            assert time.monotonic() < deadline, celery_worker.output()[-3000:]
            time.sleep(0.2)

    def training():
        return System.objects.get(pk=system.pk).progress > 0.0005  # some epochs trained

    prepare_study.delay(study.pk).get(timeout=60)
    wait(training)
    admin_client.post(
        "/admin/experiments/study/", {"action": "draft_studies", "_selected_action": [study.pk]}
    )
    wait(lambda: f"stopped, study {study.pk}'s preparation 1 ended" in celery_worker.output())
    system.refresh_from_db()
    assert (system.status, system.progress, system.metrics) == ("new", 0.0, {})
    assert not system.checkpoint and not list(files.glob(f"{system.pk}-*"))

    gpu_train_system.delay(system.pk)  # no study: as the demo trains its baselines
    wait(training)
    form = {"collection": collection.pk, "name": system.name, "kind": "vmnet"}
    new = {"max_epochs": 2, "batch_size": 8}
    changed = admin_client.post(
        f"/admin/experiments/system/{system.pk}/change/",
        {**form, "config": json.dumps(new), "initial-config": json.dumps(old)},
    )
    assert changed.status_code == 302
    wait(lambda: "stopped, changed was changed since the step began" in celery_worker.output())
    system.refresh_from_db()
    assert (system.status, system.generation, system.metrics) == ("new", 1, {})
    assert not system.checkpoint and not list(files.glob(f"{system.pk}-*"))

    prepare_study.delay(study.pk).get(timeout=60)
    study = wait_for(study, celery_worker)
    system.refresh_from_db()
    assert study.status == Study.Status.READY, study.message
    assert system.metrics["train_config"]["max_epochs"] == 2
    assert system.checkpoint.name == f"systems/{system.pk}-vmnet-1.pt"


def test_a_preparation_task_leaves_an_open_study_alone_and_refuses_another_collections_system():
    # A task queued before the study opened (or sent again) must not redo its systems' results
    # under the subjects' fixed plans.
    collection = make_collection("guarded")
    study, system = make_study(collection, {"n_components": 4}, slug="guarded")
    for status in (Study.Status.OPEN, Study.Status.CLOSED):
        Study.objects.filter(pk=study.pk).update(status=status, message="as it was")
        assert prepare_study(study.pk) == status
        study.refresh_from_db()
        assert (study.status, study.message) == (status, "as it was")
        assert System.objects.get(pk=system.pk).status == System.Status.NEW
    # Its training and search, sent again (a worker died), leave its results alone.
    Study.objects.filter(pk=study.pk).update(status=Study.Status.DRAFT)
    gpu_train_system(system.pk)
    gpu_search(system.pk)
    before = list(system.results.values_list("pk", "result_id"))
    Study.objects.filter(pk=study.pk).update(status=Study.Status.OPEN)
    gpu_train_system(system.pk, study_id=study.pk, step=(0, 2), preparation=1)
    assert gpu_search(system.pk, study_id=study.pk, step=(1, 2), preparation=1) is None
    assert list(system.results.values_list("pk", "result_id")) == before
    assert System.objects.get(pk=system.pk).status == System.Status.READY
    # A system of another collection cannot be searched among this one's pairs.
    elsewhere = System.objects.create(
        collection=make_collection("elsewhere"), name="elsewhere", kind="cca", config={}
    )
    StudySystem.objects.filter(study=study).update(system=elsewhere)
    Study.objects.filter(pk=study.pk).update(status=Study.Status.DRAFT)
    assert prepare_study(study.pk) == Study.Status.FAILED
    study.refresh_from_db()
    assert study.message == "elsewhere belongs to another collection."


def test_a_task_sent_while_redis_restarts_waits_for_it(tmp_path):
    """A preparation's next step is sent by the worker as a step ends: Celery's default (3
    tries within a second) lost it when Redis was restarting, and the preparation stalled."""
    import redis

    from study_site.celery import ping

    if not shutil.which("redis-server"):
        pytest.skip("no redis-server binary")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = []

    def restarted():
        time.sleep(2)  # down for 2 s, then back (empty: no persistence)
        started.append(subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL,
        ))  # fmt: skip

    thread = threading.Thread(target=restarted)
    thread.start()
    try:
        with app.connection_for_write(f"redis://127.0.0.1:{port}/0") as connection:
            ping.apply_async(("after a restart",), connection=connection)
        assert redis.Redis(port=port).llen("default") == 1  # sent, not lost
    finally:
        thread.join()
        for server in started:
            server.terminate()
            server.wait()


@pytest.mark.django_db(transaction=True)
def test_an_import_stops_waiting_for_tasks_that_were_lost(celery_worker, monkeypatch):
    """A broker restarted without its queue loses the tasks sent to it: waiting for them
    would never end. Lost: no result, no worker holds them, their queue is empty."""
    from celery.result import AsyncResult
    from kombu.utils.uuid import uuid

    from experiments.ingest import waited_for
    from experiments.tasks import tasks_lost
    from study_site.celery import ping

    queue = f"nobody-{uuid()}"  # a queue no worker reads: what is sent there stays
    never_sent = AsyncResult(uuid())
    assert tasks_lost([never_sent], queue)
    waiting = ping.apply_async(("queued",), queue=queue)
    assert not tasks_lost([waiting], queue)  # still queued: it may run
    with app.connection_for_write() as connection:
        connection.default_channel.queue_purge(queue)  # the broker restarts: lost
    assert tasks_lost([waiting], queue)
    monkeypatch.setattr("experiments.ingest.QUIET_S", 0)
    assert waited_for([never_sent], queue) == [never_sent]
    done = ping.delay("runs")  # a worker takes it: waited for, not lost
    assert waited_for([done], "default") == [] and done.get(timeout=10)["pong"] == "runs"
