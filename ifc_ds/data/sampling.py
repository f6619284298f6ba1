"""Sampling: every instance once per epoch over the ranks, in an order that depends only on
(seed, epoch); the position in the epoch is checkpointable."""

from __future__ import annotations

import numpy as np
import torch


def epoch_permutation(num_instances: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_instances, generator=gen)


def step_bounds(num_instances: int, global_batch: int, offset: int, min_per_step: int) -> list[tuple[int, int]]:
    """Splits positions ``[offset, N)`` of an epoch into global batches of ``global_batch``; a tail
    smaller than ``min_per_step`` joins the previous batch (batch norm needs >= 2 samples per rank)."""
    bounds = [(s, min(s + global_batch, num_instances)) for s in range(offset, num_instances, global_batch)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_per_step:
        bounds[-2:] = [(bounds[-2][0], bounds[-1][1])]
    return bounds


class InstanceBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's instance ids for each step: every id exactly once per epoch across ranks.

    The epoch order is a seeded permutation; step s takes the next ``global_batch`` positions and
    splits them over the ranks (rank sizes differ by at most one). The order depends on
    (seed, epoch, global_batch) only, so ``offset`` (positions already consumed) is a resume point
    that stays valid when the number of ranks changes.
    """

    def __init__(self, num_instances: int, global_batch: int, rank: int, world_size: int, seed: int = 0,
                 shuffle: bool = True, min_per_rank: int = 2):
        self.min_per_rank = min_per_rank  # 2 (batch norm), times the micro-batches a step is split into
        if num_instances < min_per_rank * world_size or global_batch < min_per_rank * world_size:
            raise ValueError(f"{num_instances} instances in global batches of {global_batch} cannot be split "
                             f"over {world_size} ranks with at least {min_per_rank} per rank")
        self.num_instances, self.global_batch = num_instances, global_batch
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch, self.offset = 0, 0

    def set_position(self, epoch: int, offset: int = 0) -> None:
        self.epoch, self.offset = epoch, offset

    def bounds(self) -> list[tuple[int, int]]:
        # half a global batch keeps the tail rule independent of the world size whenever each rank's
        # batch is >= 4; 2 per rank is the floor batch norm needs
        min_tail = max(-(-self.global_batch // 2), self.min_per_rank * self.world_size)
        return step_bounds(self.num_instances, self.global_batch, self.offset, min_tail)

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_instances)
        return epoch_permutation(self.num_instances, self.seed, self.epoch)

    def __len__(self) -> int:
        return len(self.bounds())

    def __iter__(self):
        order = self.order()
        for start, end in self.bounds():
            yield np.array_split(order[start:end].numpy(), self.world_size)[self.rank].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "global_batch": self.global_batch,
                "num_instances": self.num_instances}


