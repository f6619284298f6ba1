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


def _reference_digits(rows: int):
    """sklearn's digits as the embedded dataset defines them (8x8 scaled to 32x32 RGB), decoded here with
    PIL and numpy alone: [rows, 3, 32, 32] uint8 and labels [rows]."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [np.asarray(Image.fromarray((img / 16.0 * 255).astype(np.uint8), mode="L")
                         .resize((32, 32), Image.BILINEAR).convert("RGB")) for img in digits.images[:rows]]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.from_numpy(digits.target[:rows])


def _check_monitor(rank, world_size, queries_from):
    """The kNN monitor's bank and queries, features, labels and ids, against the same rows decoded and
    encoded here in one batch; its top-1 is that of the scores of the kNN it ran."""
    import torch.distributed as dist

    import ifc_ds.knn_monitor as monitor_module
    from ifc_ds.augment import DeviceViews
    from ifc_ds.config import load_config
    from ifc_ds.knn_monitor import holdout_rows
    from ifc_ds.model import InstanceEncoder, data_config

    split = (["eval.holdout=0.2"] if queries_from != "test"
             else ["eval.test=sklearn:digits", "eval.limit_test=40"])  # queries: the first 40 rows, bank: 150
    # a streaming spec (as data.train may be) is read map-style: its held-out rows are picked (crashed before)
    bank_spec = "sklearn:digits:streaming=true" if queries_from == "holdout of a stream" else "sklearn:digits"
    cfg = load_config(None, ["model.name=test_resnet", "model.head_hidden=16", "model.dim=8", "data.image_size=32",
                             f"eval.train={bank_spec}", "eval.limit_train=150", "eval.k=10", "eval.batch_size=16",
                             *split])
    torch.manual_seed(0)
    encoder = InstanceEncoder(cfg.model, 32)
    mean, std = data_config(cfg.model.name)
    passes, knn_calls = [], []

    def extract_spy(*args, **kwargs):
        passes.append(extract_features(*args, **kwargs))
        return passes[-1]

    def knn_spy(*args, **kwargs):
        knn_calls.append((args, kwargs, knn_predict(*args, **kwargs)))
        return knn_calls[-1][2]

    extract_features = monitor_module.extract_features
    monitor_module.extract_features, monitor_module.knn_predict = extract_spy, knn_spy
    monitor = monitor_module.KnnMonitor(cfg, DeviceViews(cfg.augment, 32, mean, std), num_workers=0)
    encoder.train()
    top1 = monitor(encoder, torch.device("cpu"))
    assert encoder.training  # left as it was

    images, labels = _reference_digits(150)
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        reference = encoder.eval().backbone_features((images.float() / 255 - mean) / std)
    bank_rows, query_rows = holdout_rows(150, 0.2) if queries_from != "test" else (range(150), range(40))
    (bank_f, bank_y, bank_ids), (query_f, query_y, query_ids) = passes
    shards = [None] * world_size if world_size > 1 else [bank_ids.tolist()]
    if world_size > 1:
        dist.all_gather_object(shards, bank_ids.tolist())
    assert sorted(sum(shards, [])) == list(range(len(bank_rows)))  # every bank row on one rank, once
    assert sorted(query_ids.tolist()) == list(range(len(query_rows)))  # every query on every rank
    for feats, ys, ids, rows in ((bank_f, bank_y, bank_ids, bank_rows), (query_f, query_y, query_ids, query_rows)):
        global_rows = torch.tensor(rows)[ids]
        torch.testing.assert_close(feats, reference[global_rows], rtol=1e-4, atol=1e-5)
        assert torch.equal(ys, labels[global_rows])
    (args, kwargs, scores), = knn_calls
    assert args[0] is bank_f and args[2] is query_f and torch.equal(kwargs["bank_ids"], bank_ids)
    assert args[3:6] == (10, cfg.eval.k, cfg.eval.temperature)  # classes, k, T
    assert top1 == topk_accuracy(scores, query_y, ks=(1,))[1]


def test_holdout_rows_are_a_fixed_random_split():
    """Not the last rows: data stored class after class (an imagefolder) kept its last classes out of
    the bank, and the monitor read 0% (10 classes of 30 rows, the last 30% held out: 3 classes)."""
    from ifc_ds.knn_monitor import holdout_rows

    labels = np.repeat(np.arange(10), 30)
    bank, queries = holdout_rows(300, 0.3)
    assert len(queries) == 90 and sorted(bank + queries) == list(range(300))
    assert bank == sorted(bank) and queries == sorted(queries)
    assert set(labels[bank]) == set(labels[queries]) == set(range(10))
    assert holdout_rows(300, 0.3) == (bank, queries)  # the same split in every run and on every rank
    assert holdout_rows(300, 0.3, seed=1) != (bank, queries)
    assert len(holdout_rows(5, 0.01)[1]) == 1  # at least one query


@pytest.mark.parametrize("world_size, queries_from", [(1, "holdout"), (2, "test"), (3, "holdout of a stream")])
def test_knn_monitor_sees_the_right_rows(world_size, queries_from):
    if world_size == 1:
        _check_monitor(0, 1, queries_from)
    else:
        run_ranks(_check_monitor, world_size, queries_from)
