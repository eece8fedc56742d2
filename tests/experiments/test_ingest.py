"""Importing real (generated) music videos: study media, features, per-file errors, re-runs."""

import errno
import io
import os
import subprocess
from collections import Counter
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from django.core.management import CommandError, call_command
from django.db import OperationalError, connection
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.features import MediaError
from engine.files import find_videos
from experiments import ingest, media
from experiments.ingest import (
    RESERVED_KEYS,
    ManifestError,
    add_pairs,
    assign_splits,
    import_collection,
    read_source,
    refill_places,
)
from experiments.models import Collection, Pair
from experiments.tasks import CATCH_KEY

from .clips import music_video, truncated
from .factories import at_once


def test_web_video_and_clip_are_streamable_small_and_centred(tmp_path):
    # A 40 s clip whose brightness tells the time: the web video must start at its centre.
    src = tmp_path / "timeline.mp4"
    with av.open(str(src), "w") as out:
        vs = out.add_stream("libx264", rate=2)
        vs.width, vs.height, vs.pix_fmt = 640, 720, "yuv420p"
        vs.options = {"preset": "ultrafast"}
        for n in range(80):
            frame = av.VideoFrame.from_ndarray(
                np.full((720, 640, 3), 3 * n, np.uint8), format="rgb24"
            )
            frame.pts, frame.time_base = n, Fraction(1, 2)
            out.mux(vs.encode(frame))
        out.mux(vs.encode(None))
    web = tmp_path / "web.mp4"
    start, length = media.clip_window(40.0, 10.0)
    assert (start, length) == (15.0, 10.0)
    media.web_video(src, web, start, length)
    data = web.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat"), "not faststart"
    with av.open(str(web)) as container:
        stream = container.streams.video[0]
        assert not container.streams.audio
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert (stream.codec_context.width, stream.codec_context.height) == (426, 480)
        first = next(container.decode(stream)).to_ndarray(format="rgb24")
    assert abs(first.mean() - 3 * 30) < 4  # frame 30 = 15 s
    assert media.probe(web).duration_s == pytest.approx(10.0, abs=0.6)


def test_audio_clip_is_aac_of_the_asked_length(tmp_path):
    src = music_video(tmp_path / "a.mp4", 1, seconds=3.0)
    clip = tmp_path / "a.m4a"
    media.audio_clip(src, clip, *media.clip_window(3.0, 2.0))
    info = media.probe(clip)
    assert not info.has_video and (info.sample_rate, info.channels) == (44100, 2)
    assert info.duration_s == pytest.approx(2.0, abs=0.05)
    with av.open(str(clip)) as container:
        assert container.streams.audio[0].codec_context.name == "aac"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "empty.mp4", "empty file"),
        (lambda d: (d / "text.mp4").write_text("not a video " * 50) and d / "text.mp4", "not a readable media file"),
        (lambda d: truncated(d / "cut.mp4", music_video(d / "whole.mp4", 2)), "not a readable media file"),
        (lambda d: music_video(d / "mute.mp4", 3, audio=False), "no audio track"),
        (lambda d: music_video(d / "blind.mp4", 4, video=False), "no video stream"),
        (lambda d: music_video(d / "silent.mp4", 5, silent=True), "silent"),
        (lambda d: d / "missing.mp4", "file not found"),
    ],
)  # fmt: skip
def test_unusable_files_give_clear_errors(tmp_path, make, message):
    (tmp_path / "empty.mp4").touch()
    with pytest.raises(MediaError, match=message):
        media.make_items(make(tmp_path), tmp_path / "v.mp4", tmp_path / "m.m4a")


def test_a_file_cut_after_its_header_is_reported_truncated(tmp_path):
    web = tmp_path / "web.mp4"  # faststart: the header survives, the media does not
    media.web_video(music_video(tmp_path / "long.mp4", 1, seconds=8.0), web)
    with pytest.raises(MediaError, match="truncated"):
        media.web_video(truncated(tmp_path / "cut.mp4", web, 0.5), tmp_path / "x.mp4")


def test_splits_are_seeded_and_exact():
    keys = [f"k{i}" for i in range(30)]
    splits = assign_splits(keys, test=8, val_fraction=4 / 30, seed=3)
    assert sorted(splits.values()).count("test") == 8
    assert list(splits.values()).count("val") == 4
    assert assign_splits(keys[::-1], test=8, val_fraction=4 / 30, seed=3) == splits
    assert assign_splits(keys, test=8, val_fraction=4 / 30, seed=4) != splits
    with pytest.raises(ManifestError, match="cannot take 31 test"):
        assign_splits(keys, test=31)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "videos"
    (root / "more").mkdir(parents=True)
    for i in range(3):
        music_video(root / ("more" if i == 2 else ".") / f"good{i}.mp4", i, seconds=3.0)
    (root / "notes.mp4").write_text("this is no video " * 40)
    truncated(root / "cut.mp4", music_video(tmp_path / "whole.mp4", 7, seconds=3.0))
    music_video(root / "mute.mp4", 8, audio=False)
    (root / "readme.txt").write_text("not imported")
    return root


@pytest.mark.django_db
def test_with_tasks_run_in_process_progress_shows_pair_by_pair(tmp_path, monkeypatch):
    from study_site.celery import app

    monkeypatch.setitem(app.conf, "task_always_eager", True)  # no Redis: the demo's fallback
    for i in range(3):
        music_video(tmp_path / f"good{i}.mp4", i, seconds=2.0)
    processed = []  # pairs done (not pending) each time progress is reported

    def progress(done, total):
        processed.append(Pair.objects.exclude(status=Pair.Status.PENDING).count())

    import_collection("eager", tmp_path, test=1, progress=progress)
    assert processed == [0, 1, 2, 3]


@pytest.mark.django_db
def test_broken_files_do_not_shrink_the_test_set(tmp_path):
    for i in range(3):
        music_video(tmp_path / f"good{i}.mp4", i, seconds=2.0)
    music_video(tmp_path / "mute.mp4", 8, audio=False)
    (tmp_path / "notes.mp4").write_text("this is no video " * 40)
    keys = ["good0", "good1", "good2", "mute", "notes"]
    # A seed that gives a broken file a test place.
    seed = next(
        s
        for s in range(100)
        if "test" in [assign_splits(keys, 3, val_fraction=0, seed=s)[k] for k in ("mute", "notes")]
    )
    summary = import_collection("c", tmp_path, test=3, val_fraction=0, seed=seed, sync=True)
    pairs = Collection.objects.get(name="c").pairs
    assert sorted(pairs.filter(split="test").values_list("key", flat=True)) == keys[:3]
    assert any("test places of" in note for note in summary.notes)
    # A manifest's own splits stay where it put them.
    (tmp_path / "m.csv").write_text("video,music,split\nmute.mp4,,test\ngood0.mp4,,train\n")
    summary = import_collection("m", tmp_path / "m.csv", sync=True)
    pairs = Collection.objects.get(name="m").pairs
    assert dict(pairs.values_list("key", "split")) == {"mute": "test", "good0": "train"}


@pytest.mark.django_db
def test_a_failed_pairs_test_place_goes_to_a_training_pair_never_a_validation_pair():
    collection = Collection.objects.create(name="refill")
    layout = {
        "bad0": ("test", "failed"), "bad1": ("test", "failed"), "bad2": ("test", "failed"),
        "ok": ("test", "ready"),
        "val0": ("val", "ready"), "val1": ("val", "ready"), "val2": ("val", "ready"),
        "train0": ("train", "ready"),
    }  # fmt: skip
    for key, (split, status) in layout.items():
        Pair.objects.create(collection=collection, key=key, split=split, status=status)
    assigned = {key: split for key, (split, _) in layout.items()}
    notes = refill_places(collection, assigned, seed=0)
    splits = dict(collection.pairs.values_list("key", "split"))
    assert [splits[f"val{i}"] for i in range(3)] == ["val", "val", "val"]
    assert splits["train0"] == "test" and splits["ok"] == "test"
    assert sorted(splits[f"bad{i}"] for i in range(3)) == ["test", "test", "train"]
    assert any("2 test place(s) held by failed pairs" in note for note in notes)


@pytest.mark.django_db
def test_importing_a_folder_makes_study_media_and_features_and_reports_bad_files(folder):
    seen = []
    summary = import_collection(
        "mv", folder, test=2, val_fraction=0.2, sync=True, progress=lambda d, t: seen.append(d)
    )
    assert (summary.total, summary.skipped, summary.ready) == (6, 0, 3)
    assert seen == list(range(7))
    assert dict(summary.failures).keys() == {"notes", "cut", "mute"}
    assert "mute.mp4: no audio track" in dict(summary.failures)["mute"]
    assert "not a readable media file" in dict(summary.failures)["notes"]
    collection = Collection.objects.get(name="mv")
    assert sorted(collection.pairs.values_list("split", flat=True)).count("test") == 2
    ready = collection.pairs.filter(status=Pair.Status.READY)
    assert sorted(ready.values_list("key", flat=True)) == ["good0", "good1", "more/good2"]
    for pair in ready:
        assert pair.duration_s == pytest.approx(3.0, abs=0.1) and not pair.error
        assert pair.video_token in pair.video_file.name and pair.music_token in pair.music_file.name
        video, music = media.probe(pair.video_file.path), media.probe(pair.music_file.path)
        assert video.has_video and not video.has_audio and music.has_audio and not music.has_video
        with np.load(pair.features_file.path) as features:
            assert features["music"].shape == (1140,)
            assert features["frames"].shape[0] == 3 and features["frames"].ndim == 2
            assert np.isfinite(features["music"]).all()

    # A re-run skips what is ready (same files), retries the failures, changes no split.
    files = {p.key: (p.video_file.name, p.features_file.name, p.split) for p in ready}
    again = import_collection("mv", folder, test=2, sync=True)
    assert (again.total, again.skipped, again.ready, len(again.failures)) == (6, 3, 3, 3)
    ready = collection.pairs.filter(status=Pair.Status.READY)
    assert {p.key: (p.video_file.name, p.features_file.name, p.split) for p in ready} == files


def test_manifest_paths_must_stay_inside_its_folder(tmp_path):
    (tmp_path / "m.csv").write_text(
        "video,music,split\nok.mp4,,test\n../secret.mp4,,\nb.mp4,/etc/passwd,\nc.mp4,,later\nok.mp4,,\n"
    )
    with pytest.raises(ManifestError) as error:
        read_source(tmp_path / "m.csv")
    for expected in ("row 3: video '../secret.mp4' lies outside", "row 4: music '/etc/passwd'",
                     "row 5: split 'later'", "row 6: video 'ok.mp4' repeats row 2"):  # fmt: skip
        assert expected in str(error.value)
    (tmp_path / "bad.csv").write_text("file,title\na.mp4,A\n")
    with pytest.raises(ManifestError, match="header must name"):
        read_source(tmp_path / "bad.csv")


@pytest.mark.django_db
def test_importing_a_manifest_of_separate_video_and_music(tmp_path):
    (tmp_path / "v").mkdir()
    music_video(tmp_path / "v" / "clip.mp4", 1, seconds=3.0, audio=False)
    music_video(tmp_path / "song.m4a", 2, seconds=3.0, video=False)
    (tmp_path / "pairs.csv").write_text(
        "video,music,title,genre,split\nv/clip.mp4,song.m4a,A song,pop,val\n"
    )
    summary = import_collection("manifest", tmp_path / "pairs.csv", sync=True)
    assert summary.ready == 1 and not summary.failures
    pair = Pair.objects.get(collection__name="manifest")
    assert (pair.key, pair.title, pair.genre, pair.split) == ("v/clip", "A song", "pop", "val")
    assert pair.source_music == str((tmp_path / "song.m4a").resolve())
    assert media.probe(pair.music_file.path).has_audio


# --- Re-imports, duplicate and reserved keys, symlinks (no media: pairs are stubs) ---------


def stub_files(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    return folder


@pytest.fixture
def instant(monkeypatch):
    """Processing without media: a pair whose video is `bad.mp4` fails, the others are ready."""

    def process_pair(pair, *settings):
        bad = pair.source_video.endswith("bad.mp4")
        pair.status = Pair.Status.FAILED if bad else Pair.Status.READY
        pair.error = "bad.mp4: broken" if bad else ""
        pair.save()
        return pair

    monkeypatch.setattr("experiments.tasks.process_pair", process_pair)


def splits_of(name):
    return dict(Pair.objects.filter(collection__name=name).values_list("key", "split"))


@pytest.mark.django_db
def test_files_with_the_same_name_but_another_extension_are_refused_naming_both(tmp_path):
    folder = stub_files(tmp_path / "v", "song.mp4", "other.mp4", "sub/a.mkv", "sub/a.MP4")
    with pytest.raises(ManifestError) as error:
        read_source(folder)
    assert "'sub/a.MP4' and 'sub/a.mkv'" in str(error.value) and "song" not in str(error.value)
    stub_files(folder, "song.webm")
    (folder / "sub" / "a.mkv").unlink()
    with pytest.raises(ManifestError, match="'song.mp4' and 'song.webm'"):
        read_source(folder)
    for _ in range(2):  # every re-run says the same and writes nothing
        with pytest.raises(ManifestError, match="same pair"):
            import_collection("dup", folder, sync=True)
        assert not Collection.objects.filter(name="dup").exists() and not Pair.objects.exists()


@pytest.mark.django_db
def test_a_failure_while_adding_pairs_writes_nothing(tmp_path, monkeypatch):
    folder = stub_files(tmp_path / "v", "a.mp4", "b.mp4", "c.mp4")
    monkeypatch.setattr(ingest, "BULK_ROWS", 1)  # a statement a pair
    inserts = []

    def disk_full_at_the_second_pair(execute, sql, params, many, context):
        if sql.startswith('INSERT INTO "experiments_pair"'):
            inserts.append(params)
            if len(inserts) == 2:
                raise RuntimeError("disk full")
        return execute(sql, params, many, context)

    full = connection.execute_wrapper(disk_full_at_the_second_pair)
    with full, pytest.raises(RuntimeError, match="disk full"):
        add_pairs("atomic", folder, test=1)
    assert len(inserts) == 2
    assert not Collection.objects.filter(name="atomic").exists() and not Pair.objects.exists()


def processing_fails(monkeypatch, error_for):
    """A pair's processing (in import_pair) raises `error_for(pair)` where that gives an error,
    else makes the pair ready; database errors are tried again without waiting."""

    def process_pair(pair, *settings):
        if (error := error_for(pair)) is not None:
            raise error
        pair.status = Pair.Status.READY
        pair.save()
        return pair

    monkeypatch.setattr("experiments.tasks.process_pair", process_pair)
    monkeypatch.setattr("experiments.tasks.DATABASE_RETRIES_S", (0,) * 5)


@pytest.mark.django_db(transaction=True)  # retried on a new connection, outside any transaction
def test_a_database_error_while_importing_is_retried_and_never_blamed_on_the_files(
    tmp_path, monkeypatch
):
    folder = stub_files(tmp_path / "v", "a.mp4", "b.mp4")
    busy = {"a": 2, "b": 99}  # times each pair's processing meets a locked database
    calls = []

    def locked(pair):
        calls.append(pair.key)
        if calls.count(pair.key) <= busy[pair.key]:
            return OperationalError("database is locked")

    processing_fails(monkeypatch, locked)
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError, match="1 of 2 pairs are still pending") as error:
        call_command("import_collection", "busy", str(folder), "--sync", stdout=out, stderr=err)
    assert error.value.returncode == 1
    assert "busy: 1 of 2 pairs ready, 0 failed, 1 still pending" in out.getvalue()
    assert calls.count("a") == 3 and calls.count("b") == 6  # retried 5 times
    statuses = dict(Pair.objects.values_list("key", "status"))
    assert statuses == {"a": Pair.Status.READY, "b": Pair.Status.PENDING}
    busy["b"] = 0  # the database is back: a re-run finishes the import
    call_command("import_collection", "busy", str(folder), "--sync", stdout=io.StringIO())
    assert Pair.objects.get(key="b").status == Pair.Status.READY


@pytest.mark.django_db
def test_pairs_left_pending_are_reported_by_their_error(tmp_path, monkeypatch):
    """A full disk leaves its pairs pending with why (experiments.tasks.import_pair): the
    command says so, and what to do, rather than blame a worker or the database."""
    folder = stub_files(tmp_path / "v", "a.mp4", "b.mp4", "c.mp4", "d.mp4")
    errors = {
        "a": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        "b": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        "c": OperationalError("database is locked"),
    }
    processing_fails(monkeypatch, lambda pair: errors.get(pair.key))
    with pytest.raises(CommandError) as error:
        call_command("import_collection", "full", str(folder), "--sync",
                     stdout=io.StringIO(), stderr=io.StringIO())  # fmt: skip
    assert str(error.value) == (
        '3 of 4 pairs are still pending: 2 with "not imported yet: [Errno 28] No space left on '
        'device"; 1 whose task did not finish (a worker stopped, or the database stayed busy); '
        "free space, then run the same command again: it processes only those."
    )
    assert error.value.returncode == 1


@pytest.mark.django_db(transaction=True)
def test_two_imports_adding_to_one_collection_at_once_both_succeed(tmp_path):
    """Each found the other's new pairs missing and added them too: PostgreSQL refused the
    second with a raw IntegrityError (pair_key_unique)."""
    folder = stub_files(tmp_path / "v", *(f"k{i:02}.mp4" for i in range(8)))
    add_pairs("both", folder, test=2)
    stub_files(folder, *(f"k{i:02}.mp4" for i in range(8, 40)))
    errors = at_once(lambda: add_pairs("both", folder, test=2), 2)
    assert errors == [] and Pair.objects.filter(collection__name="both").count() == 40


@pytest.mark.django_db
def test_a_reimport_keeps_the_asked_number_of_test_and_validation_pairs(tmp_path):
    folder = stub_files(tmp_path / "v", *(f"k{i:02}.mp4" for i in range(20)))
    add_pairs("S", folder, test=4)  # val: round(0.1 * 20) = 2
    first = splits_of("S")
    assert Counter(first.values()) == {"train": 14, "test": 4, "val": 2}
    stub_files(folder, *(f"k{i:02}.mp4" for i in range(20, 30)))
    add_pairs("S", folder, test=4)  # val: round(0.1 * 30) = 3, one of them new
    again = splits_of("S")
    assert Counter(again.values()) == {"train": 23, "test": 4, "val": 3}
    assert {k: again[k] for k in first} == first  # existing pairs keep theirs

    # Reproducible, and drawn by key: the same steps give the same splits; the new pairs'
    # places do not depend on the order (or the folder) the keys come in.
    other = stub_files(tmp_path / "w", *(f"k{i:02}.mp4" for i in range(20)))
    add_pairs("T", other, test=4)
    stub_files(other, *(f"k{i:02}.mp4" for i in range(29, 19, -1)))
    add_pairs("T", other, test=4)
    assert splits_of("T") == again
    placed = first
    new = [f"k{i:02}" for i in range(20, 30)]
    assert assign_splits(new, 4, placed=placed) == assign_splits(new[::-1], 4, placed=placed)
    assert assign_splits(new, 4, placed=placed) == {k: again[k] for k in new}


@pytest.mark.django_db
def test_manifest_rows_naming_their_split_count_toward_the_asked_number(tmp_path):
    stub_files(tmp_path, *(f"v{i}.mp4" for i in range(10)))
    rows = [f"v{i}.mp4,,{'test' if i < 2 else 'val' if i == 2 else ''}" for i in range(10)]
    (tmp_path / "m.csv").write_text("video,music,split\n" + "\n".join(rows) + "\n")
    add_pairs("M", tmp_path / "m.csv", test=3, val_fraction=0.2)
    splits = splits_of("M")
    assert Counter(splits.values()) == {"test": 3, "val": 2, "train": 5}
    assert [splits[f"v{i}"] for i in range(3)] == ["test", "test", "val"]


@pytest.mark.django_db
def test_a_reimport_reports_ready_pairs_whose_files_changed_and_keeps_them(tmp_path, instant):
    stub_files(tmp_path, "v1.mp4", "v2.mp4", "v3.mp4", "songA.m4a", "songB.m4a")
    m = tmp_path / "m.csv"
    m.write_text("video,music,split\nv1.mp4,songA.m4a,test\nv2.mp4,songB.m4a,train\nv3.mp4,,\n")
    first = import_collection("C", m, sync=True)
    assert (first.ready, first.changed) == (3, [])
    before = list(Pair.objects.values_list("key", "source_video", "source_music", "split"))
    m.write_text("video,music,split\nv1.mp4,songB.m4a,\nv2.mp4,songA.m4a,test\nv3.mp4,,\n")
    again = import_collection("C", m, sync=True)
    assert (again.total, again.skipped, again.ready) == (3, 3, 3)
    assert list(Pair.objects.values_list("key", "source_video", "source_music", "split")) == before
    changed = dict(again.changed)
    assert changed.keys() == {"v1", "v2"}
    assert "music songA.m4a, now songB.m4a" in changed["v1"]
    assert (
        "split train, now test" in changed["v2"]
        and "music songB.m4a, now songA.m4a" in changed["v2"]
    )

    out, err = io.StringIO(), io.StringIO()
    call_command("import_collection", "C", str(m), "--sync", stdout=out, stderr=err)
    assert (
        "v1: already imported from other files (music songA.m4a, now songB.m4a); "
        "import into a new collection to use the new ones" in err.getvalue()
    )
    assert (
        "C: 3 of 3 pairs ready, 0 failed, 3 already imported, 2 not updated (see above)"
        in out.getvalue()
    )
    assert "apply to new pairs only" not in out.getvalue()  # none given
    out = io.StringIO()
    call_command("import_collection", "C", str(m), "--sync", "--seed", "3", stdout=out, stderr=err)
    assert "apply to new pairs only: the 3 already imported keep their split" in out.getvalue()
    # Its pairs are made alike: other clips or features are refused, naming the collection's.
    with pytest.raises(CommandError, match=r"C was imported with clip_s 29.12, not 10.0"):
        call_command("import_collection", "C", str(m), "--sync", "--clip-seconds", "10", stdout=out)
    assert Collection.objects.get(name="C").import_settings == {
        "clip_s": 29.12, "encoder": "efficientnet-lite0", "frame_size": None
    }  # fmt: skip


@pytest.mark.django_db
def test_a_collection_imported_before_its_settings_were_kept_must_be_given_them(tmp_path):
    """After an upgrade its settings are unknown ({}): the defaults would have made new pairs
    unlike its own (the demo's frames are 112 px), so they must be given, once."""
    stub_files(tmp_path, "v1.mp4", "v2.mp4")
    collection = add_pairs("old", tmp_path, test=1).collection
    collection.pairs.filter(key="v1").update(status=Pair.Status.READY)  # made by the old code
    stub_files(tmp_path, "v3.mp4")
    with pytest.raises(CommandError, match="old was imported before its import settings were"):
        call_command("import_collection", "old", str(tmp_path), "--sync", stdout=io.StringIO())
    assert Collection.objects.get(name="old").import_settings == {}
    assert not Pair.objects.filter(key="v3").exists()  # nothing written
    given = ["--clip-seconds", "10", "--encoder", "efficientnet-lite0", "--frame-size", "112"]
    with pytest.raises(CommandError, match="2 of 3 pairs failed"):  # stubs, not videos
        call_command(
            "import_collection", "old", str(tmp_path), "--sync", *given, stdout=io.StringIO(),
            stderr=io.StringIO(),
        )  # fmt: skip
    assert Collection.objects.get(name="old").import_settings == {
        "clip_s": 10.0, "encoder": "efficientnet-lite0", "frame_size": 112
    }  # fmt: skip


@pytest.mark.django_db
def test_a_failed_pair_imported_again_from_other_files_takes_them(tmp_path, monkeypatch):
    def process_pair(pair, *settings):  # this source's videos have no sound of their own
        pair.status = Pair.Status.READY if pair.source_music else Pair.Status.FAILED
        pair.save()
        return pair

    monkeypatch.setattr("experiments.tasks.process_pair", process_pair)
    stub_files(tmp_path, "v1.mp4", "v2.mp4", "a.m4a", "b.m4a")
    m = tmp_path / "m.csv"
    m.write_text("video,music,title\nv1.mp4,,Old\nv2.mp4,b.m4a,\n")
    first = import_collection("F", m, sync=True)
    assert (first.ready, [key for key, _ in first.failures]) == (1, ["v1"])
    m.write_text("video,music,title\nv1.mp4,a.m4a,New\nv2.mp4,b.m4a,\n")
    again = import_collection("F", m, sync=True)
    assert (again.ready, again.failures, again.skipped) == (2, [], 1)
    pair = Pair.objects.get(key="v1")
    assert (Path(pair.source_music).name, pair.title, pair.status) == ("a.m4a", "New", "ready")


def test_the_catch_split_and_key_are_refused(tmp_path):
    assert CATCH_KEY in RESERVED_KEYS
    stub_files(tmp_path, "a.mp4", "b.mp4", "__catch__.mp4")
    (tmp_path / "m.csv").write_text(
        "video,music,split\na.mp4,,catch\nb.mp4,,holdout\n__catch__.mp4,,\n"
    )
    with pytest.raises(ManifestError) as error:
        read_source(tmp_path / "m.csv")
    message = str(error.value)
    assert "row 2: split 'catch' is reserved for the platform's attention-check pair" in message
    assert "row 3: split 'holdout' is not one of train, val, test;" in message
    assert "row 4: key '__catch__' is reserved" in message
    with pytest.raises(ManifestError, match="'__catch__.mp4': the key '__catch__' is reserved"):
        read_source(tmp_path)


@pytest.mark.django_db
def test_the_summary_counts_only_the_pairs_of_this_source(tmp_path, instant):
    made = {"clip_s": 29.12, "encoder": "efficientnet-lite0", "frame_size": None}
    collection = Collection.objects.create(name="mixed", import_settings=made)
    Pair.objects.create(collection=collection, key="__catch__", split="catch", status="ready")
    Pair.objects.create(collection=collection, key="elsewhere", status="ready")
    Pair.objects.create(collection=collection, key="gone", status="failed", error="old")
    folder = stub_files(tmp_path / "v", "a.mp4", "b.mp4", "c.mp4", "bad.mp4")
    summary = import_collection("mixed", folder, test=1, sync=True)
    assert (summary.total, summary.skipped, summary.ready) == (4, 0, 3)
    assert summary.failures == [("bad", "bad.mp4: broken")]
    assert collection.pairs.filter(split="catch").count() == 1


@pytest.mark.django_db
def test_manifest_paths_may_go_through_a_symlinked_folder(tmp_path):
    stub_files(tmp_path / "data", "a.mp4", "b.mp4")
    project = tmp_path / "project"
    project.mkdir()
    (project / "videos").symlink_to(tmp_path / "data", target_is_directory=True)
    (project / "m.csv").write_text("video,music\nvideos/a.mp4,videos/./b.mp4\n")
    [item] = read_source(project / "m.csv")
    assert (item.key, item.video, item.music) == (
        "videos/a",
        project / "videos" / "a.mp4",
        project / "videos" / "b.mp4",
    )
    escapes = ["videos/../../data/a.mp4", "../data/a.mp4", str(tmp_path / "data" / "a.mp4")]
    (project / "bad.csv").write_text("video,music\n" + "\n".join(f"{e}," for e in escapes))
    with pytest.raises(ManifestError) as error:
        read_source(project / "bad.csv")
    for row, escape in enumerate(escapes, start=2):
        assert f"row {row}: video {escape!r} lies outside the manifest's folder" in str(error.value)


@pytest.fixture
def small_disk(tmp_path, settings):
    """MEDIA_ROOT on a real filesystem of 48 KiB, which a pair's files overflow."""
    media_root = tmp_path / "media"
    media_root.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(media_root)],
                      capture_output=True).returncode:  # fmt: skip
        pytest.skip("mounting a tmpfs needs root")
    settings.MEDIA_ROOT = str(media_root)
    try:
        yield media_root
    finally:
        subprocess.run(["umount", "-l", str(media_root)], check=True)


@pytest.mark.django_db
def test_a_full_disk_leaves_pairs_pending_with_their_test_places_and_no_partial_files(
    tmp_path, small_disk
):
    sources = tmp_path / "sources"
    sources.mkdir()
    for i in range(2):
        music_video(sources / f"good{i}.mp4", i, seconds=3.0, size=(320, 240))
    with pytest.raises(CommandError, match="still pending"):
        call_command("import_collection", "full", str(sources), "--test", "1", "--sync",
                     stdout=io.StringIO(), stderr=io.StringIO())  # fmt: skip
    pairs = Collection.objects.get(name="full").pairs
    pending = pairs.filter(status=Pair.Status.PENDING)
    assert pending.exists() and not pairs.filter(status=Pair.Status.FAILED).exists()
    assert all("No space left on device" in p.error for p in pending)
    splits = dict(pairs.values_list("key", "split"))
    stored = {
        f.name for p in pairs.all() for f in (p.video_file, p.music_file, p.features_file) if f
    }
    on_disk = {str(p.relative_to(small_disk)) for p in small_disk.rglob("*") if p.is_file()}
    assert on_disk == stored  # the failed saves left nothing behind

    # Room again: the same command imports the rest, under the files' own names.
    subprocess.run(["umount", "-l", str(small_disk)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small_disk)], check=True)
    for pair in pairs.filter(status=Pair.Status.READY):  # what the small disk held is gone
        Pair.objects.filter(pk=pair.pk).update(status=Pair.Status.PENDING)
    call_command("import_collection", "full", str(sources), "--test", "1", "--sync",
                 stdout=io.StringIO(), stderr=io.StringIO())  # fmt: skip
    assert dict(pairs.values_list("key", "split")) == splits
    for pair in pairs.all():
        assert pair.status == Pair.Status.READY and not pair.error
        assert Path(pair.video_file.name).name == f"{pair.video_token}.mp4"


def test_the_engine_reads_the_files_a_collection_import_reads(tmp_path):
    """`python -m engine extract` and `import_collection` list a folder alike, so features
    extracted on another host cover the collection's pairs."""
    for name in ["a.mp4", "b/c.MPG", "d.ogv", "e.ts", "notes.txt", ".f.mp4", ".g/h.mp4"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "folder.mp4").mkdir()
    found = [p.relative_to(tmp_path).as_posix() for p in find_videos(tmp_path)]
    assert found == ["a.mp4", "b/c.MPG", "d.ogv", "e.ts"]
    keys = [item.key for item in ingest._read_folder(tmp_path)]
    assert keys == ["a", "b/c", "d", "e"]


@pytest.mark.django_db
def test_an_import_through_the_workers_watches_the_queue_its_tasks_are_sent_to(
    tmp_path, monkeypatch
):
    """Whether the tasks were lost is asked of the `gpu` queue, where `import_pair` goes (an
    empty `celery` queue would call every import lost once it was quiet for a while)."""
    from experiments.tasks import import_pair
    from study_site.celery import app

    monkeypatch.setitem(app.conf, "task_always_eager", False)
    sent, watched = [], []
    monkeypatch.setattr(import_pair, "delay", lambda *args: sent.append(args) or object())

    def waited_for(results, queue, progress=None):
        watched.append((len(results), queue))
        return []

    monkeypatch.setattr("experiments.ingest.waited_for", waited_for)
    folder = stub_files(tmp_path / "v", "a.mp4", "b.mp4", "c.mp4")
    summary = import_collection("queued", folder, test=1)
    assert len(sent) == 3 and summary.notes == []
    assert watched == [(3, "gpu")]


@pytest.mark.django_db(transaction=True)  # the command's own connection, as in production
def test_an_import_outlives_a_database_restart_while_it_waits_for_its_tasks(tmp_path, monkeypatch):
    """PostgreSQL restarting during the (long) wait drops the command's connection: the
    queries after the wait take a new one; a database still out of reach is a clear error."""
    from experiments.tasks import import_pair
    from study_site.celery import app

    monkeypatch.setitem(app.conf, "task_always_eager", False)
    monkeypatch.setattr(import_pair, "delay", lambda *args: object())
    command = "experiments.management.commands.import_collection"
    monkeypatch.setattr(f"{command}.celery_problem", lambda queues: None)

    def waited_for(results, queue, progress=None):
        Pair.objects.filter(collection__name="restarted").update(status=Pair.Status.READY)
        connection.connection.close()  # the server went away: this connection is dead
        return []

    monkeypatch.setattr("experiments.ingest.waited_for", waited_for)
    folder = stub_files(tmp_path / "v", "a.mp4", "b.mp4", "c.mp4")
    args = ("import_collection", "restarted", str(folder), "--test", "1")
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    assert "restarted: 3 of 3 pairs ready, 0 failed, 0 already imported" in out.getvalue()

    def unreachable(*args):
        raise OperationalError('connection to server at "db" failed: Connection refused')

    monkeypatch.setattr("experiments.ingest.refill_places", unreachable)
    with pytest.raises(CommandError) as error:
        call_command(*args, stdout=io.StringIO(), stderr=io.StringIO())
    assert str(error.value) == (
        'The database could not be reached (connection to server at "db" failed: Connection '
        "refused). Run the same command again: it processes only the pairs not ready."
    )


class _Restarting:
    """A task's result while Redis restarts: its first `fails` gets cannot reach Redis."""

    id = "task-1"

    def __init__(self, fails, error):
        self.fails, self.error = fails, error

    def get(self, propagate=True, timeout=None):
        if self.fails:
            self.fails -= 1
            raise self.error
        return "ready"

    def ready(self):
        return False


@pytest.mark.parametrize(
    "error",
    [
        RedisConnectionError("Error 111 connecting to redis:6379. Connection refused."),
        RedisTimeoutError("Timeout reading from redis:6379"),
        KombuOperationalError("Error 111 connecting to redis:6379. Connection refused."),
    ],
)
def test_an_import_waits_out_a_redis_restart(monkeypatch, error):
    """Redis out of reach is not a crash: not done yet, and, as `tasks_lost` cannot ask the
    broker either, not lost yet; the wait goes on (a second a try) until Redis is back."""
    slept, asked, progress = [], [], []
    monkeypatch.setattr(ingest.time, "sleep", slept.append)
    monkeypatch.setattr(ingest, "QUIET_S", -1)  # asks whether the tasks were lost each time

    def tasks_lost(results, queue):
        asked.append(queue)
        raise RedisConnectionError("Error 111 connecting to redis:6379. Connection refused.")

    monkeypatch.setattr("experiments.tasks.tasks_lost", tasks_lost)
    result = _Restarting(2, error)
    assert ingest.waited_for([result], "gpu", lambda *done: progress.append(done)) == []
    assert result.fails == 0 and slept == [1, 1] and asked == ["gpu", "gpu"]
    assert progress == [(1, 1)]


class _Result:
    """A task's result that is not ready (as `tasks_lost` reads one: no result backend)."""

    def __init__(self, task_id):
        self.id = task_id

    def ready(self):
        return False


@pytest.mark.parametrize("held_as", ["active", "reserved", None])
def test_a_task_a_worker_holds_is_not_lost_though_its_queue_is_empty(monkeypatch, held_as):
    """A task a worker runs (or has reserved) is no longer in its queue: not lost."""
    import contextlib
    from types import SimpleNamespace

    from experiments.tasks import tasks_lost
    from study_site.celery import app

    result = _Result("task-1")

    class Inspect:
        def __init__(self, timeout=None):
            pass

        def active(self):
            return {"w1@host": [{"id": "task-1"}]} if held_as == "active" else None

        def reserved(self):
            return {"w1@host": [{"id": "task-1"}]} if held_as == "reserved" else {}

    empty = SimpleNamespace(queue_declare=lambda queue: SimpleNamespace(message_count=0))
    connection = SimpleNamespace(default_channel=empty)
    monkeypatch.setattr(app.control, "inspect", Inspect)
    monkeypatch.setattr(app, "connection_for_write", lambda: contextlib.nullcontext(connection))
    assert tasks_lost([result], "gpu") is (held_as is None)
