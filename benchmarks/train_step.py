"""Classifier overhead in a real training step: the same data-parallel backbone engine (ResNet-18,
32x32, channels-last inputs) with and without the sharded instance classifier, 2 gloo ranks.

    python benchmarks/train_step.py                 # N = 50,000, 128 images per rank
    python benchmarks/train_step.py --instances 1000000 --chunk 32768

"with classifier" is the trainer's step (ifc_ds.engine.train_step + optimizer_step); "backbone only"
replaces the classifier loss by a trivial one on the same features, so the difference is what the
classifier (its all-gather, logits, softmax, both GEMMs and its engine) costs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ifc_ds.classifier import ShardedInstanceClassifier
from ifc_ds.config import load_config
from ifc_ds.engine import build_engines, optimizer_step, train_step
from ifc_ds.model import InstanceEncoder


def _worker(rank, world, tmp, args, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    cfg = load_config(None, [f"model.name={args.model}", f"train.batch_size={args.batch}"])
    classifier = ShardedInstanceClassifier(args.instances, cfg.model.dim, 0.1, chunk_size=args.chunk)
    engines = build_engines(cfg, InstanceEncoder(cfg.model, 32), classifier, steps_per_epoch=100, world_size=world)
    gen = torch.Generator().manual_seed(rank)
    images = torch.randn(args.batch, 3, 32, 32, generator=gen)

    def with_classifier():
        ids = torch.randint(0, args.instances, (args.batch,), generator=gen)
        train_step(engines, images, ids, 0, 0.0)
        optimizer_step(engines)

    def backbone_only():
        features = engines.backbone(images)
        engines.backbone.backward(features.float().square().mean())
        engines.backbone.step()

    results = {}
    for name, step in (("backbone only", backbone_only), ("with classifier", with_classifier)) * 2:
        step()  # warm-up
        times = []
        for _ in range(args.steps):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        results.setdefault(name, []).extend(times)  # two interleaved rounds: drift hits both alike
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=128, help="per rank")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.pt")
        mp.spawn(_worker, args=(args.ranks, tmp, args, out), nprocs=args.ranks)
        results = torch.load(out)
    base = statistics.median(results["backbone only"])
    print(f"{args.ranks} ranks x 1 thread, {args.model} 32x32, {args.batch} images/rank, N={args.instances:,}, "
          f"{2 * args.steps} timed steps each\n")
    print("| step | ms median (min-max) | x backbone only |")
    print("|---|---|---|")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"| {name} | {med * 1e3:.0f} ({min(times) * 1e3:.0f}-{max(times) * 1e3:.0f}) | {med / base:.3f} |")


if __name__ == "__main__":
    main()
