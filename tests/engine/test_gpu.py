"""The CUDA path: autocast training with data on the device, and the CNN on the GPU."""

import numpy as np
import pytest
import torch

from engine.features.video import frame_features
from engine.pipeline import evaluate, train_system
from tests.engine.test_pipeline import FAST, latent_pairs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_training_on_cuda_with_mixed_precision():
    train, val = latent_pairs(300, 0), latent_pairs(60, 1)
    system = train_system("vmnet", train, val, FAST | {"device": "cuda"})
    assert next(system.model.parameters()).device.type == "cuda"
    after = system.metrics["val"]["V2M_R@10"]
    assert after > system.metrics["val_untrained"]["V2M_R@10"] + 0.2
    assert evaluate(system, val)["M2V"]["R@10"] > 0.4


def test_frame_features_on_cuda_match_cpu(clips):
    gpu = frame_features(clips[0], device="cuda", image_size=128)
    cpu = frame_features(clips[0], device="cpu", image_size=128)
    assert gpu.shape == cpu.shape
    # float16 autocast: close, not equal
    cos = (gpu * cpu).sum(1) / np.linalg.norm(gpu, axis=1) / np.linalg.norm(cpu, axis=1)
    assert cos.min() > 0.99
