"""`python -m engine`: every subcommand on real files, in a subprocess like a user would."""

import json
import subprocess
import sys

import pytest

from engine.pipeline import Features

SUBCOMMANDS = ["demo-corpus", "extract", "train", "evaluate", "baselines", "search"]


def engine(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "engine", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_help_for_every_subcommand():
    assert all(name in engine("--help").stdout for name in SUBCOMMANDS)
    for name in SUBCOMMANDS:
        assert "usage: python -m engine " + name in engine(name, "--help").stdout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "clips"
    engine("demo-corpus", out, "--n", 8, "--duration", 2, "--workers", 1)
    return out


def test_extract_reports_bad_files_and_goes_on(corpus, tmp_path):
    (corpus / "broken.mp4").write_bytes(b"not a video" * 50)
    try:
        result = engine(
            "extract",
            corpus,
            "--out",
            tmp_path / "f.npz",
            "--image-size",
            64,
            "--workers",
            2,
            check=False,
        )
    finally:
        (corpus / "broken.mp4").unlink()
    assert result.returncode == 1
    assert "FAILED" in result.stderr and "broken.mp4" in result.stderr
    assert "extracted 8 of 9 files" in result.stdout
    features = Features.load(tmp_path / "f.npz")
    assert len(features) == 8 and features.music.shape == (8, 1140)
    assert features.frames[0].shape == (2, 1280)


def test_train_evaluate_search(corpus, tmp_path):
    engine("extract", corpus, "--out", corpus / "features.npz", "--image-size", 64, "--workers", 1)
    config = json.dumps(
        {"batch_size": 8, "top_k": 3, "video_layers": [32, 16], "music_layers": [32, 16, 16]}
    )
    out = engine(
        "train",
        corpus / "features.npz",
        "--out",
        tmp_path / "m.pt",
        "--epochs",
        3,
        "--config",
        config,
    )
    assert "saved vmnet" in out.stdout
    scores = json.loads(
        engine("evaluate", tmp_path / "m.pt", corpus / "features.npz", "--split", "all").stdout
    )
    assert set(scores["V2M"]) == {"R@1", "R@10", "R@25"} and scores["n"] == 8
    found = engine(
        "search", tmp_path / "m.pt", corpus / "features.npz", "--query", "clip_0000.mp4", "--k", 3
    ).stdout
    assert found.startswith("clip_0000.mp4 -> ") and found.count("(") == 3
    table = engine(
        "baselines", corpus / "features.npz", "--kinds", "pca,cca", "--n-components", 2
    ).stdout
    assert "cca" in table and "chance" in table
