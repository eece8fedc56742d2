"""engine.search.top_k against a brute-force full sort, ties included, on every method."""

import numpy as np
import pytest
import torch

from engine.search import top_k

METHODS = ["torch", "faiss"]


def brute_force(queries, items, k):
    """Full float64 similarity matrix, stable sort: best first, ties to the lower index."""
    sims = queries.astype(np.float64) @ items.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def normalised(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_equals_brute_force_on_random_embeddings(method, chunk_size):
    rng = np.random.default_rng(0)
    queries, items = normalised(rng, 50, 32), normalised(rng, 300, 32)
    indices, scores = top_k(queries, items, k=10, method=method, chunk_size=chunk_size)
    expected_indices, expected_scores = brute_force(queries, items, 10)
    assert indices.dtype == np.int64 and scores.dtype == np.float32
    assert indices.shape == scores.shape == (50, 10)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_ties_go_to_the_lower_item_index(method):
    # Small integer vectors: every dot product is exact in float32, so ties are real ties.
    rng = np.random.default_rng(1)
    items = rng.integers(-1, 2, size=(200, 6)).astype(np.float32)
    items[150:] = items[:50]  # exact duplicates, listed later
    queries = rng.integers(-1, 2, size=(40, 6)).astype(np.float32)
    sims = queries @ items.T
    assert all(len(np.unique(row)) < len(row) for row in sims)  # ties everywhere
    for k in (1, 5, 17):
        indices, scores = top_k(queries, items, k=k, method=method, chunk_size=9)
        expected_indices, expected_scores = brute_force(queries, items, k)
        np.testing.assert_array_equal(indices, expected_indices)
        np.testing.assert_array_equal(scores, expected_scores)


def test_all_equal_scores_give_the_first_k_items():
    items = np.ones((30, 4), np.float32) / 2
    indices, _ = top_k(np.ones((3, 4), np.float32) / 2, items, k=4, method="torch")
    np.testing.assert_array_equal(indices, np.tile(np.arange(4), (3, 1)))


def test_accepts_tensors_and_checks_arguments():
    rng = np.random.default_rng(2)
    queries, items = normalised(rng, 5, 8), normalised(rng, 20, 8)
    indices, _ = top_k(torch.from_numpy(queries), torch.from_numpy(items), k=3)
    np.testing.assert_array_equal(indices, brute_force(queries, items, 3)[0])
    with pytest.raises(ValueError):
        top_k(queries, items, k=21)
    with pytest.raises(ValueError):
        top_k(queries, items[:, :4], k=3)
    with pytest.raises(ValueError):
        top_k(queries, items, k=3, method="annoy")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    rng = np.random.default_rng(3)
    queries, items = normalised(rng, 500, 64), normalised(rng, 3000, 64)
    cpu = top_k(queries, items, k=10, device="cpu", method="torch")
    cuda = top_k(queries, items, k=10, device="cuda", method="torch", chunk_size=128)
    np.testing.assert_array_equal(cuda[0], cpu[0])
    np.testing.assert_allclose(cuda[1], cpu[1], atol=1e-5)
