"""The process group's life: launcher environment (DeepSpeed, torchrun, SLURM), init with timeouts
(DeepSpeed's shared-memory all-reduce, where it applies, is set up by ``ifc_ds.engine.shared_memory``),
threads per rank and the heap's reuse of freed memory on CPU, exits and watchdogs. The collectives themselves
are in ``ifc_ds.collectives``."""

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

from ifc_ds.collectives import rank_in, size

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
    sets up its shared-memory all-reduce: see ``ifc_ds.engine.shared_memory``."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    map_slurm_env()
    if dist.is_initialized():
        return
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(free_port()))})
    timeout = datetime.timedelta(seconds=timeout_s)
    from ifc_ds.engine import shared_memory  # (DeepSpeed's internals live behind the engine package)

    shared_memory.prefer_environment_ninja()  # both branches may have DeepSpeed build its op
    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu and os.environ.get("LOCAL_SIZE") == os.environ.get("WORLD_SIZE"):
        shared_memory.init_process_group(timeout)
    else:
        deepspeed.init_distributed(timeout=timeout)
    set_cpu_threads()
    if on_cpu:
        retain_freed_memory()


def shared_memory_free_bytes() -> int:
    """Free bytes in /dev/shm (0 where there is none)."""
    if not os.path.isdir("/dev/shm"):
        return 0
    stats = os.statvfs("/dev/shm")
    return stats.f_bavail * stats.f_frsize


def shared_memory_has_room(nbytes: int) -> bool:
    """Whether /dev/shm can take ``nbytes`` more with a 5% margin (what every shared mapping checks first)."""
    return shared_memory_free_bytes() > nbytes * 1.05


def free_port() -> int:
    """A free TCP port on this host (for a rendezvous on 127.0.0.1)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_world_size() -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, DeepSpeed's LOCAL_SIZE, SLURM's tasks per node."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return size()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_cpu_threads() -> None:
    """One share of the node's cores per rank, unless OMP_NUM_THREADS says otherwise: torch's default
    (every core in every rank) oversubscribes the CPU and halved throughput here with 2 ranks."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    torch.set_num_threads(max(1, usable_cores() // max(1, local_world_size())))


# glibc's mallopt parameters (malloc.h) and their values here
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# 32 MiB: glibc's own adaptive maximum, and the largest value every glibc accepts (older ones refuse more);
# larger blocks are still mmapped, and still faulted in (ResNet-18's largest activations at 224 px)
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30
KEEP_FREED_MEMORY_ENV = "IFC_DS_KEEP_FREED_MEMORY"  # exactly "0": glibc's own behaviour


def retain_freed_memory() -> bool:
    """Has glibc's malloc keep freed memory for the next allocation instead of handing it back to the
    kernel; returns whether it was set. Why: by default a block over the (adaptive) mmap threshold is
    unmapped on free and the heap's free top is trimmed, so every training step faulted the memory it
    had freed back in as fresh zeroed pages: 7,700 minor faults (30 MB) per step of the trainer's
    ResNet-18 encoder at 32 px, batch 128 (13,700 for timm's, whose layer4 weights are channels-last, at
    batch 8-64), mostly the convolutions' weight-gradient temporaries. Keeping it made ``train.py`` on
    the CIFAR recipe 9% faster per step on this CPU, for 3% more peak resident memory per rank
    (``benchmarks/heap.py``, training alone); each rank may keep up to 1 GiB of freed heap.

    The part of what PyTorch's CPU tuning guide gets by preloading jemalloc or tcmalloc that mattered
    here (freed memory reused, not returned), done with the C library every Linux rank already has.
    Left alone with ``IFC_DS_KEEP_FREED_MEMORY=0``, where the user tunes malloc
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``glibc.malloc`` in ``GLIBC_TUNABLES``) or
    preloads another allocator (``LD_PRELOAD``), and where the C library is not glibc."""
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1") == "0":
        return False
    tuned = ("MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ
             or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or "malloc" in os.environ.get("LD_PRELOAD", ""))
    if tuned or not _c_library_is_glibc():
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # (mallopt answers 1 on success; setting either threshold also stops glibc adapting them)
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def _c_library_is_glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), no such name (macOS), musl
        return False


def is_main() -> bool:
    """Rank 0 of the world: the one that logs and writes the shared files."""
    return rank_in() == 0


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
