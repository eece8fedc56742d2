"""Importing real (generated) music videos: study media, features, per-file errors, re-runs."""

from fractions import Fraction

import av
import numpy as np
import pytest

from engine.features import MediaError
from experiments import media
from experiments.ingest import ManifestError, assign_splits, import_collection, read_source
from experiments.models import Collection, Pair

from .clips import music_video, truncated


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
