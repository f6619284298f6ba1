"""Sharded kNN == brute-force single-process kNN (and scikit-learn's unweighted kNN)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ifc_ds.classifier import shard_range
from ifc_ds.knn import knn_predict, topk_accuracy
from tests._dist import run_ranks

C, K = 5, 7


def data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(C, 16, generator=gen)
    labels = torch.randint(0, C, (97,), generator=gen)
    bank = centers[labels] + torch.randn(97, 16, generator=gen) * 1.5
    q_labels = torch.randint(0, C, (41,), generator=gen)
    queries = centers[q_labels] + torch.randn(41, 16, generator=gen) * 1.5
    return bank, labels, queries, q_labels


def brute_force(bank, labels, queries, k, temperature):
    sims = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T
    top, idx = sims.topk(k, dim=1)
    weights = torch.ones_like(top) if temperature is None else (top / temperature).exp()
    scores = torch.zeros(len(queries), C)
    for q in range(len(queries)):
        for w, i in zip(weights[q], idx[q]):
            scores[q, labels[i]] += w
    return scores


def _check(rank, world_size):
    bank, labels, queries, _ = data()
    start, end = shard_range(len(bank), world_size, rank)
    for temperature in (0.07, None):
        scores = knn_predict(bank[start:end], labels[start:end], queries, C, k=K, temperature=temperature, chunk=16)
        expected = brute_force(bank, labels, queries, K, temperature)
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(scores.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharded_knn_equals_brute_force(world_size):
    if world_size == 1:
        _check(0, 1)
    else:
        run_ranks(_check, world_size)


def test_unweighted_matches_sklearn():
    from sklearn.neighbors import KNeighborsClassifier

    bank, labels, queries, _ = data(1)
    unit_bank, unit_q = F.normalize(bank, dim=1).numpy(), F.normalize(queries, dim=1).numpy()
    ref = KNeighborsClassifier(n_neighbors=K, metric="cosine", algorithm="brute").fit(unit_bank, labels.numpy())
    ours = knn_predict(bank, labels, queries, C, k=K, temperature=None)
    # sklearn breaks vote ties by the lowest class, like argmax
    assert np.array_equal(ours.argmax(1).numpy(), ref.predict(unit_q))


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(scores, torch.tensor([1, 1, 0]), ks=(1, 2))
    assert acc[1] == pytest.approx(1 / 3) and acc[2] == pytest.approx(2 / 3)
