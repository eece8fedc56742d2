"""The engine's one high-level API: features in, a trained retrieval system out.

system = train_system("vmnet", train, val, config={"max_epochs": 200})
video_emb, music_emb = system.embed(test.frames, test.music)   # cosine = dot
evaluate(system, test)  # {'V2M': {'R@1': ...}, 'M2V': {...}, 'chance': {...}, 'n': ...}
system.save("model.pt"); load_system("model.pt")
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from engine import baselines
from engine.devices import best_device
from engine.features.video import MusicFeaturizer, VideoFeaturizer
from engine.files import written_whole
from engine.metrics import recalls
from engine.model import VMNet, VMNetConfig
from engine.train import TrainConfig, train_vmnet

KINDS = ("vmnet", *baselines.KINDS)


@dataclass
class Features:
    """Extracted features of paired items: row i of each field is pair `keys[i]`."""

    keys: list[str]
    frames: list[np.ndarray]  # per video: (T, D) CNN frame features
    music: np.ndarray  # (n, 1140)
    settings: dict = field(default_factory=dict)  # how they were extracted (`engine extract`)

    def __post_init__(self):
        self.music = np.asarray(self.music, np.float32)
        if not (len(self.keys) == len(self.frames) == len(self.music)):
            raise ValueError("keys, frames and music must have one row per pair")

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, idx) -> Features:
        return Features(
            [self.keys[i] for i in idx], [self.frames[i] for i in idx], self.music[idx],
            self.settings,
        )  # fmt: skip

    def save(self, path) -> None:
        """One .npz: frames stored flat with per-video lengths."""
        lengths = np.array([len(f) for f in self.frames])
        with written_whole(path) as f:
            np.savez(
                f, keys=np.array(self.keys), music=self.music, lengths=lengths,
                frames=np.concatenate(self.frames).astype(np.float32),
                settings=np.array(json.dumps(self.settings)),
            )  # fmt: skip

    @classmethod
    def load(cls, path) -> Features:
        with np.load(path) as z:
            frames = np.split(z["frames"], np.cumsum(z["lengths"])[:-1])
            settings = json.loads(str(z["settings"])) if "settings" in z else {}
            return cls([str(k) for k in z["keys"]], frames, z["music"], settings)


@dataclass
class TrainedSystem:
    kind: str
    video_featurizer: VideoFeaturizer
    music_featurizer: MusicFeaturizer
    model: VMNet | None = None  # for kind "vmnet"
    projection: dict = field(default_factory=dict)  # for the linear baselines
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def embed(self, frames: list[np.ndarray], music: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """L2-normalised (n, d) video and music embeddings."""
        device = next(self.model.parameters()).device if self.model else best_device()
        v = self.video_featurizer.transform(frames, device)
        m = self.music_featurizer.transform(music)
        if self.kind != "vmnet":
            return baselines.project(self.projection, "video", v), baselines.project(
                self.projection, "music", m
            )
        self.model.eval()
        with torch.no_grad():
            ve = self.model.embed_video(torch.from_numpy(v).to(device))
            me = self.model.embed_music(torch.from_numpy(m).to(device))
        return ve.float().cpu().numpy(), me.float().cpu().numpy()

    def save(self, path) -> None:
        """A torch checkpoint of plain tensors and dicts (loads with weights_only=True)."""
        tensors = lambda d: {k: torch.as_tensor(np.asarray(v)) for k, v in d.items()}  # noqa: E731
        with written_whole(path) as f:
            torch.save(
                {
                    "kind": self.kind,
                    "config": self.config,
                    "metrics": self.metrics,
                    "model_config": self.model.config.to_dict() if self.model else None,
                    "model": self.model.state_dict() if self.model else None,
                    "projection": tensors(self.projection),
                    "video_featurizer": tensors(self.video_featurizer.state_dict()),
                    "music_featurizer": tensors(self.music_featurizer.state_dict()),
                },
                f,
            )


def load_system(path, device=None) -> TrainedSystem:
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    arrays = lambda d: {k: v.numpy() for k, v in d.items()}  # noqa: E731
    model = None
    if ckpt["model"] is not None:
        model = VMNet(VMNetConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        model.to(device or "cpu").eval()
    return TrainedSystem(
        kind=ckpt["kind"],
        video_featurizer=VideoFeaturizer.from_state(arrays(ckpt["video_featurizer"])),
        music_featurizer=MusicFeaturizer.from_state(arrays(ckpt["music_featurizer"])),
        model=model,
        projection=arrays(ckpt["projection"]),
        config=ckpt["config"],
        metrics=ckpt["metrics"],
    )


def check_config(config) -> None:
    """ValueError saying what is wrong with a system's `config` (unknown keys, bad values),
    so that it is refused when saved rather than when its training starts, hours later."""
    if not isinstance(config, dict):
        raise ValueError('a config is a JSON object, e.g. {"max_epochs": 100}')
    fields_ = [*fields(TrainConfig), *fields(VMNetConfig)]
    defaults = {f.name: (f.default, "None" in str(f.type)) for f in fields_}
    defaults |= {name: (64 if name == "n_components" else 1024, False) for name in EXTRA_KEYS}
    wrong = [
        f"{key} must be {_kind_of(defaults[key][0])}, not {value!r}"
        for key, value in config.items()
        if key in defaults and not _fits(value, *defaults[key])
    ]
    if wrong:
        raise ValueError("; ".join(wrong))
    _, _, model_args, _ = _split_config(config)  # unknown keys, values out of range
    VMNetConfig.from_dict(model_args)


MIN_TRAIN_PAIRS = 2
EXTRA_KEYS = ("n_components", "frame_dims", "video_dims")  # besides the two configs' fields


def _fits(value, default, nullable: bool) -> bool:
    """Whether a JSON value can stand for a field whose default is `default`."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if value is None:
        return nullable
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return number
    if isinstance(default, tuple):
        return isinstance(value, list | tuple) and all(_fits(v, default[0], False) for v in value)
    return isinstance(value, str)


def _kind_of(default) -> str:
    if isinstance(default, tuple):
        return f"a list of numbers, like {list(default)}"
    for kind, words in ((bool, "true or false"), (int, "a whole number"), (float, "a number")):
        if isinstance(default, kind):
            return words
    return "text"


def _split_config(config: dict) -> tuple[dict, TrainConfig, dict, int]:
    config = dict(config or {})
    train_keys = {f.name for f in fields(TrainConfig)}
    model_keys = {f.name for f in fields(VMNetConfig)} - {"video_dim", "music_dim"}
    unknown = set(config) - train_keys - model_keys - set(EXTRA_KEYS)
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    tc = TrainConfig(**{k: v for k, v in config.items() if k in train_keys})
    model_args = {k: v for k, v in config.items() if k in model_keys}
    return config, tc, model_args, int(config.get("n_components", 64))


def train_system(
    kind: str,
    train: Features,
    val: Features | None = None,
    config: dict | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> TrainedSystem:
    """Fit the featurizers on `train`, then the model (`kind` in KINDS) on their vectors.

    `config` takes TrainConfig and VMNetConfig fields (e.g. max_epochs, top_k, lambdas,
    video_layers), `n_components` for the baselines and `frame_dims`/`video_dims` for the
    video featurizer. `progress(fraction, message)` is called as work advances.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
    check_config(config or {})
    if len(train) < MIN_TRAIN_PAIRS:  # a ranking needs others to rank below the match
        raise ValueError(f"training needs at least {MIN_TRAIN_PAIRS} pairs, not {len(train)}")
    config, train_config, model_args, n_components = _split_config(config)
    report = progress or (lambda fraction, message: None)
    report(0.0, "fitting feature transforms")
    vf = VideoFeaturizer(config.get("frame_dims", 1024), config.get("video_dims", 1024)).fit(
        train.frames
    )
    mf = MusicFeaturizer().fit(train.music)
    device = best_device(train_config.device)  # whitening and PCA of every frame: on the GPU
    v, m = vf.transform(train.frames, device), mf.transform(train.music)
    val_vectors = (
        (vf.transform(val.frames, device), mf.transform(val.music))
        if val is not None and len(val)
        else None
    )
    system = TrainedSystem(kind, vf, mf, config=config)
    if kind == "vmnet":
        model_config = VMNetConfig(video_dim=v.shape[1], music_dim=m.shape[1], **model_args)
        scaled = lambda f, msg: report(0.05 + 0.95 * f, msg)  # noqa: E731
        system.model, system.metrics = train_vmnet(
            v, m, val_vectors, model_config, train_config, scaled
        )
    else:
        report(0.1, f"fitting {kind}")
        system.projection = baselines.fit_baseline(kind, v, m, n_components)
        if val_vectors is not None:
            system.metrics = {"val": recalls(*system.embed(val.frames, val.music))}
    report(1.0, "trained")
    return system


def evaluate(system: TrainedSystem, test: Features) -> dict:
    """Recall@1/10/25 (fractions) video->music ('V2M') and music->video ('M2V'), and chance."""
    if not len(test):
        raise ValueError("nothing to evaluate: no pairs")
    return recalls(*system.embed(test.frames, test.music))
