"""VM-NET's training losses (Sec. III-C, Eq. 1-6). Distance d(a, b) = -a.b on L2-normalised rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ranking_loss(
    x: torch.Tensor, y: torch.Tensor, margin: float = 0.1, top_k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inter-modal ranking loss, Eq. 1 (x anchors) and Eq. 2 (y anchors).

    Row i of `x` pairs with row i of `y`. For every anchor, the `top_k` negatives with the
    smallest distance (the most violating ones; all N-1 when `top_k` is None) each give
    max(0, margin + d(anchor, positive) - d(anchor, negative)); each loss is the mean over
    anchors and their negatives.
    """
    n = x.shape[0]
    dist = -(x @ y.T)  # dist[i, j] = d(x_i, y_j)
    positive = dist.diagonal()
    k = n - 1 if top_k is None else min(top_k, n - 1)
    eye = torch.eye(n, dtype=torch.bool, device=dist.device)
    # Exclude the positive from the negatives by pushing it to +inf distance.
    negatives = dist.masked_fill(eye, float("inf"))
    loss_xy = _hinge(margin, positive[:, None], negatives, k)
    loss_yx = _hinge(margin, positive[:, None], negatives.T, k)
    return loss_xy, loss_yx


def _hinge(margin, positive, negatives, k):
    # Unsorted: the mean needs no order, and skipping the sort halves the selection's cost.
    closest = negatives.topk(k, dim=1, largest=False, sorted=False).values  # (n, k)
    return F.relu(margin + positive - closest).mean()


def structure_loss(inputs: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Soft intra-modal structure loss, Eq. 3/4 with the sign form of Eq. 6.

    For an anchor i and two other items j, k: with hat-distances on the L2-normalised
    inputs and plain distances on the embeddings,
    l = (sign(D) - sign(D_hat)) * D, D = d(e_i, e_j) - d(e_i, e_k), which is >= 0 and is 0
    whenever the embedding keeps the inputs' order. Gradients flow through D only.

    Triplets: as in the authors' release, consecutive pairs — for every anchor i, the
    other items in batch order j_1 < j_2 < ... give the triplets (i, j_t, j_t+1), i.e.
    N (N - 2) triplets (the release also let j be the anchor itself; we exclude it, as
    the paper asks for three different items). The loss is the mean over them.
    """
    n = inputs.shape[0]
    if n < 3:
        return embeddings.sum() * 0.0
    x_hat = F.normalize(inputs.float(), dim=1)
    d_hat = -(x_hat @ x_hat.T)
    d = -(embeddings @ embeddings.T)
    # Elementwise ops and views only (no boolean indexing: it syncs with the GPU and its
    # backward scatters). In row i the consecutive others are the steps (j, j+1) that do
    # not touch i, plus the bridge (i-1, i+1) over it.
    steps = _triplet_terms(d[:, :-1] - d[:, 1:], d_hat[:, :-1] - d_hat[:, 1:])
    rows = torch.arange(n, device=d.device)[:, None]
    cols = torch.arange(n - 1, device=d.device)[None, :]
    steps = steps * ((cols != rows) & (cols + 1 != rows))
    bridges = _triplet_terms(
        d.diagonal(-1)[:-1] - d.diagonal(1)[1:], d_hat.diagonal(-1)[:-1] - d_hat.diagonal(1)[1:]
    )
    return (steps.sum() + bridges.sum()) / (n * (n - 2))


def _triplet_terms(delta: torch.Tensor, delta_hat: torch.Tensor) -> torch.Tensor:
    """Eq. 6 per triplet: (sign(D) - sign(D_hat)) * D, the gradient through D only."""
    return (torch.sign(delta) - torch.sign(delta_hat)).detach() * delta
