"""Recall@K for cross-modal retrieval (Sec. V-A)."""

from __future__ import annotations

import numpy as np
import torch

KS = (1, 10, 25)  # the paper's Recall@K


def recalls(video_emb, music_emb, ks=KS) -> dict:
    """Recall@K (fractions) video->music ('V2M') and music->video ('M2V') of paired rows, by
    chance, and their number: {'V2M': {'R@1': …}, 'M2V': {…}, 'chance': {…}, 'n': n}."""
    n = len(video_emb)
    return {
        "V2M": {f"R@{k}": r for k, r in recall_at_k(video_emb, music_emb, ks).items()},
        "M2V": {f"R@{k}": r for k, r in recall_at_k(music_emb, video_emb, ks).items()},
        "chance": {f"R@{k}": min(k, n) / n for k in ks},
        "n": n,
    }


def recall_at_k(queries, items, ks=KS) -> dict[int, float]:
    """Share (0..1) of queries whose ground truth (the item in the same row) is in the top k.

    Cosine similarity. Ties are broken as `engine.search.top_k` breaks them (lower index
    first), so Recall@K agrees with the result lists a search shows: the ground truth's
    rank is the number of items scoring higher, plus those scoring equal at a lower index.
    """
    q = torch.nn.functional.normalize(
        torch.as_tensor(np.asarray(queries), dtype=torch.float32), dim=1
    )
    v = torch.nn.functional.normalize(
        torch.as_tensor(np.asarray(items), dtype=torch.float32), dim=1
    )
    if q.shape != v.shape:
        raise ValueError(
            f"queries {tuple(q.shape)} and items {tuple(v.shape)} must pair row by row"
        )
    ranks = torch.empty(q.shape[0], dtype=torch.long)
    for start in range(0, q.shape[0], 4096):  # bounded memory for large test sets
        sims = q[start : start + 4096] @ v.T
        rows = torch.arange(sims.shape[0])
        truth = sims[rows, rows + start]
        gt = (rows + start)[:, None]
        ahead = (sims > truth[:, None]) | (
            (sims == truth[:, None]) & (torch.arange(v.shape[0]) < gt)
        )
        ranks[start : start + sims.shape[0]] = ahead.sum(dim=1)
    return {int(k): float((ranks < k).float().mean()) for k in ks}
