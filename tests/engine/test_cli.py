"""`python -m engine`: every subcommand on real files. One real subprocess proves the entry
point; the rest call `main(argv)` in-process (the same code, without re-importing torch)."""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from engine.__main__ import main
from engine.files import written_whole
from engine.pipeline import Features, load_system

SUBCOMMANDS = ["demo-corpus", "extract", "train", "evaluate", "baselines", "embed", "search"]


def run(capsys, *args):
    """(exit code, stdout, stderr) of `python -m engine args...`, in-process."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if isinstance(exc.code, str):  # what the interpreter would print on its way out
            print(exc.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_module_entry_point_and_help_for_every_subcommand(capsys):
    top = subprocess.run(
        [sys.executable, "-m", "engine", "--help"], capture_output=True, text=True, timeout=120
    )
    assert top.returncode == 0 and all(name in top.stdout for name in SUBCOMMANDS)
    for name in SUBCOMMANDS:
        code, out, _ = run(capsys, name, "--help")
        assert code == 0 and "usage: python -m engine " + name in out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "clips"
    main(["demo-corpus", str(out), "--n", "8", "--duration", "2", "--workers", "1"])
    return out


def test_extract_reports_bad_files_and_goes_on(corpus, tmp_path, capsys):
    (corpus / "broken.mp4").write_bytes(b"not a video" * 50)
    try:
        code, out, err = run(
            capsys,
            "extract",
            corpus,
            "--out",
            tmp_path / "f.npz",
            "--image-size",
            64,
            "--workers",
            2,
        )
    finally:
        (corpus / "broken.mp4").unlink()
    assert code == 1
    assert "FAILED" in err and "broken.mp4" in err
    assert "extracted 8 of 9 files" in out
    features = Features.load(tmp_path / "f.npz")
    assert len(features) == 8 and features.music.shape == (8, 1140)
    assert features.frames[0].shape == (2, 1280)

    # Nothing readable: the output of an earlier run stays, and the summary says so.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.mp4").write_bytes(b"not a video")
    code, out, err = run(capsys, "extract", bad, "--out", tmp_path / "f.npz", "--workers", 1)
    assert (
        code == 1
        and f"nothing written (no file could be read; {tmp_path / 'f.npz'} unchanged)" in out
    )
    assert len(Features.load(tmp_path / "f.npz")) == 8


def test_a_stopped_extract_goes_on_where_it_stopped(corpus, tmp_path, capsys):
    out, partial = tmp_path / "f.npz", tmp_path / "f.npz.partial"
    args = ["extract", corpus, "--out", out, "--image-size", 64, "--workers", 2]
    job = subprocess.Popen(
        [sys.executable, "-m", "engine", *map(str, args)], stderr=subprocess.PIPE, text=True
    )
    progress = ""
    while not re.search(r"\b[2-7]/8\b", progress):  # tqdm's bar: 2 or more done; kill it
        progress += os.read(job.stderr.fileno(), 4096).decode()
        assert job.poll() is None, progress
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 130
    assert "stopped: what was extracted is in" in job.stderr.read()
    assert not out.exists()
    saved = Features.load(partial)
    assert 2 <= len(saved) < 8
    # Marked, so that the resumed run shows it kept these rows (extracted again, they would
    # be the same numbers).
    saved.music[:] = 7.0
    saved.save(partial)

    # Other options would mix features of two kinds: refused, the partial file kept.
    code, _, err = run(capsys, *args[:-4], "--image-size", 96, "--workers", 2)
    assert code == 1 and "run with its options to go on" in err and partial.exists()

    code, stdout, _ = run(capsys, *args)
    assert code == 0 and f"extracted 8 of 8 files, {len(saved)} of them from {partial}" in stdout
    assert not partial.exists()
    features = Features.load(out)
    assert features.keys == sorted(p.name for p in corpus.glob("*.mp4"))
    assert features.settings == {"encoder": "efficientnet-lite0", "image_size": 64,
                                 "pretrained": True}  # fmt: skip
    for key, frames in zip(saved.keys, saved.frames, strict=True):
        i = features.keys.index(key)  # kept as saved, not extracted again
        assert np.array_equal(features.frames[i], frames) and (features.music[i] == 7.0).all()
    assert (features.music != 7.0).any(axis=1).sum() == 8 - len(saved)  # the rest extracted


def test_extract_refuses_an_image_size_its_cnn_cannot_take(corpus, tmp_path, capsys):
    code, _, err = run(capsys, "extract", corpus, "--out", tmp_path / "f.npz",
                       "--encoder", "inception-v3", "--image-size", 64)  # fmt: skip
    assert code == 1 and "inception-v3 needs images of at least 75 pixels, not 64" in err
    assert not list(tmp_path.iterdir())


def test_an_output_is_replaced_only_once_written_whole_and_under_its_own_name(tmp_path):
    target = tmp_path / "features"  # np.savez would have added ".npz" to a name
    Features(["a"], [np.ones((2, 3), np.float32)], np.ones((1, 1140), np.float32)).save(target)
    before = target.read_bytes()
    with pytest.raises(KeyboardInterrupt), written_whole(target) as f:
        f.write(b"half of it")
        raise KeyboardInterrupt  # Ctrl-C, halfway
    assert target.read_bytes() == before and list(tmp_path.iterdir()) == [target]
    assert Features.load(target).keys == ["a"]


def test_train_evaluate_search_baselines(corpus, tmp_path, capsys):
    assert (
        run(
            capsys,
            "extract",
            corpus,
            "--out",
            corpus / "features.npz",
            "--image-size",
            64,
            "--workers",
            1,
        )[0]
        == 0
    )
    config = json.dumps(
        {"batch_size": 8, "top_k": 3, "video_layers": [32, 16], "music_layers": [32, 16, 16]}
    )
    code, out, _ = run(
        capsys,
        "train",
        corpus / "features.npz",
        "--out",
        tmp_path / "m.pt",
        "--epochs",
        3,
        "--config",
        config,
    )
    assert code == 0 and "saved vmnet" in out
    code, out, _ = run(
        capsys, "evaluate", tmp_path / "m.pt", corpus / "features.npz", "--split", "all"
    )
    scores = json.loads(out)
    assert set(scores["V2M"]) == {"R@1", "R@10", "R@25"} and scores["n"] == 8
    code, found, _ = run(
        capsys,
        "search",
        tmp_path / "m.pt",
        corpus / "features.npz",
        "--query",
        "clip_0000.mp4",
        "--k",
        3,
    )
    assert found.startswith("clip_0000.mp4 -> ") and found.count("(") == 3
    # The embeddings, named as the platform names pairs, for its import_results.
    code, out, _ = run(capsys, "embed", tmp_path / "m.pt", corpus / "features.npz",
                       "--out", tmp_path / "emb.npz")  # fmt: skip
    assert code == 0 and "embedded 8 pairs" in out
    features = Features.load(corpus / "features.npz")
    video, music = load_system(tmp_path / "m.pt").embed(features.frames, features.music)
    with np.load(tmp_path / "emb.npz") as written:
        assert list(written["keys"]) == [k.removesuffix(".mp4") for k in features.keys]
        np.testing.assert_allclose(written["video"], video, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(written["music"], music, rtol=1e-5, atol=1e-6)
    code, table, _ = run(
        capsys, "baselines", corpus / "features.npz", "--kinds", "pca,cca", "--n-components", 2
    )
    assert code == 0 and "cca" in table and "chance" in table


def test_bad_input_gets_a_message_not_a_traceback(tmp_path, capsys):
    features = tmp_path / "f.npz"
    Features(
        [f"k{i}" for i in range(4)], [np.ones((2, 8), np.float32)] * 4, np.ones((4, 1140))
    ).save(features)
    cases = [
        (["train", tmp_path / "none.npz"], "train: error: [Errno 2] No such file"),
        (["train", features, "--config", "[1, 2]"], "--config is a JSON object"),
        (["train", features, "--config", "{bad"], "train: error: Expecting property name"),
        (["train", features, "--epochs", "0"], "--epochs: must be at least 1, not 0"),
        (["evaluate", tmp_path / "m.pt", features], "evaluate: error: [Errno 2]"),
    ]
    for args, message in cases:
        code, _, err = run(capsys, *args)
        assert code in (1, 2) and message in err and "Traceback" not in err, (args, err)


def test_embed_refuses_files_that_differ_only_by_their_suffix(tmp_path, capsys):
    """The platform names a pair by its file without the suffix: a.mp4 and a.mkv would be
    one pair's two embeddings; embed says so and writes nothing."""
    rng = np.random.default_rng(0)
    keys = ["a.mp4", "a.mkv", *(f"k{i}.mp4" for i in range(6))]
    frames = [rng.normal(size=(3, 16)).astype(np.float32) for _ in keys]
    features = tmp_path / "f.npz"
    Features(keys, frames, rng.normal(size=(len(keys), 1140))).save(features)
    code, out, _ = run(capsys, "train", features, "--kind", "pca", "--out", tmp_path / "m.pt")
    assert code == 0, out
    code, out, err = run(capsys, "embed", tmp_path / "m.pt", features, "--out", tmp_path / "e.npz")
    assert code == 1 and "files differ only by their suffix: ['a']" in err, err
    assert not (tmp_path / "e.npz").exists()


def test_a_manifest_splits_videos_by_their_path_or_a_name_no_other_video_has(tmp_path):
    from engine.__main__ import _splits

    keys = ["a.mp4", "sub/a.mp4", "sub/b.mp4", "c.mp4"]
    features = Features(keys, [np.ones((1, 4), np.float32)] * 4, np.ones((4, 1140)))
    manifest = tmp_path / "m.csv"
    manifest.write_text("video,split\na.mp4,test\nsub/a.mp4,val\nb.mp4,train\nc.mp4,train\n")
    assert _splits(features, str(manifest)) == {"train": [2, 3], "val": [1], "test": [0]}
    manifest.write_text("video,split\nx.mp4,train\n")
    with pytest.raises(ValueError, match="gives a split to none of the 4 videos"):
        _splits(features, str(manifest))
    manifest.write_text("file,split\na.mp4,train\n")
    with pytest.raises(ValueError, match="no 'video' column"):
        _splits(features, str(manifest))
