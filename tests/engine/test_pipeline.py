import numpy as np
import pytest
import torch

from engine.model import VMNet, VMNetConfig
from engine.pipeline import KINDS, Features, evaluate, load_system, train_system


def latent_pairs(n, seed=0, frame_dim=48, music_dim=60):
    """Pairs whose frames and music are noisy linear views of one shared latent style."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99)  # the same views for every split
    to_frames, to_music = mix.normal(size=(8, frame_dim)), mix.normal(size=(8, music_dim))
    z = rng.normal(size=(n, 8))
    frames = [
        z[i] @ to_frames + rng.normal(scale=1.5, size=(int(rng.integers(3, 8)), frame_dim))
        for i in range(n)
    ]
    music = np.tanh(z @ to_music) * 50 + rng.normal(scale=10, size=(n, music_dim)) + 100
    return Features([f"clip{i}" for i in range(n)], frames, music)


FAST = {
    "max_epochs": 40, "batch_size": 100, "top_k": 30, "patience": 40, "frame_dims": 32,
    "video_dims": 32, "video_layers": (256, 64), "music_layers": (256, 128, 64),
}  # fmt: skip


def test_vmnet_output_shapes_and_normalisation():
    model = VMNet(
        VMNetConfig(video_dim=10, music_dim=12, video_layers=(16, 8), music_layers=(20, 16, 8))
    )
    v, m = model(torch.randn(5, 10), torch.randn(5, 12))
    assert v.shape == m.shape == (5, 8)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(5))
    with pytest.raises(ValueError):
        VMNet(VMNetConfig(video_layers=(16, 8), music_layers=(16, 4)))


def test_short_training_improves_validation_recall(tmp_path):
    train, val, test = latent_pairs(300, 0), latent_pairs(60, 1), latent_pairs(60, 2)
    calls = []
    system = train_system("vmnet", train, val, FAST, progress=lambda f, msg: calls.append(f))
    before = (
        system.metrics["val_untrained"]["V2M"]["R@10"]
        + system.metrics["val_untrained"]["M2V"]["R@10"]
    ) / 2
    after = (system.metrics["val"]["V2M"]["R@10"] + system.metrics["val"]["M2V"]["R@10"]) / 2
    assert after > before + 0.2, (before, after)
    assert calls[0] == 0.0 and calls[-1] == 1.0 and calls == sorted(calls)
    result = evaluate(system, test)
    assert set(result) == {"V2M", "M2V", "chance", "n"}
    assert result["V2M"]["R@10"] > 3 * result["chance"]["R@10"]
    # checkpoint: same embeddings after a round trip, weights_only loadable
    system.save(tmp_path / "vmnet.pt")
    loaded = load_system(tmp_path / "vmnet.pt")
    assert loaded.kind == "vmnet" and loaded.metrics["best_epoch"] == system.metrics["best_epoch"]
    for a, b in zip(
        system.embed(test.frames, test.music), loaded.embed(test.frames, test.music), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, rtol=1e-5)


def test_training_is_seeded():
    train, val = latent_pairs(120, 3), latent_pairs(30, 4)
    config = FAST | {"max_epochs": 3}
    a = train_system("vmnet", train, val, config)
    b = train_system("vmnet", train, val, config)
    np.testing.assert_array_equal(
        a.embed(val.frames, val.music)[0], b.embed(val.frames, val.music)[0]
    )


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "vmnet"])
def test_baselines_train_embed_save_load(kind, tmp_path):
    train, test = latent_pairs(150, 5), latent_pairs(40, 6)
    system = train_system(
        kind, train, None, {"n_components": 6, "frame_dims": 32, "video_dims": 32}
    )
    v, m = system.embed(test.frames, test.music)
    assert v.shape == m.shape == (40, 6)
    system.save(tmp_path / "b.pt")
    loaded = load_system(tmp_path / "b.pt")
    np.testing.assert_allclose(loaded.embed(test.frames, test.music)[1], m, atol=1e-5)
    result = evaluate(system, test)
    if kind != "pca":  # the paired methods find the shared style
        assert result["V2M"]["R@10"] > 2 * result["chance"]["R@10"]


def test_features_round_trip(tmp_path):
    f = latent_pairs(5)
    f.save(tmp_path / "f.npz")
    g = Features.load(tmp_path / "f.npz")
    assert g.keys == f.keys and all(
        np.array_equal(a, b.astype(np.float32)) for a, b in zip(g.frames, f.frames, strict=True)
    )
    with pytest.raises(ValueError):
        train_system("svm", f)
    with pytest.raises(ValueError, match="unknown config"):
        train_system("vmnet", f, None, {"learning_rate": 1})


@pytest.mark.parametrize(
    "config, message",
    [
        ({"top_k": 0}, "top_k must be at least 1"),
        ({"margin": 0}, "margin must be above 0"),
        ({"lambdas": [1, 1, -0.2, 0.2]}, "lambdas must be 4 weights"),
        ({"batch_size": 1, "patience": 0}, "batch_size must be at least 2, not 1; patience"),
        ({"max_epochs": "100"}, "max_epochs must be a whole number, not '100'"),
        ({"max_epochs": 2.5, "cuda_graph": 1}, "a whole number, not 2.5; cuda_graph must be true"),
        ({"video_layers": 512}, r"video_layers must be a list of numbers, like \[2048, 512\]"),
        ({"keep_prob": None}, "keep_prob must be a number, not None"),
    ],
)
def test_a_config_that_cannot_train_is_refused_before_any_work(config, message):
    train = Features(
        keys=[f"k{i}" for i in range(8)],
        frames=[np.zeros((3, 16), np.float32)] * 8,
        music=np.zeros((8, 1140), np.float32),
    )
    seen = []
    with pytest.raises(ValueError, match=message):
        train_system("vmnet", train, config=config, progress=lambda f, m: seen.append(m))
    assert seen == []  # refused before fitting anything


def test_training_needs_two_pairs_and_evaluation_one():
    one = Features(["a"], [np.zeros((3, 16), np.float32)], np.zeros((1, 1140), np.float32))
    with pytest.raises(ValueError, match="training needs at least 2 pairs, not 1"):
        train_system("cca", one)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(None, one.subset([]))
