"""Every collective ifc_ds runs, each with its process group passed explicitly, and ``Groups``.

One module so that the "world of one" case, the group argument and NCCL's device rule are handled
once. Without an initialised process group every function acts as a world of one (tests, a single
process), so callers never ask ``if world > 1``. ``group=None`` is the default group (the world).
torch.distributed offers the collectives themselves; what it does not do, and is written here, is
gathering rows of uneven, known sizes and advancing iterators of uneven length in lockstep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Groups:
    """The process groups of a run, made once after ``init_distributed`` and handed to whatever runs
    a collective (a 1-D ``DeviceMesh`` would do the same; DeepSpeed's engines take plain groups).

    ``data``: the ranks the batch is split over and the backbone is data-parallel over (DeepSpeed's
    data-parallel group of the backbone engine: the world). ``classifier``: the ranks the classifier
    rows are sharded over; the softmax statistics, the classifier engine's gradient norm and its
    checkpoint shards are all taken over it. ``None`` is the world."""

    data: object = None
    classifier: object = None


def size(group=None) -> int:
    """Ranks in ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank_in(group=None) -> int:
    """This process's rank within ``group`` (0 without a process group)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


# A sum over the world through memory the ranks share, where they are all on one CPU node and have a
# core each (``ifc_ds.engine.shared_memory.init_process_group`` sets it to ``small_sum_``: DeepSpeed's
# internals stay behind the engine package). It returns False for a tensor it does not take. gloo's all-reduce goes
# through loopback TCP: 0.3-2 ms for a [256] tensor here, and the classifier runs several per step. Gathers, maxima
# and minima, and the barriers inside a step ride on the same sum.
_node_sum: Callable[[torch.Tensor], bool] | None = None


def use_node_sum(node_sum: Callable[[torch.Tensor], bool] | None) -> None:
    """Routes ``all_reduce_``'s world-wide sums through ``node_sum`` wherever it takes the tensor (every
    rank must pass the same: the choice depends only on the tensor's shape, dtype and device)."""
    global _node_sum
    _node_sum = node_sum


def all_reduce_(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """In place, on whatever device ``tensor`` is: NCCL reduces only GPU tensors, so a CPU tensor
    (a counter, a flag) goes through the current GPU and comes back. A sum over every rank of the
    world may go through node-shared memory (``use_node_sum``)."""
    if size(group) == 1:
        return tensor
    if _node_sum is not None and op == dist.ReduceOp.SUM and size(group) == size() and _node_sum(tensor):
        return tensor
    if op in (dist.ReduceOp.MAX, dist.ReduceOp.MIN):  # the kernel only sums: gather, then reduce here
        every = _gathered_through_node_sum(tensor, group)
        if every is not None:
            return tensor.copy_(every.amax(0) if op == dist.ReduceOp.MAX else every.amin(0))
    if tensor.device.type == "cpu" and dist.get_backend(group) == "nccl":
        staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(staged, op=op, group=group)
        tensor.copy_(staged.cpu())
    else:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    return all_reduce_(tensor, dist.ReduceOp.SUM, group)


def all_reduce_max(tensor: torch.Tensor, group=None) -> torch.Tensor:
    return all_reduce_(tensor, dist.ReduceOp.MAX, group)


def all_reduce_min(tensor: torch.Tensor, group=None) -> torch.Tensor:
    return all_reduce_(tensor, dist.ReduceOp.MIN, group)


def _global_rank(group, group_rank: int) -> int:
    """torch.distributed names a broadcast's source by its global rank, whatever the group."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def broadcast_(tensor: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """In place, ``tensor`` of the group's rank ``src`` on every rank of ``group``."""
    if size(group) > 1:
        dist.broadcast(tensor, src=_global_rank(group, src), group=group)
    return tensor


def barrier(group=None) -> None:
    if size(group) > 1:
        dist.barrier(group=group)


def step_barrier(group=None) -> None:
    """A barrier inside a training step: a one-element sum through the node sum where it is set (no
    rank leaves before every rank has entered; microseconds, against a gloo barrier's 0.3-2 ms), else
    torch.distributed's. Not for waits of seconds (a checkpoint): the kernel spins while it waits."""
    if size(group) > 1 and _gathered_through_node_sum(torch.zeros(()), group) is None:
        dist.barrier(group=group)


def _gathered_through_node_sum(tensor: torch.Tensor, group=None) -> torch.Tensor | None:
    """``[P, *S]``: every rank's ``tensor`` in rank order, through the node sum where it takes the
    ``[P, *S]`` buffer (each rank fills its own row of zeros: ``x + 0`` is ``x``, except that -0.0
    arrives as 0.0), else None on every rank (the choice depends on shape, dtype and device only)."""
    if _node_sum is None or size(group) != size():
        return None
    rows = tensor.new_zeros((size(group), *tensor.shape))
    rows[rank_in(group)] = tensor
    return rows if _node_sum(rows) else None


def broadcast_object(obj, src: int = 0, group=None):
    """``obj`` of the group's rank ``src`` on every rank of ``group`` (any picklable object)."""
    if size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=_global_rank(group, src), group=group)
    return box[0]


def all_gather_object(obj, group=None) -> list:
    """Every rank's ``obj`` in rank order (any picklable object)."""
    if size(group) == 1:
        return [obj]
    parts = [None] * size(group)
    dist.all_gather_object(parts, obj, group=group)
    return parts


def all_gather_equal(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Equally shaped tensors of every rank: ``[*S]`` -> ``[P, *S]`` in rank order."""
    world = size(group)
    if world == 1:
        return tensor.unsqueeze(0)
    every = _gathered_through_node_sum(tensor, group)
    if every is not None:
        return every
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


def all_gather_rows(tensor: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """``[sizes[r], *S]`` tensors of every rank concatenated in rank order (uneven sizes, known to all).
    Written here: all_gather needs equal shapes, so each rank pads to the largest."""
    world = size(group)
    if world == 1:
        return tensor
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = all_gather_equal(padded, group)
    return torch.cat([gathered[r, : sizes[r]] for r in range(world)])


def gather_uneven(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """``[n_r, *S]`` tensors of every rank concatenated in rank order (``n_r`` may differ, unknown)."""
    if size(group) == 1:
        return tensor
    sizes = all_gather_equal(torch.tensor(tensor.shape[0], device=tensor.device), group).tolist()
    return all_gather_rows(tensor, sizes, group)


def lockstep(iterator, device, until: str = "all", group=None):
    """Yields ``next(iterator)`` (None once it is exhausted) in lockstep with the other ranks, whose
    shards may differ in length: ``until="all"`` stops once every rank is done (the others get None:
    collectives that accept empty inputs), ``"any"`` as soon as one rank is done."""
    if until not in ("all", "any"):  # (checked before the first item: a typo must not mean "all")
        raise ValueError(f"lockstep: until must be 'all' or 'any', not {until!r}")
    op = dist.ReduceOp.MIN if until == "any" else dist.ReduceOp.MAX
    while True:
        item = next(iterator, None)
        flag = torch.tensor([0 if item is None else 1], device=device)
        if not int(all_reduce_(flag, op, group).item()):
            return
        yield item
