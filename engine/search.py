"""Exact top-k cross-modal search: chunked matrix products + top-k on the best device.

Inputs are L2-normalised embeddings, so the dot product is the cosine similarity
(d(a, b) = -a.b in the paper). Results are exact and deterministic: best first, ties
broken by the lower item index, equal to a brute-force full sort. FAISS (an exact flat
inner-product index) sits behind the same function for CPU hosts, where it is faster.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.devices import best_device

METHODS = ("auto", "torch", "faiss")
# Bytes of similarity scores held at once per query chunk.
_CHUNK_BYTES = {"cuda": 2 << 30, "cpu": 256 << 20}


def top_k(
    queries,
    items,
    k: int = 10,
    *,
    device=None,
    chunk_size: int | None = None,
    method: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """The k items most similar to each query: `(indices (n, k) int64, scores (n, k) float32)`.

    `queries` (n, d) and `items` (m, d) are arrays or tensors. `method="auto"` uses torch on
    CUDA (or the FAISS GPU build where installed) and FAISS on CPU; `chunk_size` is the number
    of queries scored at once (default: as many as fit a fixed memory budget).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    queries, items = _as_float32(queries), _as_float32(items)
    if queries.ndim != 2 or items.ndim != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(f"need (n, d) and (m, d) arrays, got {queries.shape} and {items.shape}")
    if not 1 <= k <= items.shape[0]:
        raise ValueError(f"k must be in 1..{items.shape[0]}, got {k}")
    device = best_device(device)
    if method == "auto":
        method = "faiss" if device.type == "cpu" or _faiss_gpus() else "torch"
    if method == "faiss":
        return _top_k_faiss(queries, items, k)
    return _top_k_torch(queries, items, k, device, chunk_size)


def _as_float32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _faiss_gpus() -> int:
    try:
        import faiss
    except ImportError:
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _top_k_torch(queries, items, k, device, chunk_size):
    items_t = torch.from_numpy(items).to(device)
    if chunk_size is None:
        budget = _CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
        chunk_size = max(1, budget // (4 * items.shape[0]))
    indices = np.empty((queries.shape[0], k), dtype=np.int64)
    scores = np.empty((queries.shape[0], k), dtype=np.float32)
    for start in range(0, queries.shape[0], chunk_size):
        chunk = torch.from_numpy(queries[start : start + chunk_size]).to(device)
        idx, val = _select(chunk @ items_t.T, k)
        indices[start : start + len(chunk)] = idx.cpu().numpy()
        scores[start : start + len(chunk)] = val.cpu().numpy()
    return indices, scores


def _select(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of `sims`, ties broken by the lower column index.

    torch.topk picks arbitrarily among equal values, so rows with a tie at the k-th score are
    redone with a stable full sort (rare on real embeddings), and every row's k results are
    ordered by (score descending, index ascending).
    """
    val, idx = torch.topk(sims, k, dim=1)
    tied = (sims >= val[:, -1:]).sum(dim=1) > k
    if tied.any():
        rows = tied.nonzero().squeeze(1)
        full = torch.sort(sims[rows], dim=1, descending=True, stable=True)
        val[rows], idx[rows] = full.values[:, :k], full.indices[:, :k]
    return _order(idx, val)


def _order(idx: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    by_index = torch.argsort(idx, dim=1)
    idx, val = idx.gather(1, by_index), val.gather(1, by_index)
    by_score = torch.argsort(val, dim=1, descending=True, stable=True)
    return idx.gather(1, by_score), val.gather(1, by_score)


def _top_k_faiss(queries, items, k):
    """Exact search with faiss.IndexFlatIP; rows whose k-th score ties with the next one are
    redone exactly with torch so that ties go to the lower index, as in the torch path."""
    import faiss

    index = faiss.IndexFlatIP(items.shape[1])
    if _faiss_gpus():
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(items)
    extra = min(k + 1, items.shape[0])
    val, idx = index.search(queries, extra)
    tied = val[:, k - 1] == val[:, extra - 1] if extra > k else np.zeros(len(val), bool)
    idx, val = (
        t.numpy() for t in _order(torch.from_numpy(idx[:, :k]), torch.from_numpy(val[:, :k]))
    )
    if tied.any():
        rows = np.flatnonzero(tied)
        idx[rows], val[rows] = _top_k_torch(queries[rows], items, k, torch.device("cpu"), None)
    return idx.astype(np.int64), val.astype(np.float32)
