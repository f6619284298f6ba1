"""The process group's life: launcher environment (DeepSpeed, torchrun, SLURM), init with timeouts
and DeepSpeed's shared-memory all-reduce, threads per rank, exits and watchdogs. The collectives
themselves are in ``ifc_ds.collectives``."""

from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from ifc_ds.collectives import all_reduce_min, barrier, rank_in, size

log = logging.getLogger(__name__)

EXIT_PEER_LOST = 69  # another rank died or a collective timed out (EX_UNAVAILABLE)


def map_slurm_env(environ=os.environ) -> bool:
    """Fills RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from SLURM's variables when a
    job step was started by ``srun`` and no launcher set them (DeepSpeed has no SLURM discovery of its
    own and would fall back to mpi4py). Values already set are never overridden. Returns True if
    anything was filled in."""
    if "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return False
    if "SLURM_STEP_ID" not in environ and "SLURM_STEPID" not in environ:
        return False  # the batch script itself, not an srun task
    filled = {}
    for key, value in (("RANK", environ["SLURM_PROCID"]), ("WORLD_SIZE", environ["SLURM_NTASKS"]),
                       ("LOCAL_RANK", environ.get("SLURM_LOCALID", "0"))):
        if key not in environ:
            filled[key] = value
    if "MASTER_ADDR" not in environ:
        filled["MASTER_ADDR"] = _first_host(environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", ""))
    if "MASTER_PORT" not in environ:
        # a port per job, so two jobs sharing a node do not collide
        filled["MASTER_PORT"] = str(15000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)
    environ.update(filled)
    return bool(filled)


def _first_host(nodelist: str) -> str:
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # plain fallback for "node[01-04],other": the first name with its first index
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def init_distributed(timeout_s: float) -> None:
    """Initialises torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU) with a collective
    timeout, so a dead peer ends the run with an error instead of hanging it. A single process with
    no launcher variables runs as world size 1 without a process group.

    On a CPU node whose ranks are all local (DeepSpeed's launcher sets LOCAL_SIZE), DeepSpeed also
    sets up its shared-memory all-reduce: see ``_init_with_shared_memory``."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    global _shared_memory_ready
    map_slurm_env()
    if dist.is_initialized():
        return
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(free_port()))})
    timeout = datetime.timedelta(seconds=timeout_s)
    if get_accelerator().device_name() == "cpu" and os.environ.get("LOCAL_SIZE") == os.environ.get("WORLD_SIZE"):
        _shared_memory_ready = _init_with_shared_memory(timeout)
    else:
        deepspeed.init_distributed(timeout=timeout)
    set_cpu_threads()


# DeepSpeed's shm.cpp: each rank's all-reduce workspace, a POSIX shared-memory object of 2 x 1 MiB + 2 x 32 MiB
# (plus two state words) named deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}
DEEPSPEED_SHM_BYTES = 2 * (1 << 20) + 2 * (32 << 20) + 8
_shared_memory_ready = False  # set by init_distributed once that all-reduce is set up on every rank


def _deepspeed_shm_path(global_rank: int) -> str:
    """Where Linux keeps DeepSpeed's shared-memory object for ``global_rank`` (shm_open's /dev/shm)."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{global_rank}")


def shared_memory_free_bytes() -> int:
    """Free bytes in /dev/shm (0 where there is none)."""
    if not os.path.isdir("/dev/shm"):
        return 0
    stats = os.statvfs("/dev/shm")
    return stats.f_bavail * stats.f_frsize


def _init_with_shared_memory(timeout: datetime.timedelta) -> bool:
    """DeepSpeed's CPU backend gives every local rank a 66 MiB shared-memory workspace and never
    unlinks it: each run leaked 66 MiB per rank of /dev/shm, i.e. of RAM (a test suite left 21 GB and
    the node thrashed), and a rank whose peer found a stale workspace of an earlier run on the same
    port, or could not write its own for lack of room, hung in DeepSpeed's loops that have no timeout.
    So the process group comes first (DeepSpeed adopts it); the ranks clear their stale names and
    agree whether /dev/shm has room for all workspaces (else DeepSpeed is told LOCAL_SIZE=0 and
    reduces through gloo); once every rank has mapped every workspace, each unlinks its own, so
    the memory goes with the last process even on kill -9. Returns whether the all-reduce is set up."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    dist.init_process_group(get_accelerator().communication_backend_name(), timeout=timeout)
    me, world = dist.get_rank(), dist.get_world_size()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_deepspeed_shm_path(me))  # a killed run's, on the same address and port
    need = world * DEEPSPEED_SHM_BYTES
    room = all_reduce_min(torch.tensor([shared_memory_free_bytes() > need * 1.05], dtype=torch.uint8)).item()
    if not room:
        if me == 0:
            log.warning("/dev/shm has %.0f MiB free, DeepSpeed's shared-memory all-reduce needs %.0f MiB for %d "
                        "ranks: gradients are reduced through %s", shared_memory_free_bytes() / 2**20,
                        need / 2**20, world, dist.get_backend())
        os.environ["LOCAL_SIZE"], local_size = "0", os.environ["LOCAL_SIZE"]  # (what shm_interface.cpp reads)
        try:
            deepspeed.init_distributed(timeout=timeout)
        finally:
            os.environ["LOCAL_SIZE"] = local_size
        return False
    deepspeed.init_distributed(timeout=timeout)
    from deepspeed.comm import comm as ds_comm

    ready = getattr(getattr(ds_comm, "cdb", None), "shm_comm_op", None) is not None  # (it may not have built)
    barrier()  # every rank has opened every workspace
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_deepspeed_shm_path(me))
    return ready


def free_port() -> int:
    """A free TCP port on this host (for a rendezvous on 127.0.0.1)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    """This process's rank in the world (0 without a process group)."""
    return rank_in()


def world_size() -> int:
    """Ranks in the world (1 without a process group)."""
    return size()


def local_world_size() -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, DeepSpeed's LOCAL_SIZE, SLURM's tasks per node."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return world_size()


def set_cpu_threads() -> None:
    """One share of the node's cores per rank, unless OMP_NUM_THREADS says otherwise: torch's default
    (every core in every rank) oversubscribes the CPU and halved throughput here with 2 ranks."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, local_world_size())))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.device_name(int(os.environ.get("LOCAL_RANK", 0))))


def local_rank() -> int:
    """This process's rank on its node (launchers set LOCAL_RANK; SLURM sets SLURM_LOCALID)."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


# --------------------------------------------------------------------------- exits and deadlines
def stop_children() -> None:
    """Kill this process's DataLoader workers before an ``os._exit`` (which skips the atexit handler
    that would): a worker stuck in a read or a decoder would outlive the rank, holding its output
    pipes, so srun or the launcher would wait on it."""
    if threading.current_thread() is threading.main_thread():  # (only the main thread may set handlers)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise "worker killed" mid-exit
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=5)


def hard_exit(code: int) -> None:
    """Flush the logs, kill this rank's workers, and leave with ``code`` at once: tearing down a
    process group whose peers are gone or waiting can itself hang, so no clean shutdown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    stop_children()
    os._exit(code)


class Watchdog:
    """A deadline for a collective that has none of its own, in the manner of NCCL's watchdog thread:
    a daemon thread that ends the process with ``exit_code`` (after logging ``message``) if a guarded
    call outlives ``timeout_s``. It can, because the guarded call releases the GIL."""

    def __init__(self, timeout_s: float, message: str, exit_code: int):
        self.timeout_s, self.message, self.exit_code = timeout_s, message, exit_code
        self._deadline: float | None = None
        self._what = ""
        threading.Thread(target=self._watch, name="ifc_ds-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def guard(self, what: str):
        self._what, self._deadline = what, time.monotonic() + self.timeout_s
        try:
            yield
        finally:
            self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                log.error("%s did not finish within dist.timeout_s=%s: %s", self._what, self.timeout_s, self.message)
                hard_exit(self.exit_code)


# --------------------------------------------------------------------------- shared-memory all-reduce
def shared_memory_all_reduce_applies(tensor: torch.Tensor) -> bool:
    """Whether DeepSpeed's shared-memory all-reduce (its CPU ``inference_all_reduce``: 16 ms against
    gloo's 42 ms for ResNet-18's 47 MB of fp32 gradients on 2 ranks here, where gloo goes through
    loopback TCP) can sum ``tensor`` over the world. Only where ``init_distributed`` set it up (every
    rank of the world on this node) and its kernel reduces for real (otherwise it returns the input
    unreduced, silently): a CPU tensor, fp32 with AVX2 or bf16/fp16 with AVX-512."""
    if not (_shared_memory_ready and size() > 1) or tensor.device.type != "cpu":
        return False
    from deepspeed.comm import comm as ds_comm

    if not hasattr(torch.ops.deepspeed, "inference_all_reduce_"):
        return False
    needed = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 2}.get(tensor.dtype)
    return needed is not None and getattr(ds_comm.cdb, "shm_vector_kernel_level", 0) >= needed


def shared_memory_all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """In place, the sum over the world (check ``shared_memory_all_reduce_applies`` first). Every rank
    adds the buffers in rank order, so all get bitwise the same result (for 2 ranks, gloo's). Its C++
    spins on shared flags with no timeout, releasing the GIL: call it under a ``Watchdog``."""
    return torch.ops.deepspeed.inference_all_reduce_(tensor)
