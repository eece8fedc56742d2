"""Training VM-NET (Eq. 5): Adam, mini-batches of pairs, early stopping on validation R@10."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.devices import best_device
from engine.losses import ranking_loss, structure_loss
from engine.metrics import recalls
from engine.model import VMNet, VMNetConfig


@dataclass
class TrainConfig:
    # Weights of L_vm (video anchor), L_mv, L_vv, L_mm (Eq. 5). The paper's Table II keeps
    # (λ1, λ2) = (3, 1) after comparing it with (1, 1), (1, 3) and (5, 1); λ3, λ4 as in the
    # authors' release (which puts its 3 on the music anchor's loss instead).
    lambdas: tuple[float, float, float, float] = (3.0, 1.0, 0.2, 0.2)
    lr: float = 3e-4
    weight_decay: float = 0.0  # AdamW's decoupled decay (0: plain Adam, the paper's); small data
    batch_size: int = 2000  # paper: 2000 pairs
    # Most violating negatives per anchor (paper's best: 1000); a batch of fewer pairs gives
    # each anchor all its negatives.
    top_k: int | None = 1000
    margin: float = 0.1
    max_epochs: int = 300
    patience: int = 30  # epochs without a better validation R@10
    seed: int = 0
    device: str | None = None  # None: CUDA when available
    mixed_precision: bool = True  # autocast on CUDA only
    # CUDA only: each step replays one captured graph (an epoch's last partial batch is left
    # out, as every batch must have the same shape); eager, a step's ~1200 operators are
    # launched one by one from Python, which takes longer than the GPU work at batch 2000.
    cuda_graph: bool = True

    def __post_init__(self):
        # A config comes from a researcher's JSON: refuse values that would train on NaN or
        # fail mid-run, with the field's name.
        problems = []
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"top_k must be at least 1 (or null: all negatives), not {self.top_k}")
        if len(self.lambdas) != 4 or min(self.lambdas) < 0:
            problems.append(f"lambdas must be 4 weights >= 0 (vm, mv, vv, mm), not {self.lambdas}")
        for name, low in (("batch_size", 2), ("max_epochs", 1), ("patience", 1)):
            if getattr(self, name) < low:
                problems.append(f"{name} must be at least {low}, not {getattr(self, name)}")
        for name in ("lr", "margin"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be above 0, not {getattr(self, name)}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, not {self.weight_decay}")
        if problems:
            raise ValueError("; ".join(problems))


def _embed(model: VMNet, video: torch.Tensor, music: torch.Tensor):
    model.eval()
    with torch.no_grad():
        return model(video, music)


def training_step(
    model: VMNet, config: TrainConfig, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A function that takes one optimisation step (Eq. 5) on a batch of paired rows and
    returns the batch's loss as a device tensor (reading it would wait for the GPU).

    AdamW with no decay (the default) is the paper's Adam; decay keeps a model fitted on a
    few hundred pairs small."""
    graphed = device.type == "cuda" and config.cuda_graph
    optimiser = torch.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        weight_decay=config.weight_decay,
        fused=device.type == "cuda",  # one kernel for all parameters
        capturable=graphed,  # its step count on the device, as a graph needs
    )
    use_amp = config.mixed_precision and device.type == "cuda"
    l1, l2, l3, l4 = config.lambdas

    def step(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        # Autocast's weight cache would hold tensors from outside a graph's memory pool.
        with torch.autocast(device.type, enabled=use_amp, cache_enabled=False):
            ve, me = model(v, m)
        ve, me = ve.float(), me.float()
        loss_vm, loss_mv = ranking_loss(ve, me, config.margin, config.top_k)
        loss = l1 * loss_vm + l2 * loss_mv
        if l3:
            loss = loss + l3 * structure_loss(v, ve)
        if l4:
            loss = loss + l4 * structure_loss(m, me)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return loss.detach()

    return _GraphedStep(step) if graphed else step


class _GraphedStep:
    """`step` captured once as a CUDA graph and replayed for every later batch.

    The first WARMUP calls run eagerly on a side stream (so that lazily made state, the
    optimiser's moments and cuBLAS's workspaces, exists before the capture, as CUDA graphs
    require); the next call captures the step on its batch and replays it; later calls copy
    their batch into the captured inputs and replay. The gradients are None when the capture
    starts (the step sets them so), so the graph's backward writes them afresh each replay.
    """

    WARMUP = 3

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.step = step
        self.warm_calls = 0
        self.side = torch.cuda.Stream()
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if self.graph is None and self.warm_calls < self.WARMUP:
            self.warm_calls += 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                loss = self.step(v, m)
            torch.cuda.current_stream().wait_stream(self.side)
            return loss
        if self.graph is None:
            self.inputs = (v.clone(), m.clone())
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = self.step(*self.inputs)
        elif (v.shape, m.shape) != (self.inputs[0].shape, self.inputs[1].shape):
            raise ValueError(f"a graphed step takes batches of {tuple(self.inputs[0].shape)}")
        else:
            self.inputs[0].copy_(v)
            self.inputs[1].copy_(m)
        self.graph.replay()
        return self.loss.clone()  # the next replay overwrites self.loss


def train_vmnet(
    video: np.ndarray,
    music: np.ndarray,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    model_config: VMNetConfig | None = None,
    config: TrainConfig | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> tuple[VMNet, dict]:
    """Train on normalised video/music vectors (row i pairs with row i).

    Returns the model with the best validation R@10 (mean of both directions; the last
    epoch's when there is no validation set) and a metrics dict with its history.
    """
    config = config or TrainConfig()
    model_config = model_config or VMNetConfig(video_dim=video.shape[1], music_dim=music.shape[1])
    device = best_device(config.device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = VMNet(model_config).to(device)
    step = training_step(model, config, device)
    # The whole data set lives on the device: the vectors are small (n x ~1-2k floats).
    v_all = torch.as_tensor(video, dtype=torch.float32, device=device)
    m_all = torch.as_tensor(music, dtype=torch.float32, device=device)
    if val is not None:
        v_val = torch.as_tensor(val[0], dtype=torch.float32, device=device)
        m_val = torch.as_tensor(val[1], dtype=torch.float32, device=device)
    n = len(v_all)
    batch = min(config.batch_size, n)
    same_shapes = isinstance(step, _GraphedStep)
    steps_per_epoch = n // batch if same_shapes else math.ceil(n / batch)
    history: list[dict] = []
    best = {"score": -1.0, "epoch": 0, "state": None, "metrics": {}}
    bar = tqdm(range(config.max_epochs), desc="train", leave=False, disable=None)

    def validation_metrics():
        if val is None:
            return {}
        ve, me = _embed(model, v_val, m_val)
        return recalls(ve.float().cpu().numpy(), me.float().cpu().numpy())

    initial = validation_metrics()
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        total = torch.zeros((), device=device)  # summed on the device: no wait per step
        taken = 0
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            if len(idx) < 3:  # batch norm and the structure loss need a few items
                continue
            total += step(v_all[idx], m_all[idx])
            taken += 1
        record = {"epoch": epoch + 1, "loss": total.item() / max(taken, 1)}
        if val is not None:
            record["val"] = validation_metrics()
        history.append(record)
        score = (record["val"]["V2M"]["R@10"] + record["val"]["M2V"]["R@10"]) / 2 if val else epoch
        if score > best["score"]:
            best = {
                "score": score,
                "epoch": epoch + 1,
                "state": copy.deepcopy(model.state_dict()),
                "metrics": record.get("val", {}),
            }
        bar.set_postfix(loss=f"{record['loss']:.4f}", r10=f"{score:.3f}" if val else "-")
        if progress:
            progress(
                (epoch + 1) / config.max_epochs, f"epoch {epoch + 1}: loss {record['loss']:.4f}"
            )
        if val is not None and epoch + 1 - best["epoch"] >= config.patience:
            break
    model.load_state_dict(best["state"])
    model.eval()
    if progress:
        progress(1.0, f"done: best epoch {best['epoch']}")
    metrics = {
        "best_epoch": best["epoch"],
        "val": best["metrics"],
        "val_untrained": initial,
        "history": history,
        "train_config": asdict(config),
    }
    return model, metrics
