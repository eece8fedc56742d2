"""The demo corpus is learnable: trained on 300 pairs, VM-NET retrieves the 100 held-out
pairs far above chance. Features are cached in pytest's cache folder between runs."""

import csv

import numpy as np
import pytest

from engine.corpus import make_demo_corpus
from engine.extract import extract_folder
from engine.pipeline import Features, evaluate, train_system

CACHE_KEY = "engine/demo-corpus-v1"


@pytest.fixture(scope="module")
def demo_features(request):
    folder = request.config.cache.mkdir(CACHE_KEY.replace("/", "-"))
    cached = folder / "features.npz"
    if not cached.exists():
        paths = make_demo_corpus(folder / "clips", 400, seed=0, duration=10.0)
        keys, frames, music, errors = extract_folder(paths, image_size=160, progress=False)
        assert not errors
        Features([p.name for p in keys], frames, music).save(cached)
    return Features.load(cached)


def test_manifest_lists_every_clip_with_title_and_genre(tmp_path):
    paths = make_demo_corpus(tmp_path, 8, seed=3, duration=1.0, workers=1)
    with open(tmp_path / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["video"] for r in rows] == [p.name for p in paths]
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert all(r["title"] and r["genre"] and r["music"] == "" for r in rows)


@pytest.mark.slow
def test_vmnet_learns_the_demo_correspondence(demo_features):
    order = np.argsort(demo_features.keys)
    train = demo_features.subset(list(order[:300]))
    held_out = demo_features.subset(list(order[300:]))
    val = held_out.subset(list(range(50)))
    system = train_system(
        "vmnet", train, val, {"max_epochs": 60, "patience": 30, "batch_size": 300, "top_k": 10}
    )
    result = evaluate(system, held_out)
    chance = result["chance"]["R@10"]  # 0.1 for 100 pairs
    for direction in ("V2M", "M2V"):
        assert result[direction]["R@10"] > 4 * chance, result
        assert result[direction]["R@1"] > 10 * result["chance"]["R@1"], result
