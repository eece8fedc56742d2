"""The CUDA path: autocast training with data on the device, the CNN and the video
featurizer on the GPU, batched extraction."""

import numpy as np
import pytest
import torch

from engine.extract import extract_folder
from engine.features.audio import decode_audio
from engine.features.video import VideoFeaturizer, frame_features, frame_features_batch
from engine.model import VMNet, VMNetConfig
from engine.pipeline import evaluate, train_system
from engine.train import TrainConfig, training_step
from tests.engine.conftest import write_audio
from tests.engine.test_audio_batch import SONGS
from tests.engine.test_pipeline import FAST, latent_pairs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_training_on_cuda_with_mixed_precision():
    train, val = latent_pairs(300, 0), latent_pairs(60, 1)
    system = train_system("vmnet", train, val, FAST | {"device": "cuda"})
    assert next(system.model.parameters()).device.type == "cuda"
    after = system.metrics["val"]["V2M"]["R@10"]
    assert after > system.metrics["val_untrained"]["V2M"]["R@10"] + 0.2
    assert evaluate(system, val)["M2V"]["R@10"] > 0.4


def test_graphed_training_step_equals_eager_step():
    """The same batches through the step replayed as a CUDA graph and run eagerly (no
    dropout, no autocast: both then compute the same) leave the same losses and weights."""
    cuda = torch.device("cuda")
    gen = torch.Generator(device=cuda).manual_seed(1)
    video = torch.nn.functional.normalize(torch.randn(8, 64, 48, device=cuda, generator=gen), dim=2)
    music = torch.nn.functional.normalize(torch.randn(8, 64, 40, device=cuda, generator=gen), dim=2)
    dims = VMNetConfig(48, 40, video_layers=(64, 32), music_layers=(64, 32), keep_prob=1.0)
    runs = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = VMNet(dims).to(cuda)
        config = TrainConfig(batch_size=64, top_k=20, mixed_precision=False, cuda_graph=graphed)
        step = training_step(model, config, cuda)
        losses = [step(v, m).item() for v, m in zip(video, music, strict=True)]
        runs.append((losses, model.state_dict()))
        if graphed:  # every batch of a graphed step has the captured shape
            with pytest.raises(ValueError, match="batches of"):
                step(video[0, :32], music[0, :32])
    (eager_losses, eager_state), (graph_losses, graph_state) = runs
    assert len(set(graph_losses)) == 8  # each replay computed its own batch
    np.testing.assert_allclose(graph_losses, eager_losses, rtol=1e-5)
    for name, tensor in eager_state.items():
        torch.testing.assert_close(graph_state[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_frame_features_on_cuda_match_cpu(clips):
    gpu = frame_features(clips[0], device="cuda", image_size=128)
    cpu = frame_features(clips[0], device="cpu", image_size=128)
    assert gpu.shape == cpu.shape
    # float16 autocast: close, not equal
    cos = (gpu * cpu).sum(1) / np.linalg.norm(gpu, axis=1) / np.linalg.norm(cpu, axis=1)
    assert cos.min() > 0.99


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_batched_frame_features_on_cuda_match_cpu_per_file(clips):
    batched = frame_features_batch(clips, device="cuda", image_size=128, batch_size=5, workers=2)
    for clip, gpu in zip(clips, batched, strict=True):
        cpu = frame_features(clip, device="cpu", image_size=128)
        assert gpu.shape == cpu.shape and cosines(gpu, cpu).min() > 0.99


def test_video_featurizer_on_cuda_matches_cpu():
    rng = np.random.default_rng(4)
    frames = [rng.normal(size=(int(n), 64)).astype(np.float32) for n in rng.integers(1, 30, 200)]
    vf = VideoFeaturizer(frame_dims=32, video_dims=16).fit(frames)
    np.testing.assert_allclose(vf.transform(frames, "cuda"), vf.transform(frames), atol=1e-4)


@pytest.fixture(scope="module")
def song_videos(tmp_path_factory):
    """Three music videos of real songs (30 s, a black picture), so that the music excerpt
    is all music: in the 26 s of zeros that pad a 3 s demo clip, chroma-CENS, the mel bands
    and the maxima of MFCCs are rounding noise (in librosa too): on an H200 the CPU's and
    the GPU's roundings put 245 of those clips' 4560 numbers more than 1e-3 apart."""
    if not SONGS:
        pytest.skip("apt-get install fretsonfire-songs-sectoid for real music")
    out = tmp_path_factory.mktemp("song_videos")
    waves = [decode_audio(path, 44_100, offset=20.0, duration=30.0) for path in SONGS[:3]]
    return [write_audio(out / f"song_{i}.mp4", w, 44_100, video=True) for i, w in enumerate(waves)]


def test_extract_folder_on_cuda_matches_cpu(tmp_path, song_videos):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    paths = [*song_videos, bad]
    gpu = extract_folder(paths, 2, progress=False, image_size=128, device="cuda")
    cpu = extract_folder(paths, 2, progress=False, image_size=128, device="cpu")
    assert gpu[0] == cpu[0] == list(song_videos) and [p for p, _ in gpu[3]] == [bad]
    for g, c in zip(gpu[1], cpu[1], strict=True):
        assert cosines(g, c).min() > 0.99
    np.testing.assert_allclose(gpu[2], cpu[2], rtol=1e-3, atol=1e-3)
