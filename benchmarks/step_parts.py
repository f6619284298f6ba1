"""Three parts of the trainer step on a CPU node, each against its baseline in the same run:

* small sums over the world (2 gloo ranks, one thread each): gloo's all-reduce through loopback TCP
  against ``ifc_ds.collectives.all_reduce_`` through node-shared memory (DeepSpeed's shared-memory
  kernel, ``ifc_ds.engine.shared_memory.small_sum_``) at the classifier's sizes (a [256] softmax
  statistic, the [256, 128] feature gradient of a 2 x 128 batch), and what rides on the same sum: a
  gather of a rank's [128, 128] features, a max, a barrier inside a step; then the classifier's forward +
  backward (N = 10,000, D = 128, 128 images per rank) with its sums through each;
* the backbone's optimizer step (one process, one thread): torch SGD with momentum over ResNet-18 +
  head's channels-last weights (47 MB), per tensor (torch's CPU default), torch's fused kernel, and
  that kernel on 1-D runs of memory (``ifc_ds.engine.fused_sgd.DenseFusedSGD``, what
  ``ifc_ds.engine.make_optimizer`` builds), each with and without weight decay;
* the backbone's gradients landing in the flat buffer the average reads (one process, one thread):
  given the gradients a backward makes, accumulated into zeroed slices plus the zeroing pass for the
  next step (before), against copied into the slices (``ifc_ds.engine.FlatGradients``' hook).

    python benchmarks/step_parts.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from train_step import rank_environment  # noqa: E402  (this folder: what DeepSpeed's launcher sets for a rank)

from ifc_ds import collectives  # noqa: E402
from ifc_ds.dist import free_port, init_distributed  # noqa: E402

SIZES = {"[1]": (1,), "[256]": (256,), "[256, 128]": (256, 128)}


def _median_ms(fn, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _sums_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(rank_environment(rank, world, port, threads=1))
    init_distributed(120)
    torch.set_num_threads(1)
    from ifc_ds.classifier import ShardedInstanceClassifier
    from ifc_ds.engine import shared_memory

    node_sum = collectives._node_sum
    ways = {"gloo": None, "node-shared memory": node_sum}
    calls = {f"sum of a {name} tensor": partial(collectives.all_reduce_sum, torch.ones(shape))
             for name, shape in SIZES.items()}
    calls.update({"gather of [128, 128] rows": partial(collectives.all_gather_equal, torch.ones(128, 128)),
                  "max of a [256] tensor": lambda: collectives.all_reduce_max(torch.ones(256)),
                  "barrier inside a step": collectives.step_barrier})
    rows = {}
    for name, fn in calls.items():
        for way, node in ways.items():
            collectives.use_node_sum(node)
            for _ in range(20):
                fn()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            rows[(name, way)] = (time.perf_counter() - t0) / 200 * 1e3
    clf = ShardedInstanceClassifier(10_000, 128, 0.1)
    gen = torch.Generator().manual_seed(rank)
    features = torch.randn(128, 128, generator=gen)
    times = {way: [] for way in ways}
    for step in range(50):  # interleaved step by step
        ids = torch.randint(0, 10_000, (128,), generator=gen)
        for way, fn in ways.items():
            collectives.use_node_sum(fn)
            leaf = features.clone().requires_grad_()
            dist.barrier()
            t0 = time.perf_counter()
            clf(leaf, ids).backward()
            if step >= 10:
                times[way].append(time.perf_counter() - t0)
            clf.weight.grad = None
    for way in ways:
        rows[("classifier forward + backward", way)] = statistics.median(times[way]) * 1e3
    collectives.use_node_sum(node_sum)
    if rank == 0:
        assert node_sum is shared_memory.small_sum_, "the node-shared sums are not set up (a core per rank?)"
        torch.save(rows, out)
    dist.destroy_process_group()


def small_sums() -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.spawn(_sums_worker, args=(2, free_port(), out), nprocs=2)
        return torch.load(out)


def _resnet18_channels_last():
    """ResNet-18 + head at 32 px with channels-last weights, as the trainer holds it (1 thread)."""
    from ifc_ds.config import load_config
    from ifc_ds.model import InstanceEncoder

    torch.set_num_threads(1)
    return InstanceEncoder(load_config(None, ["model.name=resnet18"]).model, 32).to(memory_format=torch.channels_last)


def optimizer_steps() -> dict:
    from ifc_ds.engine import make_optimizer, param_groups

    encoder = _resnet18_channels_last()
    grads = [torch.randn_like(p) for p in encoder.parameters()]

    def regrad():
        for p, g in zip(encoder.parameters(), grads):
            p.grad = g

    ways = {"per tensor": lambda groups: make_optimizer("sgd", groups, 0.1, 0.9, fused=False),
            "torch's fused": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, fused=True),
            "fused on runs of memory (ifc_ds)": lambda groups: make_optimizer("sgd", groups, 0.1, 0.9)}
    rows = {}
    for _ in range(2):  # twice, interleaved: the host's drift hits every row alike
        for weight_decay in (0.0, 5e-4):
            for way, make in ways.items():
                opt = make(param_groups(encoder, weight_decay))
                regrad()
                opt.step()  # the momentum buffers exist from here on
                ms = _median_ms(opt.step, 15, before=regrad)
                key = (f"SGD step, weight decay {weight_decay:g}", way)
                rows[key] = min(ms, rows.get(key, float("inf")))
    return rows


def gradient_landing() -> dict:
    """What a step pays to get autograd's gradients into the flat buffer, with the gradients given:
    fresh tensors per step, as a backward makes them."""
    from ifc_ds.engine import _flat_offsets, _views_of

    params = list(_resnet18_channels_last().parameters())
    flat = torch.zeros(_flat_offsets(params)[1])
    views = [view for _, view in _views_of(flat, params)]
    state = {}

    def fresh():
        state["grads"] = [torch.empty_like(p).fill_(1.0) for p in params]

    def accumulated_then_zeroed():
        for view, grad in zip(views, state["grads"]):
            view.add_(grad)
        flat.zero_()

    def copied():
        for view, grad in zip(views, state["grads"]):
            view.copy_(grad)

    ways = {"into zeroed slices + zeroing pass": accumulated_then_zeroed, "copied (ifc_ds)": copied}
    rows = {}
    for _ in range(2):  # twice, interleaved
        for way, fn in ways.items():
            key = ("ResNet-18 + head's 11.5 M gradients into the flat buffer", way)
            rows[key] = min(_median_ms(fn, 15, before=fresh), rows.get(key, float("inf")))
    return rows


def _print(title: str, rows: dict, base: str) -> None:
    ways = list(dict.fromkeys(way for _, way in rows))
    print(f"\n{title}\n")
    print("| what | " + " | ".join(f"{w} (ms)" for w in ways) + f" | x {base} |")
    print("|---|" + "---|" * (len(ways) + 1))
    for what in dict.fromkeys(w for w, _ in rows):
        cells = [rows[(what, way)] for way in ways]
        print(f"| {what} | " + " | ".join(f"{c:.3f}" if c < 1 else f"{c:.1f}" for c in cells)
              + f" | {cells[-1] / rows[(what, base)]:.3f} |")


def main():
    _print("2 gloo ranks x 1 thread, mean per call over 200 calls, the classifier median of 40 steps "
           "(the last column: the last way over the first)",
           small_sums(), "gloo")
    _print("1 process x 1 thread, resnet18 + head (47 MB of weights), channels-last, median of 15 steps "
           "(best of two interleaved rounds)", optimizer_steps(), "per tensor")
    _print("1 process x 1 thread, the same network, median of 15 steps (best of two interleaved rounds)",
           gradient_landing(), "into zeroed slices + zeroing pass")


if __name__ == "__main__":
    main()
