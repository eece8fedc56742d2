import itertools

import pytest
import torch
import torch.nn.functional as F

from engine.losses import ranking_loss, structure_loss


def test_ranking_loss_hand_computed():
    # Unit vectors at angles: x0 = (1,0), x1 = (0,1); y0 = (1,0), y1 = (0.6,0.8)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # d = -x.y: d(x0,y0) = -1, d(x0,y1) = -0.6, d(x1,y0) = 0, d(x1,y1) = -0.8
    lxy, lyx = ranking_loss(x, y, margin=0.5)
    # x anchors: max(0, .5 - 1 + .6) = .1 ; max(0, .5 - .8 - 0) = 0 -> mean .05
    assert lxy.item() == pytest.approx(0.05)
    # y anchors: y0: pos -1, neg d(x1,y0) = 0 -> 0 ; y1: pos -0.8, neg d(x0,y1) = -0.6 -> .3
    assert lyx.item() == pytest.approx(0.15)


def test_ranking_loss_top_k_takes_most_violating_negatives():
    torch.manual_seed(0)
    x = F.normalize(torch.randn(6, 4), dim=1)
    y = F.normalize(torch.randn(6, 4), dim=1)
    d = -(x @ y.T)
    lxy, _ = ranking_loss(x, y, margin=0.2, top_k=2)
    expected = []
    for i in range(6):
        negatives = sorted(d[i, j].item() for j in range(6) if j != i)[:2]
        expected += [max(0.0, 0.2 + d[i, i].item() - n) for n in negatives]
    assert lxy.item() == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    all_xy, _ = ranking_loss(x, y, margin=0.2, top_k=None)
    assert all_xy.item() < lxy.item()  # averaging in easier negatives dilutes the loss


def test_ranking_loss_top_k_beyond_the_batch_takes_every_negative_and_never_the_positive():
    torch.manual_seed(2)
    n = 5
    x = F.normalize(torch.randn(n, 4), dim=1)
    y = F.normalize(torch.randn(n, 4), dim=1)
    every = ranking_loss(x, y, margin=0.3, top_k=n - 1)
    beyond = ranking_loss(x, y, margin=0.3, top_k=n + 5)
    assert every[0].item() > 0 and every[1].item() > 0
    assert [v.item() for v in beyond] == pytest.approx([v.item() for v in every], abs=1e-7)
    assert [v.item() for v in ranking_loss(x, y, margin=0.3)] == pytest.approx(
        [v.item() for v in every], abs=1e-7
    )


def test_ranking_loss_zero_when_pairs_are_well_separated():
    x = torch.eye(4)
    lxy, lyx = ranking_loss(x, x.clone(), margin=0.1)
    assert lxy.item() == 0 and lyx.item() == 0


def test_structure_loss_zero_when_order_kept_positive_otherwise():
    torch.manual_seed(1)
    inputs = torch.randn(8, 5)
    # Any positive scaling of the normalised inputs keeps every distance order.
    kept = F.normalize(inputs, dim=1)
    assert structure_loss(inputs, kept).item() == 0.0
    emb = F.normalize(torch.randn(8, 5), dim=1).requires_grad_()
    loss = structure_loss(inputs, emb)
    assert loss.item() > 0
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_structure_loss_hand_computed_three_items():
    # Anchor 0, others 1 and 2 (the only triplet per anchor with N = 3).
    inputs = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    # In the input, item 1 is closer to item 0 than item 2 is; the embedding swaps them.
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    # anchor 0: d_hat = (-0.8, 0) -> delta_hat = -0.8 (sign -1); d = (0, -0.8) -> delta 0.8 (sign +1)
    #   l = (1 - (-1)) * 0.8 = 1.6
    # anchor 1: others (0, 2): d_hat = (-0.8, -0.6) -> -0.2; d = (0, -0.6) -> +0.6 -> l = 1.2
    # anchor 2: others (0, 1): d_hat = (0, -0.6) -> +0.6; d = (-0.8, -0.6) -> -0.2 -> l = 0.4
    assert structure_loss(inputs, emb).item() == pytest.approx((1.6 + 1.2 + 0.4) / 3)


def test_structure_loss_equals_the_documented_triplets():
    # Oracle: the triplets the docstring names, enumerated one by one.
    torch.manual_seed(2)
    n = 7
    inputs, emb = torch.randn(n, 4), F.normalize(torch.randn(n, 3), dim=1)
    x_hat = F.normalize(inputs, dim=1)
    terms = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for j, k in itertools.pairwise(others):
            delta = -(emb[i] @ emb[j]) + emb[i] @ emb[k]
            delta_hat = -(x_hat[i] @ x_hat[j]) + x_hat[i] @ x_hat[k]
            terms.append((torch.sign(delta) - torch.sign(delta_hat)) * delta)
    assert len(terms) == n * (n - 2)
    expected = torch.stack(terms).mean()
    assert structure_loss(inputs, emb).item() == pytest.approx(expected.item(), rel=1e-6)
