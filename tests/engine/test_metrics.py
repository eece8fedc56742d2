import numpy as np
import pytest

from engine.metrics import recall_at_k


def naive_recall(queries, items, ks):
    """Full argsort per query; ties broken by lower index (a stable sort on -score)."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    v = items / np.linalg.norm(items, axis=1, keepdims=True)
    sims = (q @ v.T).astype(np.float32)
    hits = {k: 0 for k in ks}
    for i, row in enumerate(sims):
        rank = list(np.argsort(-row, kind="stable")).index(i)
        for k in ks:
            hits[k] += rank < k
    return {k: hits[k] / len(q) for k in ks}


def test_perfect_and_known_case():
    x = np.eye(5)
    assert recall_at_k(x, x, ks=(1, 2)) == {1: 1.0, 2: 1.0}
    items = np.roll(np.eye(5), 1, axis=0)  # ground truth never the best match
    r = recall_at_k(np.eye(5), items, ks=(1, 5))
    assert r == {1: 0.0, 5: 1.0}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    # Small integer vectors produce many exactly tied cosine similarities.
    q = rng.integers(1, 4, size=(60, 3)).astype(np.float32)
    v = rng.integers(1, 4, size=(60, 3)).astype(np.float32)
    v[::3] = q[::3]  # some exact duplicates of the ground truth
    v[5] = v[4]  # duplicate items: ties between items
    ks = (1, 5, 10, 25)
    assert recall_at_k(q, v, ks) == pytest.approx(naive_recall(q, v, ks))


def test_all_equal_scores_rank_by_index():
    q = np.ones((4, 2))
    r = recall_at_k(q, q, ks=(1, 2, 4))
    # ground truth i has i items tied ahead of it
    assert r == {1: 0.25, 2: 0.5, 4: 1.0}


def test_more_queries_than_one_chunk_match_naive_reference_with_ties():
    # 4096 queries a chunk: the second chunk's ground truths sit at an offset.
    rng = np.random.default_rng(3)
    n = 4500
    q = rng.integers(0, 4, size=(n, 6)).astype(np.float32)
    q[q.sum(axis=1) == 0, 0] = 1.0  # no zero vectors
    v = q + rng.integers(-1, 2, size=(n, 6)).astype(np.float32)
    v[v.sum(axis=1) == 0, 0] = 1.0  # integer vectors: many exactly tied scores
    v[::3] = q[::3]  # some exact duplicates of the ground truth
    ks = (1, 5, 10, 25)
    expected = naive_recall(q, v, ks)
    assert 0.05 < expected[1] < expected[25] < 1.0
    assert recall_at_k(q, v, ks) == pytest.approx(expected)
