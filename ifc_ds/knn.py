"""Weighted kNN classification on frozen features (InstDisc / DINO protocol), bank sharded over ranks.

Each rank holds a slice of the labelled bank. For a chunk of queries (the same on every rank) each
rank finds its local top-k cosine neighbours, the ``[P, Q, k]`` candidates are all-gathered and
merged to the global top-k, and every rank votes ``exp(sim / T)`` per class. A bank of millions of
rows never sits on one rank, and memory is bounded by the query chunk.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _gather_equal(tensor: torch.Tensor) -> torch.Tensor:
    """[*S] -> [P, *S] over the default group (world size 1: no process group needed)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def sharded_topk(bank_shard: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int):
    """Global top-k cosine neighbours of unit ``queries [Q, F]`` over all ranks' unit ``bank_shard
    [n_r, F]``. Returns (similarities [Q, k], labels [Q, k]), identical on every rank. Ties between
    equal similarities go to the lower rank / lower bank row, as a single-process ``topk`` would."""
    q = queries.shape[0]
    k_local = min(k, bank_shard.shape[0])
    sims = queries @ bank_shard.T
    vals, idx = sims.topk(k_local, dim=1) if k_local else (sims[:, :0], sims[:, :0].long())
    pad = k - k_local  # a shard smaller than k pads with -inf candidates
    vals = F.pad(vals, (0, pad), value=float("-inf"))
    labels = F.pad(bank_labels[idx], (0, pad), value=-1)
    all_vals = _gather_equal(vals).permute(1, 0, 2).reshape(q, -1)  # rank-major, then similarity
    all_labels = _gather_equal(labels).permute(1, 0, 2).reshape(q, -1)
    top_vals, pos = all_vals.topk(k, dim=1)
    return top_vals, all_labels.gather(1, pos)


def knn_vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float | None) -> torch.Tensor:
    """Class scores [Q, C]: sum of ``exp(sim / T)`` (or 1 each when ``temperature`` is None) per class."""
    weights = torch.ones_like(sims) if temperature is None else (sims / temperature).exp()
    weights = torch.where(labels >= 0, weights, 0.0)
    scores = torch.zeros(sims.shape[0], num_classes, device=sims.device)
    return scores.scatter_add_(1, labels.clamp_min(0), weights)


@torch.no_grad()
def knn_predict(bank_shard: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float | None = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores [Q, C] for every query, identical on every rank (a collective per chunk).
    ``queries`` must be the same on every rank; features are L2-normalised here."""
    bank = F.normalize(bank_shard.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    total_bank = torch.tensor([bank.shape[0]], device=bank.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_bank)
    k = min(k, int(total_bank.item()))
    out = []
    for start in range(0, queries.shape[0], chunk):
        sims, labels = sharded_topk(bank, bank_labels, queries[start:start + chunk], k)
        out.append(knn_vote(sims, labels, num_classes, temperature))
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Fraction of rows whose target is among the ``k`` highest scores, for each k (ties: lowest class)."""
    ranked = scores.argsort(dim=1, descending=True, stable=True)
    return {k: (ranked[:, :k] == targets[:, None]).any(1).float().mean().item() for k in ks}
