"""DeepSpeed's shared-memory all-reduce on a CPU node (its comm backend's ``inference_all_reduce``),
where every rank of the world is on one node: set up by ``ifc_ds.dist.init_distributed`` with room
checked and its ``/dev/shm`` workspaces unlinked once mapped. Under a watchdog it sums the backbone's
gradients where the node-shared buffers could not be made (``FlatGradients``), and every small sum
over the world that ``ifc_ds.collectives.all_reduce_`` runs (the classifier's softmax statistics and
feature gradients) when each rank has a core of its own. It reads DeepSpeed's comm internals, so it
lives behind the engine package."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys

import torch
import torch.distributed as dist

from ifc_ds import dist as ifc_dist  # (shared_memory_free_bytes looked up at call time: tests replace it)
from ifc_ds.collectives import all_reduce_min, size, use_node_sum
from ifc_ds.dist import EXIT_PEER_LOST, Watchdog

log = logging.getLogger(__name__)

# DeepSpeed's shm.cpp: each rank's all-reduce workspace, a POSIX shared-memory object of 2 x 1 MiB + 2 x 32 MiB
# (plus two state words) named deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}
WORKSPACE_BYTES = 2 * (1 << 20) + 2 * (32 << 20) + 8
_ready = False  # set by init_process_group once that all-reduce is set up on every rank
_watchdog: Watchdog | None = None  # small_sum_'s deadline
SMALL_SUM_BYTES = 1 << 20  # the kernel's single-buffer size (shm.cpp's NAIVE_ALLREDUCE_THRESHOLD)


def workspace_path(global_rank: int) -> str:
    """Where Linux keeps DeepSpeed's shared-memory object for ``global_rank`` (shm_open's /dev/shm)."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{global_rank}")


def prefer_environment_ninja() -> None:
    """Puts this interpreter's bin folder first on PATH when a ``ninja`` is there (DeepSpeed depends on
    the ninja package, so it is). DeepSpeed JIT-builds its op with whichever ninja PATH finds first, and
    two ninja versions keep incompatible build logs: a rank started as ``.venv/bin/python train.py``
    (the system's ninja) and one started in an activated environment or by ``slurm/pretrain.sbatch``
    (the environment's) each rebuilt the op from scratch after the other, ~40 s per start here. Called
    wherever DeepSpeed may build it: ``ifc_ds.dist.init_distributed``, before either of its branches
    (``init_process_group`` here, or straight to deepspeed.init_distributed), and ``build_engines``
    (deepspeed.initialize sets up DeepSpeed's comm on a process group made elsewhere, e.g. by a test)."""
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.access(os.path.join(bin_dir, "ninja"), os.X_OK) and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + path


def init_process_group(timeout: datetime.timedelta) -> None:
    """DeepSpeed's CPU backend gives every local rank a 66 MiB shared-memory workspace and never
    unlinks it: each run leaked 66 MiB per rank of /dev/shm, i.e. of RAM (a test suite left 21 GB and
    the node thrashed), and a rank whose peer found a stale workspace of an earlier run on the same
    port, or could not write its own for lack of room, hung in DeepSpeed's loops that have no timeout.
    So the process group comes first (DeepSpeed adopts it); the ranks clear their stale names and
    agree whether /dev/shm has room for all workspaces (else DeepSpeed is told LOCAL_SIZE=0 and
    reduces through gloo); once every rank has mapped every workspace, each unlinks its own, so
    the memory goes with the last process even on kill -9. ``all_reduce_applies`` then says whether
    the all-reduce is set up; with a core per rank, ``collectives.all_reduce_`` sums small tensors
    through it (``small_sum_``)."""
    global _ready, _watchdog
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    dist.init_process_group(get_accelerator().communication_backend_name(), timeout=timeout)
    _ready = False
    use_node_sum(None)
    me, world = dist.get_rank(), dist.get_world_size()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(workspace_path(me))  # a killed run's, on the same address and port
    need = world * WORKSPACE_BYTES
    room = all_reduce_min(torch.tensor([ifc_dist.shared_memory_has_room(need)], dtype=torch.uint8)).item()
    if not room:
        if me == 0:
            log.warning("/dev/shm has %.0f MiB free, DeepSpeed's shared-memory all-reduce needs %.0f MiB for %d "
                        "ranks: gradients are reduced through %s", ifc_dist.shared_memory_free_bytes() / 2**20,
                        need / 2**20, world, dist.get_backend())
        os.environ["LOCAL_SIZE"], local_size = "0", os.environ["LOCAL_SIZE"]  # (what shm_interface.cpp reads)
        try:
            deepspeed.init_distributed(timeout=timeout)
        finally:
            os.environ["LOCAL_SIZE"] = local_size
        return
    deepspeed.init_distributed(timeout=timeout)
    from deepspeed.comm import comm as ds_comm

    built = getattr(getattr(ds_comm, "cdb", None), "shm_comm_op", None) is not None  # (it may not have built)
    # (agreed: a rank whose op did not build must not leave its peers spinning in it); the barrier
    # inside: every rank has opened every workspace
    ready = bool(all_reduce_min(torch.tensor([built], dtype=torch.uint8)).item())
    with contextlib.suppress(FileNotFoundError):
        os.unlink(workspace_path(me))
    _ready = ready
    # DeepSpeed's kernel spins while it waits: with more ranks than cores, a waiting rank would take
    # the core its peer needs
    if ready and all_reduce_min(torch.tensor([world <= ifc_dist.usable_cores()], dtype=torch.uint8)).item():
        _watchdog = Watchdog(timeout.total_seconds(), "a peer rank died or a collective timed out; restart with "
                             "resume=auto to continue from the last complete checkpoint", EXIT_PEER_LOST)
        use_node_sum(small_sum_)


def small_sum_(tensor: torch.Tensor) -> bool:
    """The world's sum of a small tensor, in place, through DeepSpeed's kernel under the watchdog (5 us
    for a [256] fp32 tensor on 2 ranks here, against gloo's 0.3-2 ms). False, untouched, for a tensor
    it does not take: over ``SMALL_SUM_BYTES`` (large sums have their own path, ``FlatGradients``),
    not contiguous, or one the kernel does not reduce (``all_reduce_applies``)."""
    if (tensor.numel() * tensor.element_size() > SMALL_SUM_BYTES or not tensor.is_contiguous()
            or not all_reduce_applies(tensor)):
        return False
    with _watchdog.guard("an all-reduce through shared memory"):
        all_reduce_(tensor)
    return True


def all_reduce_applies(tensor: torch.Tensor) -> bool:
    """Whether DeepSpeed's shared-memory all-reduce (its CPU ``inference_all_reduce``: 16 ms against
    gloo's 42 ms for ResNet-18's 47 MB of fp32 gradients on 2 ranks here, where gloo goes through
    loopback TCP) can sum ``tensor`` over the world. Only where ``init_process_group`` set it up (every
    rank of the world on this node) and its kernel reduces for real (otherwise it returns the input
    unreduced, silently): a CPU tensor, fp32 with AVX2 or bf16/fp16 with AVX-512."""
    if not (_ready and size() > 1) or tensor.device.type != "cpu":
        return False
    from deepspeed.comm import comm as ds_comm

    if not hasattr(torch.ops.deepspeed, "inference_all_reduce_"):
        return False
    needed = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 2}.get(tensor.dtype)
    return needed is not None and getattr(ds_comm.cdb, "shm_vector_kernel_level", 0) >= needed


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """In place, the sum over the world (check ``all_reduce_applies`` first). Every rank
    adds the buffers in rank order, so all get bitwise the same result (for 2 ranks, gloo's). Its C++
    spins on shared flags with no timeout, releasing the GIL: call it under a ``Watchdog``."""
    return torch.ops.deepspeed.inference_all_reduce_(tensor)
