"""What a CPU rank's heap costs: glibc's own malloc against the one ``init_distributed`` sets up
(``ifc_ds.dist.retain_freed_memory``: freed memory kept for the next allocation, not handed back to
the kernel), every row measured in this run, the two settings alternating round by round:

* the encoder step alone: ResNet-18 32x32 + head in the trainer's weight layout, fwd + bwd + SGD on
  a batch in memory, one process of 1 thread per setting and round;
* with ``--train-py``: ``train.py`` itself on the CIFAR recipe (2 ranks x 1 thread, the data path,
  both engines), its steady-state images/s from ``metrics.jsonl``.

Each row gives the median time, the minor page faults per step (pages the kernel had to map and zero
again) and the peak resident size of the largest process.

    python benchmarks/heap.py
    python benchmarks/heap.py --train-py --cifar ../shared/data/cifar10/train.parquet
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # train_step.py: train.py's benchmark command

from train_step import logged_images_per_sec, train_command  # noqa: E402

from ifc_ds.dist import KEEP_FREED_MEMORY_ENV  # noqa: E402

SETTINGS = {"glibc's own (IFC_DS_KEEP_FREED_MEMORY=0)": "0", "freed memory kept (the trainer's)": "1"}

_ENCODER_STEP = """
import json, resource, statistics, sys, time, torch
torch.set_num_threads(1)
from ifc_ds.config import load_config
from ifc_ds.dist import retain_freed_memory
from ifc_ds.model import InstanceEncoder, to_channels_last
retain_freed_memory()  # (a no-op under IFC_DS_KEEP_FREED_MEMORY=0)
steps, batch = int(sys.argv[1]), int(sys.argv[2])
cfg = load_config(None, ["model.name=resnet18"])
encoder = InstanceEncoder(cfg.model, 32)
to_channels_last(encoder, 32)
optimizer = torch.optim.SGD(encoder.parameters(), lr=0.01, momentum=0.9)
images = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
times, faults = [], []
for step in range(steps + 3):  # 3 warm-up steps
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    loss = encoder(images).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step >= 3:
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"ms": statistics.median(times) * 1e3, "faults": statistics.median(faults),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(cmd: list[str], keep: str, env=None) -> subprocess.CompletedProcess:
    env = dict(env or os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **{KEEP_FREED_MEMORY_ENV: keep})
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def encoder_step(keep: str, steps: int, batch: int) -> dict:
    return json.loads(run([sys.executable, "-c", _ENCODER_STEP, str(steps), str(batch)], keep).stdout.split("\n")[-2])


def train_py(keep: str, args) -> dict:
    """train.py on the CIFAR recipe (``benchmarks/train_step.py``'s command: 2 ranks x 1 thread, 128
    images per rank, N = 10,000) in a fresh process tree: ms per step from its logged images/s, and the
    peak resident size of its largest process (a rank)."""
    recipe = argparse.Namespace(cifar=args.cifar, instances=10_000, batch=128, e2e_steps=args.train_steps,
                                model="resnet18", ranks=2, threads=1)
    with tempfile.TemporaryDirectory() as out:
        cmd, env = train_command(recipe, out)
        # a helper process runs the launcher, so this process's RUSAGE_CHILDREN holds that run's tree alone
        code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        proc = run([sys.executable, "-c", code, *cmd], keep, env)
        per_rank = logged_images_per_sec(out) / recipe.ranks
    return {"ms": recipe.batch / per_rank * 1e3, "faults": None, "peak_mb": int(proc.stdout.split()[-1]) / 1024}


def table(title: str, rounds: list[dict]) -> None:
    print(f"\n{title}\n")
    print("| heap | ms per step, median of rounds (min-max) | minor faults per step | peak resident MB "
          "| per-round ratio of times to glibc's own |")
    print("|---|---|---|---|---|")
    base = list(SETTINGS)[0]
    for name in SETTINGS:
        ms = [r[name]["ms"] for r in rounds]
        faults = [r[name]["faults"] for r in rounds if r[name]["faults"] is not None]
        ratio = statistics.median(r[name]["ms"] / r[base]["ms"] for r in rounds)
        print(f"| {name} | {statistics.median(ms):.1f} ({min(ms):.1f}-{max(ms):.1f}) | "
              f"{f'{statistics.median(faults):,.0f}' if faults else '-'} | "
              f"{max(r[name]['peak_mb'] for r in rounds):,.0f} | {ratio:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="timed encoder steps per process")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--train-py", action="store_true", help="also train.py on the CIFAR recipe")
    parser.add_argument("--train-rounds", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--cifar", default=str(REPO.parent / "shared" / "data" / "cifar10" / "train.parquet"))
    args = parser.parse_args()
    rounds = [{name: encoder_step(keep, args.steps, args.batch) for name, keep in SETTINGS.items()}
              for _ in range(args.rounds)]
    table(f"encoder step alone: resnet18 32x32 + head, batch {args.batch}, 1 thread, the trainer's weight layout; "
          f"{args.rounds} rounds of {args.steps} steps per setting, alternating", rounds)
    if args.train_py:
        rounds = [{name: train_py(keep, args) for name, keep in SETTINGS.items()} for _ in range(args.train_rounds)]
        table(f"train.py, configs/cifar10.yaml, 2 ranks x 1 thread, {args.train_steps} steps "
              f"(median of its logged intervals after the first two); {args.train_rounds} rounds, alternating", rounds)


if __name__ == "__main__":
    main()
