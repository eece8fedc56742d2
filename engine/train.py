"""Training VM-NET (Eq. 5): Adam, mini-batches of pairs, early stopping on validation R@10."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.features.video import best_device
from engine.losses import ranking_loss, structure_loss
from engine.metrics import recall_at_k
from engine.model import VMNet, VMNetConfig


@dataclass
class TrainConfig:
    lambdas: tuple[float, float, float, float] = (1.0, 1.0, 0.2, 0.2)  # vm, mv, vv, mm
    lr: float = 3e-4
    weight_decay: float = 0.0  # AdamW's decoupled decay (0: plain Adam, the paper's); small data
    batch_size: int = 2000  # paper: 2000 pairs
    top_k: int | None = 1000  # most violating negatives per anchor (paper's best: 1000)
    margin: float = 0.1
    max_epochs: int = 300
    patience: int = 30  # epochs without a better validation R@10
    seed: int = 0
    device: str | None = None  # None: CUDA when available
    mixed_precision: bool = True  # autocast on CUDA only


def evaluate_embeddings(video_emb, music_emb, ks=(1, 10, 25)) -> dict:
    """Recall@K in both directions; keys like 'V2M_R@10' (fractions 0..1) and 'chance_R@10'."""
    n = len(video_emb)
    out = {}
    for name, q, items in (("V2M", video_emb, music_emb), ("M2V", music_emb, video_emb)):
        for k, r in recall_at_k(q, items, ks).items():
            out[f"{name}_R@{k}"] = r
    for k in ks:
        out[f"chance_R@{k}"] = min(k, n) / n
    return out


def _embed(model: VMNet, video: torch.Tensor, music: torch.Tensor):
    model.eval()
    with torch.no_grad():
        return model(video, music)


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
    # AdamW with no decay is Adam; decay keeps a model fitted on a few hundred pairs small.
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    use_amp = config.mixed_precision and device.type == "cuda"
    # The whole data set lives on the device: the vectors are small (n x ~1-2k floats).
    v_all = torch.as_tensor(video, dtype=torch.float32, device=device)
    m_all = torch.as_tensor(music, dtype=torch.float32, device=device)
    if val is not None:
        v_val = torch.as_tensor(val[0], dtype=torch.float32, device=device)
        m_val = torch.as_tensor(val[1], dtype=torch.float32, device=device)
    n = len(v_all)
    batch = min(config.batch_size, n)
    steps_per_epoch = math.ceil(n / batch)
    l1, l2, l3, l4 = config.lambdas
    history: list[dict] = []
    best = {"score": -1.0, "epoch": 0, "state": None, "metrics": {}}
    bar = tqdm(range(config.max_epochs), desc="train", leave=False, disable=None)

    def validation_metrics():
        if val is None:
            return {}
        ve, me = _embed(model, v_val, m_val)
        return evaluate_embeddings(ve.float().cpu().numpy(), me.float().cpu().numpy())

    initial = validation_metrics()
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch : (step + 1) * batch]
            if len(idx) < 3:  # batch norm and the structure loss need a few items
                continue
            v, m = v_all[idx], m_all[idx]
            with torch.autocast(device.type, enabled=use_amp):
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
            total += loss.item()
        record = {"epoch": epoch + 1, "loss": total / steps_per_epoch} | validation_metrics()
        history.append(record)
        score = (record.get("V2M_R@10", 0) + record.get("M2V_R@10", 0)) / 2 if val else epoch
        if score > best["score"]:
            best = {
                "score": score,
                "epoch": epoch + 1,
                "state": copy.deepcopy(model.state_dict()),
                "metrics": record,
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
