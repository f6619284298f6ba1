"""Weighted kNN classification on frozen features (InstDisc / DINO protocol), bank sharded over ranks.

Each rank holds a slice of the labelled bank. For a chunk of queries (the same on every rank) each
rank finds its local top-k cosine neighbours, the ``[P, Q, k]`` candidates are all-gathered and
merged to the global top-k, and every rank votes ``exp(sim / T)`` per class. A bank of millions of
rows never sits on one rank, and memory is bounded by the query chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ifc_ds.collectives import all_gather_equal, rank_in


def _topk_ties_to_lower_id(vals: torch.Tensor, ids: torch.Tensor, k: int):
    """(values [Q, k], positions [Q, k]) of each row's k largest ``vals [Q, n]``; an exact tie across
    the k-th place goes to the lower ``ids [Q, n]``. torch.topk leaves that choice unspecified, so
    different shardings would pick different neighbours (untrained networks give many exact ties)."""
    top, pos = vals.topk(k, dim=1)
    if k == 0:
        return top, pos
    kth = top[:, -1:]
    tied = ((vals == kth).sum(1) > (top == kth).sum(1)).nonzero().flatten()  # more ties than places
    if len(tied):
        by_id = ids[tied].argsort(dim=1, stable=True)  # then a stable sort by value keeps id order in ties
        order = vals[tied].gather(1, by_id).sort(dim=1, descending=True, stable=True).indices[:, :k]
        pos[tied] = by_id.gather(1, order)
        top[tied] = vals[tied].gather(1, pos[tied])
    return top, pos


def sharded_topk(bank_shard: torch.Tensor, bank_labels: torch.Tensor, bank_ids: torch.Tensor, queries: torch.Tensor,
                 k: int, group=None):
    """Global top-k cosine neighbours of unit ``queries [Q, F]`` over the unit ``bank_shard [n_r, F]``
    (global row ids ``bank_ids [n_r]``) of every rank of ``group``. Returns (similarities [Q, k],
    labels [Q, k]), identical on every rank; exact ties go to the lower global id, however the bank
    is sharded."""
    q = queries.shape[0]
    k_local = min(k, bank_shard.shape[0])
    # float64: features of an untrained network are nearly collinear (cosine ~0.9995, neighbours apart
    # by less than fp32 resolution), and fp32 GEMMs round differently for each bank shape, so the
    # neighbours would depend on the number of ranks
    sims = queries.double() @ bank_shard.double().T
    # snap to a 2^-40 grid: identical vectors give the same similarity whatever the GEMM's blocking
    # (fp64 rounding noise is ~1e-16; fp32 features carry ~1e-7), so exact ties stay exact
    sims = torch.round(sims * 2.0**40) / 2.0**40
    vals, idx = _topk_ties_to_lower_id(sims, bank_ids.expand(q, -1), k_local)
    pad = k - k_local  # a shard smaller than k pads with -inf candidates, placed after every real one
    vals = F.pad(vals, (0, pad), value=float("-inf"))
    labels = F.pad(bank_labels[idx], (0, pad), value=-1)
    # (not F.pad: its fill value passes through a float, and int64's largest value does not fit back)
    ids = torch.cat([bank_ids[idx], bank_ids.new_full((q, pad), torch.iinfo(torch.int64).max)], dim=1)
    merged = [all_gather_equal(t, group).permute(1, 0, 2).reshape(q, -1) for t in (vals, labels, ids)]  # [Q, P * k]
    top_vals, pos = _topk_ties_to_lower_id(merged[0], merged[2], k)
    return top_vals, merged[1].gather(1, pos)


def knn_vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float | None) -> torch.Tensor:
    """Class scores [Q, C]: sum of ``exp(sim / T)`` (or 1 each when ``temperature`` is None) per class."""
    weights = torch.ones_like(sims) if temperature is None else (sims / temperature).exp()
    weights = torch.where(labels >= 0, weights, 0.0)
    scores = torch.zeros(sims.shape[0], num_classes, device=sims.device, dtype=weights.dtype)
    return scores.scatter_add_(1, labels.clamp_min(0), weights)


@torch.no_grad()
def knn_predict(bank_shard: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float | None = 0.07, chunk: int = 1024,
                bank_ids: torch.Tensor | None = None, group=None) -> torch.Tensor:
    """Class scores [Q, C] (float64) for every query, identical on every rank (a collective per chunk).
    ``queries`` must be the same on every rank; features are L2-normalised here. ``bank_ids [n_r]``:
    the rows' global ids (e.g. dataset positions), which break exact similarity ties; by default the
    rows are numbered rank after rank. The bank is sharded over the ranks of ``group``."""
    bank = F.normalize(bank_shard.double(), dim=1)
    queries = F.normalize(queries.double(), dim=1)
    sizes = all_gather_equal(torch.tensor(bank.shape[0], device=bank.device), group).tolist()
    if bank_ids is None:
        first = sum(sizes[:rank_in(group)])
        bank_ids = torch.arange(first, first + bank.shape[0], device=bank.device)
    bank_ids = bank_ids.to(bank.device, torch.int64)
    k = min(k, sum(sizes))
    out = []
    for start in range(0, queries.shape[0], chunk):
        sims, labels = sharded_topk(bank, bank_labels, bank_ids, queries[start:start + chunk], k, group)
        out.append(knn_vote(sims, labels, num_classes, temperature))
    return torch.cat(out) if out else torch.zeros(0, num_classes, dtype=torch.float64)


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Fraction of rows whose target is among the ``k`` highest scores, for each k (ties: lowest class)."""
    ranked = scores.argsort(dim=1, descending=True, stable=True)
    return {k: (ranked[:, :k] == targets[:, None]).any(1).float().mean().item() for k in ks}
