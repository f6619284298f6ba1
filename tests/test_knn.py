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
    sims = F.normalize(queries.double(), dim=1) @ F.normalize(bank.double(), dim=1).T
    sims = torch.round(sims * 2.0**40) / 2.0**40  # the protocol's similarity grid
    top, idx = (t[:, :k] for t in sims.sort(dim=1, descending=True, stable=True))  # ties: lower row first
    weights = torch.ones_like(top) if temperature is None else (top / temperature).exp()
    scores = torch.zeros(len(queries), C, dtype=torch.float64)
    for q in range(len(queries)):
        for w, i in zip(weights[q], idx[q]):
            scores[q, labels[i]] += w
    return scores


def collinear(seed=0, n=300, q=60, dim=512):
    """Like an untrained network's features: all within ~1e-3 of one direction, so neighbour
    similarities differ by less than fp32 resolution."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(dim, generator=gen) + 0.5
    labels, q_labels = torch.randint(0, C, (n,), generator=gen), torch.randint(0, C, (q,), generator=gen)
    return (base + 1e-3 * torch.randn(n, dim, generator=gen), labels,
            base + 1e-3 * torch.randn(q, dim, generator=gen), q_labels)


def _check_collinear(rank, world_size):
    bank, labels, queries, _ = collinear()
    start, end = shard_range(len(bank), world_size, rank)
    scores = knn_predict(bank[start:end], labels[start:end], queries, C, k=20, temperature=0.07, chunk=16)
    expected = brute_force(bank, labels, queries, 20, 0.07)
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=0.0)
    assert torch.equal(scores.argmax(1), expected.argmax(1))


def _check_exact_ties(rank, world_size):
    """Many identical bank rows (as an untrained network gives): the k-th place is an exact tie. With
    interleaved shards and their global ids the neighbours are the single-process ones."""
    bank, labels, queries, _ = data(2)
    bank = bank[torch.arange(len(bank)) % 6]  # 6 distinct vectors, each repeated ~16 times
    labels = torch.arange(len(bank)) % C
    rows = torch.arange(rank, len(bank), world_size)  # interleaved, like the suite's batch-split shards
    scores = knn_predict(bank[rows], labels[rows], queries, C, k=K, temperature=0.07, chunk=16, bank_ids=rows)
    expected = brute_force(bank, labels, queries, K, 0.07)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=0.0)


def _check(rank, world_size):
    bank, labels, queries, _ = data()
    start, end = shard_range(len(bank), world_size, rank)
    for temperature in (0.07, None):
        scores = knn_predict(bank[start:end], labels[start:end], queries, C, k=K, temperature=temperature, chunk=16)
        expected = brute_force(bank, labels, queries, K, temperature)
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(scores.argmax(1), expected.argmax(1))


def _check_shards_smaller_than_k(rank, world_size):
    """A shard with fewer rows than k (the monitor's k is 200: a small bank on many ranks), an empty
    shard, and k beyond the whole bank (capped at its size). The padding of a short shard must rank
    after every real neighbour. Crashed before: int64's largest id went through F.pad's float fill."""
    bank, labels, queries, _ = data(3)
    for rows, k in ((8, 4), (8, 50), ((world_size + 1) // 2, 3)):  # the last: one rank holds no row (2, 3 ranks)
        start, end = shard_range(rows, world_size, rank)
        scores = knn_predict(bank[start:end], labels[start:end], queries, C, k=k, temperature=0.07, chunk=16)
        torch.testing.assert_close(scores, brute_force(bank[:rows], labels[:rows], queries, min(k, rows), 0.07),
                                   rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("check", [_check, _check_collinear, _check_exact_ties, _check_shards_smaller_than_k],
                         ids=["brute_force", "nearly_collinear", "exact_ties_to_lower_id", "shards_smaller_than_k"])
def test_sharded_knn_equals_single_process_reference(check, world_size):
    if world_size == 1:
        check(0, 1)
    else:
        run_ranks(check, world_size)


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
