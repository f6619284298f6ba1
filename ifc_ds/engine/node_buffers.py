"""Every rank's flat gradient buffer in one shared-memory mapping, averaged in place over the ranks.

Where every rank of the world runs on one CPU node, rank r's flat gradients are row r of a
``[world, n]`` tensor that every rank maps from one ``/dev/shm`` file. The average then needs no
copies in or out: rank r sums slice r of every row (in rank order), divides by the world size and
writes the result into its own row, and each rank then copies the others' reduced slices out of their
rows. Per rank that is about two passes over the buffer's size in memory traffic. DeepSpeed's
shared-memory all-reduce (``shared_memory.all_reduce_``) copies the whole buffer into its workspace
and the result back out. Profiled inside the trainer step, that took 38 ms of a 674 ms step on 2 ranks
(``benchmarks/README.md``).

Written by hand because nothing else does it: gloo's all-reduce goes through loopback TCP, and
neither torch.distributed nor DeepSpeed reduces memory the ranks already share. The barriers between
the phases are gloo collectives, so a dead peer becomes an error after the process group's timeout
instead of a hang, and no watchdog is needed.
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
        log.info("backbone gradients: cannot allocate %.0f MiB at %s: %s", nbytes / 2**20, path, exc)
        return False


class NodeBuffers:
    """``rows [world, n]``: every rank's flat buffer, mapped by every rank of the node (each row
    contiguous, rows ALIGN-padded apart). ``own`` (row ``rank``) is this rank's buffer.

    Rank r reduces ``rows[:, bounds[r]:bounds[r + 1]]``."""

    def __init__(self, rows: torch.Tensor, rank: int):
        self.rows, self.rank = rows, rank
        world, n = rows.shape
        self.bounds = [min(n, (n * r // world + ALIGN - 1) // ALIGN * ALIGN) for r in range(world)] + [n]
        # more than 2 ranks: the sum runs in rank order in a scratch slice, because the own row is an input
        lo, hi = self.bounds[rank], self.bounds[rank + 1]
        self.scratch = torch.empty(hi - lo, dtype=rows.dtype) if world > 2 else None

    @property
    def own(self) -> torch.Tensor:
        return self.rows[self.rank]

    @classmethod
    def create(cls, numel: int, dtype: torch.dtype, group=None) -> NodeBuffers | None:
        """Collective over ``group`` (every rank passes the same ``numel`` and ``dtype``). Returns
        zeroed buffers, or None on every rank when the ranks are not all on one node or ``/dev/shm``
        lacks room on one of them. The file is unlinked once every rank has mapped it, so the memory
        goes with the last process."""
        world, rank = collectives.size(group), collectives.rank_in(group)
        if world < 2:
            return None
        stride = -(-numel // ALIGN) * ALIGN
        nbytes = world * stride * torch.empty((), dtype=dtype).element_size()
        token = collectives.broadcast_object(uuid.uuid4().hex if rank == 0 else None, group=group)
        path = Path("/dev/shm") / f"ifc_ds-grads-{token}.bin"
        room = shared_memory_has_room(nbytes)
        try:
            if rank == 0 and room:
                room = _allocate(path, nbytes)
            collectives.barrier(group)
            rows = None
            if room:
                try:  # mode r+ opens without creating: a rank on another node does not find rank 0's file
                    mapped = np.memmap(path, dtype=np.uint8, mode="r+", shape=(nbytes,))
                    rows = torch.from_numpy(mapped).view(dtype).view(world, stride)[:, :numel]
                except (OSError, ValueError) as exc:
                    log.info("backbone gradients: cannot map %s: %s", path, exc)
            everyone = bool(collectives.all_reduce_min(torch.tensor([rows is not None], dtype=torch.uint8),
                                                       group).item())
        finally:
            if rank == 0:  # every rank that could map it has (the all-reduce above), or a rank failed
                path.unlink(missing_ok=True)
        collectives.barrier(group)  # returned on any rank: the name is gone from /dev/shm
        if not everyone:
            log.info("backbone gradients: no node-shared buffers (the ranks are on several nodes, or "
                     "/dev/shm lacks %.0f MiB on one of them)", nbytes / 2**20)
            return None
        return cls(rows, rank)

    def average_(self, group=None) -> None:
        """Collective: every row becomes the mean of all rows, bitwise the same on every rank (for 2
        ranks, bitwise gloo's sum divided by 2)."""
        world = self.rows.shape[0]
        lo, hi = self.bounds[self.rank], self.bounds[self.rank + 1]
        collectives.barrier(group)  # every rank's backward has written its row
        mine = self.rows[self.rank, lo:hi]
        if world == 2:
            torch.add(self.rows[0, lo:hi], self.rows[1, lo:hi], out=mine)  # (mine is one of the two: elementwise)
        else:
            torch.add(self.rows[0, lo:hi], self.rows[1, lo:hi], out=self.scratch)
            for r in range(2, world):
                self.scratch.add_(self.rows[r, lo:hi])
            mine.copy_(self.scratch)
        mine.div_(world)
        collectives.barrier(group)  # every slice is reduced
        for r in range(world):
            if r != self.rank:
                start, end = self.bounds[r], self.bounds[r + 1]
                self.rows[self.rank, start:end].copy_(self.rows[r, start:end])
        collectives.barrier(group)  # no rank writes its row again (next step's zeroing) while another reads it
