"""ifc_ds.engine.node_buffers on real gloo ranks: the average of the rows every rank maps, against the
ranks' rows gathered and summed in rank order; the fallbacks when the ranks cannot share."""

import glob

import pytest
import torch
import torch.distributed as dist

from tests._dist import run_ranks

NUMEL = 1003  # not a multiple of the ranks nor of the 16-element alignment: uneven slices, a short last one


def _rows_of_every_rank(own: torch.Tensor, world: int) -> list[torch.Tensor]:
    rows = [torch.empty_like(own) for _ in range(world)]
    dist.all_gather(rows, own.clone())
    return rows


def _ours() -> set[str]:
    return set(glob.glob("/dev/shm/ifc_ds-*"))


def _average(rank, world):
    from ifc_ds.engine.node_buffers import ALIGN, NodeBuffers

    NodeBuffers.CHUNK = 80  # several chunks per slice, the last one short
    before = _ours()
    buffers = NodeBuffers.create(NUMEL, torch.float32)
    assert buffers is not None and buffers.own.shape == (NUMEL,) and not buffers.own.any()  # zeroed
    assert buffers.own.is_contiguous() and all(b % ALIGN == 0 for b in buffers.bounds[:-1])
    assert buffers.mean.data_ptr() not in {row.data_ptr() for row in buffers.rows[:world]}
    assert _ours() <= before  # unlinked once mapped: the memory goes with the ranks
    gen = torch.Generator().manual_seed(rank)
    for step in range(3):  # the buffers are reused step after step, as the gradient buffer is
        buffers.own.copy_(torch.randn(NUMEL, generator=gen) * 10 ** step)  # (a step's first backward)
        mine = buffers.own.clone()
        rows = _rows_of_every_rank(buffers.own, world)
        expected = rows[0] + rows[1]
        for row in rows[2:]:
            expected = expected + row
        expected = expected / world
        if world == 2:  # bitwise gloo's sum divided by 2, what the trainer used before
            gloo = buffers.own.clone()
            dist.all_reduce(gloo)
            assert torch.equal(expected, gloo / 2)
        buffers.average_()
        assert torch.equal(buffers.mean, expected), (step, (buffers.mean - expected).abs().max())
        assert all(torch.equal(row, expected) for row in _rows_of_every_rank(buffers.mean, world))
        assert torch.equal(buffers.own, mine)  # the rows are read, not written
        dist.barrier()  # (before a peer writes its row again)


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_reads_the_mean_in_rank_order(world):
    run_ranks(_average, world)


def _no_room_on_one_rank(rank, world):
    import ifc_ds.dist as ifc_dist
    from ifc_ds.engine.node_buffers import NodeBuffers

    before = _ours()
    if rank == 1:
        ifc_dist.shared_memory_free_bytes = lambda: 0
    assert NodeBuffers.create(NUMEL, torch.float32) is None  # on every rank, not only the one without room
    assert _ours() <= before


def _another_node(rank, world):
    """A rank on another node does not find rank 0's file in its own /dev/shm."""
    from ifc_ds.engine import node_buffers

    before = _ours()
    if rank == 1:
        def missing(path, **kwargs):
            raise FileNotFoundError(path)

        node_buffers.np.memmap = missing
    assert node_buffers.NodeBuffers.create(NUMEL, torch.float32) is None
    assert _ours() <= before


def _allocation_fails(rank, world):
    """/dev/shm fills up between the room check and the allocation: an error at once on rank 0, not a
    SIGBUS at the first write."""
    import errno

    from ifc_ds.engine import node_buffers

    before = _ours()
    if rank == 0:
        def full(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")

        node_buffers.os.posix_fallocate = full
    assert node_buffers.NodeBuffers.create(NUMEL, torch.float32) is None
    assert _ours() <= before


@pytest.mark.parametrize("case", [_no_room_on_one_rank, _another_node, _allocation_fails],
                         ids=["no_room", "another_node", "allocation_fails"])
def test_ranks_that_cannot_share_all_go_without(case):
    run_ranks(case, 2)


def _flat_gradients(rank, world):
    """The backbone's gradient buffer lives in the node-shared rows: after the backwards of a step and
    the average, each parameter's .grad (channels-last ones included) is the mean of the ranks'
    gradients, step after step: with two micro-batches accumulating, and with a parameter that this
    rank's backward reaches in some steps, in one step only in the second micro-batch (its first
    gradient of the step arrives then), and in others not at all (its slice holds an older gradient,
    which must not be averaged again)."""
    from ifc_ds.engine import FlatGradients

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 6, 6))
    model.to(memory_format=torch.channels_last)
    unused = torch.nn.Parameter(torch.ones(3))  # reached by the loss only in some micro-batches, on rank 1
    params = [*model.parameters(), unused]
    holder = torch.nn.ParameterList(params)
    flat = FlatGradients(holder)
    assert flat.mode == FlatGradients.NODE_BUFFERS and flat.flat.data_ptr() == flat.node.own.data_ptr()
    gen = torch.Generator().manual_seed(rank)

    def loss_of(x, step, micro):
        loss = model(x).square().sum()
        reached = rank == 1 and (step % 2 == 0 or (step == 1 and micro == 1))
        return loss + unused.square().sum() * (step + 1) if reached else loss

    for step in range(4):
        micro_batches = [torch.randn(5, 3, 6, 6, generator=gen) for _ in range(1 + step % 2)]
        for p in params:
            p.grad = None
        for micro, x in enumerate(micro_batches):
            loss_of(x, step, micro).backward()  # the reference: this rank's own gradients, accumulated
        mine = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = None  # (what the engine's step leaves)
        flat.attach()
        for micro, x in enumerate(micro_batches):
            loss_of(x, step, micro).backward()
        assert model[0].weight.grad.is_contiguous(memory_format=torch.channels_last)
        flat.all_reduce()
        for own, p in zip(mine, params):
            every = _rows_of_every_rank(own, world)
            assert torch.equal(p.grad, (every[0] + every[1]) / 2), step
        if step == 1:  # another way for one step (train_step.py compares them)
            flat.mode = FlatGradients.PROCESS_GROUP
        else:
            flat.mode = FlatGradients.NODE_BUFFERS
    before = flat.flat.clone()
    for p in params:  # outside a step (attach .. all_reduce) a backward leaves the buffer alone
        p.grad = None
    model(torch.randn(5, 3, 6, 6, generator=gen)).sum().backward()
    assert torch.equal(flat.flat, before) and model[0].weight.grad.data_ptr() != flat.flat.data_ptr()


def test_flat_gradients_average_in_the_node_buffers():
    run_ranks(_flat_gradients, 2)
