"""Sharded instance classifier vs. bare GEMMs vs. the replicated (PIC / plain data-parallel) baseline.

Every (variant, N) row runs in a fresh pair of gloo ranks (1 thread each), so the peak RSS of a
row is its own. Prints one markdown table; the 3-GEMM row is the same-run baseline for time.

    python benchmarks/classifier.py                      # N = 100k, 1M, 4M (about 10 min here)
    python benchmarks/classifier.py --sizes 100000 --steps 5

On a GPU (one rank per device; ``layer_fused`` is the Triton path, ``layer`` the block loops):

    python benchmarks/classifier.py --device cuda --ranks 1 --bf16 --sizes 1000000 4000000 --batch 512 4096
    python benchmarks/classifier.py --device cuda --ranks 1 --bf16 --sizes 10000000 --batch 4096 \
        --variants gemm3 layer_fused
    python benchmarks/classifier.py --device cuda --ranks 1 --sizes 1000000 --batch 512   # fp32 inputs
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ifc_ds.classifier import ShardedInstanceClassifier, shard_range

VARIANTS = ("gemm3", "layer", "layer_fused", "layer_chunked", "replicated")
LABELS = {"gemm3": "3 bare GEMMs (limit)", "layer": "ShardedInstanceClassifier",
          "layer_fused": "ShardedInstanceClassifier fused (Triton)",
          "layer_chunked": "ShardedInstanceClassifier chunked", "replicated": "replicated W + all-reduce (PIC)"}
# the fused kernels need an accelerator (on CPU they only run in Triton's interpreter)
CPU_VARIANTS = tuple(v for v in VARIANTS if v != "layer_fused")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _memory_now(device) -> float:
    """MB in use: process RSS on CPU, allocated device memory on an accelerator."""
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else _rss_mb()


def _memory_peak(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _make_step(variant, n_total, dim, batch_global, rank, world, chunk, autocast_dtype, device):
    b_local = batch_global // world
    gen = torch.Generator().manual_seed(rank)
    feats = torch.randn(b_local, dim, generator=gen).to(device).requires_grad_()
    ids = torch.randint(0, n_total, (b_local,), generator=gen).to(device)
    start, end = shard_range(n_total, world, rank)
    if variant == "gemm3":
        dtype = autocast_dtype or torch.float32  # the bare GEMMs in the autocast dtype
        f_all = torch.randn(batch_global, dim, device=device, dtype=dtype)
        w = torch.randn(end - start, dim, device=device, dtype=dtype)
        z = torch.empty(batch_global, end - start, device=device, dtype=dtype)
        gf, gw = torch.empty_like(f_all), torch.empty_like(w)

        def step():
            torch.mm(f_all, w.T, out=z)
            torch.mm(z, w, out=gf)
            torch.mm(z.T, f_all, out=gw)
        return step
    if variant.startswith("layer"):
        clf = ShardedInstanceClassifier(n_total, dim, temperature=0.1,
                                        chunk_size=chunk if variant == "layer_chunked" else None,
                                        fused="always" if variant == "layer_fused" else "never").to(device)

        def step():
            clf.weight.grad = None
            feats.grad = None
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = clf(feats, ids)
            loss.backward()
        return step
    weight = torch.nn.Parameter(F.normalize(torch.randn(n_total, dim), dim=1).to(device))

    def step():  # what plain data parallelism does: full weight per rank, gradient all-reduced
        weight.grad = None
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = F.normalize(feats.float(), dim=1) @ F.normalize(weight, dim=1).T / 0.1
            loss = F.cross_entropy(logits.float(), ids)
        loss.backward()
        if world > 1:
            dist.all_reduce(weight.grad)
    return step


def _worker(rank, world, store, variant, n_total, batch, args, out_path):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if args.bf16 else None
    step = _make_step(variant, n_total, args.dim, batch, rank, world, args.chunk, dtype, device)
    mem_before = _memory_now(device)  # weights and inputs exist; buffers a step allocates count as extra
    step()  # warm-up (also allocates the buffers kept across steps)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    times = []
    for _ in range(args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    stats = torch.tensor([statistics.median(times), min(times), max(times), _memory_peak(device), mem_before])
    gathered = [torch.zeros_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    if rank == 0:
        rows = torch.stack(gathered)
        # step time = slowest rank; memory = worst rank
        torch.save({"median": rows[:, 0].max().item(), "min": rows[:, 1].max().item(),
                    "max": rows[:, 2].max().item(), "peak_mb": rows[:, 3].max().item(),
                    "extra_mb": (rows[:, 3] - rows[:, 4]).max().item()}, out_path)
    dist.destroy_process_group()


def measure(variant, n_total, batch, args):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.pt")
        try:
            mp.spawn(_worker, args=(args.ranks, os.path.join(tmp, "s"), variant, n_total, batch, args, out),
                     nprocs=args.ranks)
            return torch.load(out)
        except Exception as exc:  # e.g. killed for memory: report the row, keep going
            return {"error": type(exc).__name__}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 4_000_000])
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                        help="default: all (without layer_fused on CPU)")
    parser.add_argument("--skip-replicated-above", type=int, default=2_000_000,
                        help="the replicated baseline needs ~3.5 x N x B/2 x 4 bytes per rank")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, nargs="+", default=[512], help="global batch(es)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast (the unfused layer computes fp32 inside; the fused one bf16 GEMMs)")
    args = parser.parse_args()
    if args.variants is None:
        args.variants = list(VARIANTS if args.device != "cpu" else CPU_VARIANTS)

    print(f"ranks={args.ranks} threads/rank={args.threads} B_global={args.batch} D={args.dim} "
          f"chunk={args.chunk} steps={args.steps} device={args.device} bf16={args.bf16}\n")
    memory = "device memory" if args.device != "cpu" else "RSS"
    print(f"| N | B | variant | ms/step median (min-max) | x 3-GEMM | peak {memory} MB/rank | peak extra MB/rank |")
    print("|---|---|---|---|---|---|---|")
    for n_total in args.sizes:
        for batch in args.batch:
            head = f"| {n_total:,} | {batch:,} |"
            gemm = None
            for variant in args.variants:
                if variant == "replicated" and n_total > args.skip_replicated_above:
                    print(f"{head} {LABELS[variant]} | skipped: needs > 24 GB on 2 ranks | | | |")
                    continue
                r = measure(variant, n_total, batch, args)
                if "error" in r:
                    print(f"{head} {LABELS[variant]} | failed ({r['error']}) | | | |", flush=True)
                    continue
                gemm = r["median"] if variant == "gemm3" else gemm
                ratio = f"{r['median'] / gemm:.2f}" if gemm else "-"
                ms = [f"{r[k] * 1e3:.{1 if r['median'] < 0.1 else 0}f}" for k in ("median", "min", "max")]
                print(f"{head} {LABELS[variant]} | {ms[0]} ({ms[1]}-{ms[2]}) | {ratio} | {r['peak_mb']:.0f} | "
                      f"{r['extra_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
