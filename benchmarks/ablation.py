"""Raw-feature init and hard-label smoothing on/off at the same budget, on CIFAR-10 (or any data).

    python benchmarks/ablation.py --data ../shared/data/cifar10 --limit 10000 --epochs 6 --out out/ablation

Runs the trainer once per variant (2 ranks, `deepspeed --num_gpus 2`), each with the kNN monitor
(bank: the training rows, queries: the test split, k=200, T=0.07) every `--eval-every` epochs, then
prints one table: kNN top-1 per evaluation for every variant, the full method (both hooks on) first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "both hooks (method)": [],
    "no raw-feature init": ["hooks.raw_init.enabled=false"],
    "no smoothing": ["hooks.smoothing.enabled=false"],
    "neither": ["hooks.raw_init.enabled=false", "hooks.smoothing.enabled=false"],
    "no classifier grad clip": ["train.classifier_grad_clip=0"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cifar10")
    parser.add_argument("--limit", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", default="out/ablation")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("overrides", nargs="*", help="extra key=value for every run")
    args = parser.parse_args()
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    curves = {}
    for name in args.variants:
        out = Path(args.out) / name.replace(" ", "_").replace("(", "").replace(")", "")
        if not (out / "eval.json").exists():
            cmd = [deepspeed, "--num_gpus", str(args.ranks), "train.py", "--config", "configs/cifar10.yaml",
                   f"output_dir={out}", f"data.train=parquet:{args.data}/train.parquet", f"data.limit={args.limit}",
                   f"eval.train=parquet:{args.data}/train.parquet", f"eval.test=parquet:{args.data}/test.parquet",
                   f"eval.limit_train={args.limit}", f"train.epochs={args.epochs}",
                   f"eval.every_epochs={args.eval_every}", "log.progress=false", "resume=none",
                   *VARIANTS[name], *args.overrides]
            subprocess.run(cmd, cwd=REPO, check=True, env=dict(os.environ), stdout=subprocess.DEVNULL)
        curves[name] = json.loads((out / "eval.json").read_text())["history"]
    epochs = sorted({e["epoch"] for c in curves.values() for e in c})
    print(f"kNN top-1 (%) on {args.limit:,} CIFAR-10 training rows -> 10,000 test rows, k=200, T=0.07, "
          f"{args.ranks} ranks, {args.epochs} epochs\n")
    print("| variant | " + " | ".join(f"epoch {e}" for e in epochs) + " |")
    print("|---|" + "---|" * len(epochs))
    for name, curve in curves.items():
        by_epoch = {e["epoch"]: e["knn_top1"] for e in curve}
        print(f"| {name} | " + " | ".join(f"{100 * by_epoch[e]:.2f}" if e in by_epoch else "" for e in epochs) + " |")


if __name__ == "__main__":
    main()
