"""Every rank's flat gradient buffer in one shared-memory mapping, averaged where it lies.

Where every rank of the world runs on one CPU node, rank r's flat gradients are row r of a
``[world + 1, n]`` tensor that every rank maps from one ``/dev/shm`` file; the last row is the mean,
which every rank's optimizer step reads. Rank r reduces slice r: in cache-sized chunks it sums that
slice of every rank's row (in rank order), divides by the world size and writes the mean row. Per
rank that is one read of the world's rows over its slice and one write, with no copies in or out.
The rows need no zeroing pass: a step's first backward overwrites its rank's row (``FlatGradients``
zeroes only the slices of parameters that no backward reached).
DeepSpeed's shared-memory all-reduce (``shared_memory.all_reduce_``) copies the whole buffer into its
workspace and the result back out: profiled inside the trainer step, 38 ms + 6 ms of a 674 ms step on
2 ranks (``benchmarks/README.md``).

Written by hand because nothing else does it: gloo's all-reduce goes through loopback TCP, and
neither torch.distributed nor DeepSpeed reduces memory the ranks already share. The barriers between
the phases are ``collectives.step_barrier`` (the node sum under its watchdog, else gloo's barrier), so
a dead peer becomes an error after a timeout instead of a hang.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import numpy as np
import torch

from ifc_ds import collectives
from ifc_ds.dist import shared_memory_has_room

log = logging.getLogger(__name__)

ALIGN = 16  # rows and slices start at multiples of 16 elements (64 bytes): no cache line spans two ranks' slices


def _allocate(path: Path, nbytes: int) -> bool:
    """Creates the file with all its pages reserved: a sparse file (ftruncate) would fail later, when
    /dev/shm fills up, as a SIGBUS at the first write instead of here as an error."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        finally:
            os.close(fd)
        return True
    except OSError as exc:  # the ranks still meet in create, and all go without
        log.info("node-shared memory: cannot allocate %.0f MiB at %s: %s", nbytes / 2**20, path, exc)
        return False


class NodeBuffers:
    """``rows [world + 1, n]``, mapped by every rank of the node (each row contiguous, rows
    ALIGN-padded apart): row r is rank r's buffer (``own`` for this rank), the last row the mean
    (``mean``). Rank r reduces ``rows[:, bounds[r]:bounds[r + 1]]``."""

    CHUNK = 1 << 16  # elements reduced at a time: the world's rows of a chunk stay in L2

    def __init__(self, rows: torch.Tensor, rank: int):
        self.rows, self.rank = rows, rank
        world, n = rows.shape[0] - 1, rows.shape[1]
        self.world = world
        self.bounds = [min(n, (n * r // world + ALIGN - 1) // ALIGN * ALIGN) for r in range(world)] + [n]

    @property
    def own(self) -> torch.Tensor:
        """``[n]``: this rank's buffer, zeroed by ``create``."""
        return self.rows[self.rank]

    @property
    def mean(self) -> torch.Tensor:
        """``[n]``: the mean of the ranks' rows after ``average_``, the same memory on every rank."""
        return self.rows[self.world]

    @classmethod
    def create(cls, numel: int, dtype: torch.dtype, group=None) -> NodeBuffers | None:
        """Collective over ``group`` (every rank passes the same ``numel`` and ``dtype``). Returns
        zeroed buffers, or None on every rank when the ranks are not all on one node or ``/dev/shm``
        lacks room on one of them."""
        world = collectives.size(group)
        if world < 2:
            return None
        rows = map_node_shared(world + 1, numel, dtype, "grads", group)
        return None if rows is None else cls(rows, collectives.rank_in(group))

    def average_(self, group=None) -> None:
        """Collective: ``mean`` becomes the mean of the ranks' rows, summed in rank order (for 2 ranks,
        bitwise gloo's sum divided by 2); the rows are left as they are."""
        world, rows = self.world, self.rows
        # every rank's backward has written its row, and every rank's last optimizer step has read the mean
        collectives.step_barrier(group)
        for start in range(self.bounds[self.rank], self.bounds[self.rank + 1], self.CHUNK):
            chunk = slice(start, min(start + self.CHUNK, self.bounds[self.rank + 1]))
            mean = rows[world, chunk]
            torch.add(rows[0, chunk], rows[1, chunk], out=mean)
            for r in range(2, world):
                mean.add_(rows[r, chunk])
            mean.div_(world)
        # every slice is reduced: the mean is complete, and no rank writes its row again (the next
        # backward) before every rank has read it
        collectives.step_barrier(group)


def map_node_shared(num_rows: int, numel: int, dtype: torch.dtype, what: str, group=None) -> torch.Tensor | None:
    """Collective over ``group``: zeroed ``[num_rows, numel]`` (each row contiguous, rows ALIGN-padded
    apart) in one ``/dev/shm`` mapping that every rank maps, or None on every rank when the ranks are
    not all on one node or ``/dev/shm`` lacks room on one of them. The file is unlinked once every
    rank has mapped it, so the memory goes with the last process. ``what`` names the file and the logs."""
    rank = collectives.rank_in(group)
    stride = -(-numel // ALIGN) * ALIGN
    nbytes = num_rows * stride * torch.empty((), dtype=dtype).element_size()
    token = collectives.broadcast_object(uuid.uuid4().hex if rank == 0 else None, group=group)
    path = Path("/dev/shm") / f"ifc_ds-{what}-{token}.bin"
    room = shared_memory_has_room(nbytes)
    try:
        if rank == 0 and room:
            room = _allocate(path, nbytes)
        collectives.barrier(group)
        rows = None
        if room:
            try:  # mode r+ opens without creating: a rank on another node does not find rank 0's file
                mapped = np.memmap(path, dtype=np.uint8, mode="r+", shape=(nbytes,))
                rows = torch.from_numpy(mapped).view(dtype).view(num_rows, stride)[:, :numel]
            except (OSError, ValueError) as exc:
                log.info("node-shared %s: cannot map %s: %s", what, path, exc)
        everyone = bool(collectives.all_reduce_min(torch.tensor([rows is not None], dtype=torch.uint8),
                                                   group).item())
    finally:
        if rank == 0:  # every rank that could map it has (the all-reduce above), or a rank failed
            path.unlink(missing_ok=True)
    collectives.barrier(group)  # returned on any rank: the name is gone from /dev/shm
    if not everyone:
        log.info("node-shared %s: none (the ranks are on several nodes, or /dev/shm lacks %.0f MiB on one "
                 "of them)", what, nbytes / 2**20)
        return None
    return rows
