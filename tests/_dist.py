"""Starts real gloo process groups for multi-rank tests (CPU, one thread per rank).

Ranks fork from one forkserver that imports torch, DeepSpeed, timm and datasets once for the whole
session (``PRELOAD``): a freshly spawned rank imported them all again, which was most of a multi-rank
test's time on two cores. Each rank then takes the caller's environment, as a spawned rank would (a
test sets e.g. ``TRITON_INTERPRET`` before it starts ranks); modules that read the environment when
imported (``ifc_ds.fused_loss``) are therefore not preloaded."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from ifc_ds.workers import WORKER_MODULES

# the heavy imports of a rank, over every module ifc_ds's own DataLoader forkserver preloads (in case
# a test's process starts that server through this one; "__main__" there is the launching script)
PRELOAD = [m for m in WORKER_MODULES if m != "__main__"] + ["timm", "deepspeed", "ifc_ds.engine", "ifc_ds.trainer",
                                                             "tests._dist"]


_server_interprets: bool | None = None  # TRITON_INTERPRET as the forkserver started with it


def _interprets_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def start_forkserver() -> None:
    """Starts the session's forkserver now, preloading ``PRELOAD`` (conftest, at session start). The first
    process to start it chooses its preload for the whole session, and a test that decodes with DataLoader
    workers (tests/test_augment.py, before any multi-rank test) started it with the workers' modules only:
    every later rank then imported timm, DeepSpeed and the engine itself (3.5 s a rank here)."""
    global _server_interprets
    from multiprocessing import forkserver

    multiprocessing.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()
    _server_interprets = _interprets_triton()


def _entry(rank: int, world_size: int, tmp: str, environ: dict, fn, args) -> None:
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(1)
    # a rank started by a launcher (deepspeed, torchrun, srun) forks its DataLoader workers; a rank
    # started by mp.spawn or a forkserver would start them that way
    multiprocessing.set_start_method("fork", force=True)
    # what a launcher sets (DeepSpeed's engine checks LOCAL_RANK)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
    except BaseException:
        with open(f"{tmp}/error.{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise
    dist.barrier()  # no rank tears down while a peer still uses the group (that aborted a peer, 1 run in 5)
    dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout_s: float = 600) -> None:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; any rank's exception
    (assertion included) fails the calling test with that rank's traceback. When one rank fails,
    its peers fail too ("connection closed"); the root cause is reported first. Ranks still running
    after ``timeout_s`` (or when the test is interrupted) are killed and the test fails: a hung rank
    must not hang the suite."""
    if _server_interprets is None:  # (conftest starts it before the first test; a caller outside pytest, here)
        start_forkserver()
    interprets = _interprets_triton()
    # triton.language defines some of its own functions with @triton.jit, in the interpreter's form or the
    # compiler's as TRITON_INTERPRET says when it is imported, and the forkserver imported it (through
    # DeepSpeed): ranks that want the other form start fresh. A fused-kernel test run after any other
    # multi-rank test failed that way ("Cannot call @triton.jit'd outside of the scope of a kernel")
    method = "forkserver" if interprets == _server_interprets else "spawn"
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(_entry, args=(world_size, tmp, dict(os.environ), fn, args), nprocs=world_size,
                                     join=False, start_method=method)
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    alive = [r for r, p in enumerate(context.processes) if p.is_alive()]
                    raise AssertionError(f"ranks {alive} still running after {timeout_s:.0f} s")
        except ProcessException as exc:  # a rank raised, or exited with an error code
            errors = [open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp)) if f.startswith("error.")]
            errors.sort(key=lambda e: "Connection closed" in e or "Connection reset" in e)
            raise AssertionError("rank failure:\n" + ("\n".join(errors) or str(exc))) from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join(timeout=10)


def _accelerator_has_fp16() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


# DeepSpeed's CPU accelerator has fp16 only where oneDNN has fp16 kernels (AVX512-FP16 or AMX-FP16): some
# of the machines these tests run on have them, others do not (there ifc_ds refuses fp16 in one line)
needs_fp16 = pytest.mark.skipif(not _accelerator_has_fp16(),
                                reason="DeepSpeed's accelerator has no fp16 on this machine")
