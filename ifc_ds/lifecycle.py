"""How a run ends: exit codes, the stop signal of a scheduler, and telling a peer's failure from ours.

    0   finished                       75  checkpointed on SIGTERM/SIGUSR1: requeue, resume=auto
    1   this rank failed (traceback)   65  too many non-finite losses in a row (last checkpoint intact)
    2   bad config/data/checkpoint     69  a peer rank died or a collective timed out
"""

from __future__ import annotations

import functools
import logging
import signal
from collections.abc import Callable

import torch
import torch.distributed as dist

from ifc_ds.checkpoint import CheckpointError
from ifc_ds.collectives import all_reduce_sum, barrier
from ifc_ds.config import ConfigError
from ifc_ds.data.spec import DatasetSpecError
from ifc_ds.dist import EXIT_PEER_LOST, hard_exit

EXIT_OK = 0
EXIT_PREEMPTED = 75  # checkpointed on SIGTERM/SIGUSR1: requeue and resume (EX_TEMPFAIL)
EXIT_NONFINITE = 65  # too many consecutive non-finite losses; the last good checkpoint is intact
EXIT_FAILED = 1  # this rank failed (its traceback is logged)
EXIT_USAGE = 2  # bad config, dataset spec or checkpoint: one line says what
# input a user can fix (a config key or value, a dataset spec, a checkpoint that does not fit): the
# commands print its one-line message and exit EXIT_USAGE, no traceback
BAD_INPUT = (ConfigError, DatasetSpecError, CheckpointError)
__all__ = ["EXIT_OK", "EXIT_PREEMPTED", "EXIT_NONFINITE", "EXIT_FAILED", "EXIT_USAGE", "EXIT_PEER_LOST",
           "BAD_INPUT", "StopSignal", "exit_bad_input", "bad_input_exits", "is_peer_failure", "finish"]


def exit_bad_input(exc: BaseException) -> None:
    """Logs ``Type: message`` in one line and leaves with EXIT_USAGE at once (``hard_exit``: a rank may
    already be in a process group whose peers stop on the same input)."""
    logging.getLogger("ifc_ds").error("%s: %s", type(exc).__name__, exc)
    hard_exit(EXIT_USAGE)


def bad_input_exits(main: Callable[..., int]) -> Callable[..., int]:
    """A command's ``main`` whose BAD_INPUT errors end the process through ``exit_bad_input``; any other
    error keeps its traceback."""

    @functools.wraps(main)
    def guarded(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except BAD_INPUT as exc:
            exit_bad_input(exc)
            raise  # (not reached: exit_bad_input leaves the process)

    return guarded


def is_peer_failure(exc: BaseException) -> bool:
    """A collective failed because a peer is gone or did not answer in time, as opposed to a failure of
    this rank's own (a bug, a CUDA OOM surfaced through NCCL, a crashed DataLoader worker).

    torch.distributed raises typed errors for NCCL and the stores; gloo raises plain RuntimeErrors from
    its transport layer ("Connection reset by peer", "Timed out waiting ... for recv"), recognised by
    their source path."""
    text = str(exc)
    if "out of memory" in text.lower():
        return False
    typed = tuple(getattr(dist, name) for name in ("DistBackendError", "DistNetworkError", "DistStoreError")
                  if hasattr(dist, name))
    if isinstance(exc, typed):
        return True
    return isinstance(exc, RuntimeError) and "gloo/transport" in text


class StopSignal:
    """SIGTERM / SIGUSR1 (what SLURM sends before preemption or the time limit) set a flag that the
    loop checks at the next step boundary; the flag is OR-reduced over ranks so all stop together."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.received = signum

    def any_rank(self, dev) -> bool:
        """Collective: whether any rank received a stop signal."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=dev)
        return bool(all_reduce_sum(flag).item() > 0)


def finish(exit_code: int) -> int:
    """Tears the process group down (after a barrier: a rank that leaves while a peer still uses the
    group makes gloo abort the peer) and returns ``exit_code``."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
    return exit_code
