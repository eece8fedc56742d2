"""The demo corpus is learnable, and not linearly: trained on 300 pairs (250 + 50 for early
stopping), VM-NET retrieves the 100 held-out pairs far above chance and far above CCA on
the same features. Features are cached in pytest's cache folder between runs."""

import csv

import numpy as np
import pytest

from engine.corpus import DEMO_FEATURES, DEMO_VMNET_CONFIG, make_demo_corpus, picture_style, style
from engine.extract import extract_folder
from engine.pipeline import Features, evaluate, train_system

CACHE_KEY = "engine/demo-corpus-v3"  # bump when the corpus changes


@pytest.fixture(scope="module")
def demo_features(request):
    folder = request.config.cache.mkdir(CACHE_KEY.replace("/", "-"))
    cached = folder / "features.npz"
    if not cached.exists():
        paths = make_demo_corpus(folder / "clips", 400, seed=0, duration=10.0)
        keys, frames, music, errors = extract_folder(paths, image_size=112, progress=False)
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


def test_only_the_stripes_follow_a_music_parameter_linearly():
    """Over many styles, each picture attribute but the stripes is uncorrelated with every
    music parameter: a linear map has only the stripes to go by."""
    rng = np.random.default_rng(0)
    styles = [style(rng) for _ in range(4000)]
    music = {
        "tempo": [s["tempo"] for s in styles],
        "key": [s["key"] for s in styles],
        "minor": [s["mode"] == "minor" for s in styles],
        "timbre": [s["timbre"] for s in styles],
        "drums": [s["drums"] for s in styles],
        "loudness": [s["loudness"] for s in styles],
    }
    pictures = [picture_style(s) for s in styles]
    for attribute in ("disc", "level", "hue"):
        shown = [p[attribute] for p in pictures]
        for name, values in music.items():
            assert abs(np.corrcoef(shown, np.asarray(values, float))[0, 1]) < 0.05, (
                attribute,
                name,
            )
    stripes = [p["stripes"] for p in pictures]
    assert np.corrcoef(stripes, music["timbre"])[0, 1] > 0.9


@pytest.mark.slow
def test_vmnet_learns_what_cca_cannot(demo_features):
    order = np.argsort(demo_features.keys)
    train = demo_features.subset(list(order[:250]))
    val = demo_features.subset(list(order[250:300]))
    held_out = demo_features.subset(list(order[300:]))
    vmnet = evaluate(train_system("vmnet", train, val, DEMO_VMNET_CONFIG), held_out)
    cca = evaluate(train_system("cca", train, val, DEMO_FEATURES), held_out)
    pls = evaluate(train_system("pls", train, val, DEMO_FEATURES), held_out)
    chance = vmnet["chance"]  # R@1 0.01, R@10 0.1 for 100 pairs
    # Measured on two corpora (seed 0 at 10 s, seed 1 at 8 s; training seeds 0-2): VM-NET
    # R@10 0.43-0.60 and R@1 0.06-0.12, CCA R@10 0.21-0.25, PLS 0.27-0.37. The thresholds
    # leave room for other seeds and machines.
    for direction in ("V2M", "M2V"):
        assert vmnet[direction]["R@10"] > 3.5 * chance["R@10"], (vmnet, cca)
        assert vmnet[direction]["R@10"] > cca[direction]["R@10"] + 0.15, (vmnet, cca)
        assert vmnet[direction]["R@10"] > pls[direction]["R@10"] + 0.05, (vmnet, pls)
        assert vmnet[direction]["R@1"] > 4 * chance["R@1"], (vmnet, cca)
