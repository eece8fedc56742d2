"""The accelerator's extraction path (frames and music in batches), run here on the CPU."""

import os

import numpy as np

from engine.extract import _extract_batch, bisected, extract_folder, extract_one, in_processes
from tests.engine.conftest import write_audio


def test_batched_extraction_reports_bad_files_and_keeps_the_rest(tmp_path, clips):
    not_media = tmp_path / "notes.mp4"
    not_media.write_text("not a video")
    # a picture with a silent soundtrack: its frames come back, its music batch fails
    silent = write_audio(tmp_path / "silent.mp4", np.zeros(36_000), 12_000, video=True)
    paths = [clips[0], not_media, silent, clips[1], clips[2]]
    results = {p: (value, error) for p, value, error in _extract_batch(
        paths, workers=0, device="cpu", image_size=64
    )}  # fmt: skip
    assert set(results) == set(paths)
    assert "cannot open" in results[not_media][1] and results[not_media][0] is None
    assert "silent" in results[silent][1] and results[silent][0] is None
    for path in (clips[0], clips[1], clips[2]):
        (frames, music), error = results[path]
        alone_frames, alone_music = extract_one(path, image_size=64, device="cpu")
        assert error is None
        np.testing.assert_allclose(frames, alone_frames, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(music, alone_music, rtol=1e-4, atol=1e-4)


def test_extract_folder_on_the_cpu_leaves_bad_files_out(tmp_path, clips):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    keys, frames, music, errors = extract_folder(
        [clips[3], bad], workers=1, progress=False, image_size=64, device="cpu"
    )
    assert keys == [clips[3]] and len(frames) == 1 and music.shape == (1, 1140)
    assert [p for p, _ in errors] == [bad] and "cannot open" in errors[0][1]


def test_extract_folder_saves_as_it_goes_and_keeps_what_was_done(clips, monkeypatch, tmp_path):
    monkeypatch.setattr("engine.extract.SAVE_EVERY_S", 0)
    kept = (np.full((1, 1280), 7, np.float32), np.full(1140, 7, np.float32))
    saved = []
    keys, frames, music, errors = extract_folder(
        clips, workers=1, progress=False, image_size=64, device="cpu",
        done={clips[2]: kept}, save=lambda keys, *_: saved.append(keys),
    )  # fmt: skip
    assert keys == list(clips) and not errors
    assert frames[2] is kept[0] and np.array_equal(music[2], kept[1])  # not extracted again
    assert saved == [[*clips[:1], clips[2]], [*clips[:3]], list(clips)]  # each in path order
    # Files that all fail leave nothing to save (an empty save would fail the run).
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    saved.clear()
    *_, errors = extract_folder(
        [bad], workers=1, progress=False, save=lambda *rows: saved.append(rows)
    )
    assert errors and saved == []


def dies_on_kill(path):
    """A file named "kill…" kills the process working on it (as FFmpeg crashing would)."""
    if path.startswith("kill"):
        os._exit(1)
    return path, path.upper(), None


def test_a_worker_that_dies_costs_only_its_own_file():
    paths = ["a", "b", "kill-me", "c", "d", "e", "f"]
    results = {path: (value, error) for path, value, error in in_processes(paths, 2, dies_on_kill)}
    assert set(results) == set(paths)
    assert results.pop("kill-me") == (
        None,
        "kill-me: the process extracting it died (killed, or a crash)",
    )
    assert results == {path: (path.upper(), None) for path in results}


def test_a_batch_that_fails_is_halved_down_to_the_file_that_fails_it():
    """On an accelerator a whole batch fails with one file (its decode process died)."""
    batches = []

    def compute(part):
        batches.append(len(part))
        if "bad" in part:
            raise RuntimeError("a process in the pool was terminated abruptly")
        return [path.upper() for path in part]

    found = bisected(compute, ["a", "b", "bad", "c", "d", "e"])
    error = "bad: RuntimeError: a process in the pool was terminated abruptly"
    assert found == ["A", "B", error, "C", "D", "E"]
    assert batches == [6, 3, 1, 2, 1, 1, 3]  # the good halves in one piece each
