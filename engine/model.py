"""VM-NET: the two-branch embedding network (Sec. III-C, IV-B)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VMNetConfig:
    video_dim: int = 1024  # input sizes: the featurizers' output dimensions
    music_dim: int = 1140
    video_layers: tuple[int, ...] = (2048, 512)  # paper: two FC layers for video
    music_layers: tuple[int, ...] = (2048, 1024, 512)  # three for music (low-level input)
    keep_prob: float = 0.9  # dropout keep probability
    linear: bool = False  # the paper's linear variant (no ReLU), for baselines
    batch_norm: bool = True  # batch norm on each branch's output, before the loss

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VMNetConfig:
        d = dict(d)
        for key in ("video_layers", "music_layers"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def _branch(in_dim: int, sizes: tuple[int, ...], config: VMNetConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, size in enumerate(sizes):
        layers.append(nn.Linear(in_dim, size))
        if i < len(sizes) - 1:  # hidden layers: nonlinearity + dropout
            if not config.linear:
                layers.append(nn.ReLU())
            layers.append(nn.Dropout(1.0 - config.keep_prob))
        in_dim = size
    if config.batch_norm:
        layers.append(nn.BatchNorm1d(in_dim))
    return nn.Sequential(*layers)


class VMNet(nn.Module):
    """Video and music branches into one space; outputs are L2-normalised (cosine = dot)."""

    def __init__(self, config: VMNetConfig | None = None):
        super().__init__()
        self.config = config or VMNetConfig()
        if self.config.video_layers[-1] != self.config.music_layers[-1]:
            raise ValueError("both branches must end in the same embedding size")
        self.video = _branch(self.config.video_dim, self.config.video_layers, self.config)
        self.music = _branch(self.config.music_dim, self.config.music_layers, self.config)

    def embed_video(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.video(x), dim=1)

    def embed_music(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.music(x), dim=1)

    def forward(self, video: torch.Tensor, music: torch.Tensor):
        return self.embed_video(video), self.embed_music(music)
