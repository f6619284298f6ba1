"""What each of the paper's ideas is worth: the CIFAR-10 recipe against its variants, over seeds.

    python benchmarks/ablation.py --seeds 0 1 2 --variants recipe "no smoothing" "no raw-feature init" \\
        "K=1 eps=0.2" "K=5 eps=0.2" "K=10 eps=0.2" --linear

Each (variant, seed) is one run of ``train.py --config configs/cifar10.yaml`` on 2 ranks (``deepspeed
--num_gpus 2``) at the recipe's budget (``--epochs`` / ``--limit`` to change it), with the recipe's kNN
monitor (bank: the training rows, queries: the 10,000 test rows, k=200, T=0.07) every ``--eval-every``
epochs, and with ``--linear`` the evaluation suite's linear probe on the final backbone (same rows).

A finished run leaves its small files in ``--results`` (kept in git: eval.json, metrics.jsonl,
config.yaml, run.json with the commit and throughput, linear.json); the checkpoints stay in ``--out``.
A run already in ``--results`` is never repeated, so the study can be spread over several sessions:
the same command resumes it. The numbers are comparable across machines because a run is bitwise
reproducible from its seed (the wall time is not: run.json keeps the images/s next to it).

Then it prints one table (final kNN and linear top-1: mean and range over seeds, and each one's
difference to the recipe judged against the recipe's seed-to-seed range) and writes one PNG with
every variant's kNN curve.
``--report-only`` prints what is there without training.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = "recipe"
VARIANTS = {
    RECIPE: [],  # configs/cifar10.yaml: raw init + smoothing K=5 eps=0.1 from epoch 8, 4-epoch ramp
    "no smoothing": ["hooks.smoothing.enabled=false"],
    "no raw-feature init": ["hooks.raw_init.enabled=false"],
    "neither": ["hooks.raw_init.enabled=false", "hooks.smoothing.enabled=false"],
    "K=1 eps=0.2": ["hooks.smoothing.k=1", "hooks.smoothing.eps=0.2"],
    "K=5 eps=0.2": ["hooks.smoothing.k=5", "hooks.smoothing.eps=0.2"],
    "K=10 eps=0.2": ["hooks.smoothing.k=10", "hooks.smoothing.eps=0.2"],
    "smoothing from epoch 1": ["hooks.smoothing.start_epoch=1", "hooks.smoothing.ramp_epochs=1"],
    "no classifier grad clip": ["train.classifier_grad_clip=0"],
}
RECIPE_EPOCHS, RECIPE_EVAL_EVERY = 90, 15  # configs/cifar10.yaml's train.epochs and eval.every_epochs


def slug(variant: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in variant).strip("_")


def budget_name(limit: int, epochs: int) -> str:
    return f"cifar10_{limit // 1000}k_{epochs}ep"


def train(variant: str, seed: int, args, out: Path) -> dict:
    """One training run; returns what run.json records."""
    data = Path(args.data).resolve()
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(args.ranks), "train.py",
           "--config", "configs/cifar10.yaml", f"output_dir={out}", f"seed={seed}",
           f"data.train=parquet:{data}/train.parquet", f"data.limit={args.limit}",
           f"eval.train=parquet:{data}/train.parquet", f"eval.test=parquet:{data}/test.parquet",
           f"eval.limit_train={args.limit}", f"train.epochs={args.epochs}", f"eval.every_epochs={args.eval_every}",
           "log.progress=false", "resume=none", *VARIANTS[variant], *args.overrides]
    start = time.monotonic()
    subprocess.run(cmd, cwd=REPO, check=True, env=dict(os.environ), stdout=subprocess.DEVNULL)
    wall = time.monotonic() - start
    rates = [m["images_per_sec"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "images_per_sec" in m]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"variant": variant, "seed": seed, "overrides": VARIANTS[variant] + args.overrides, "commit": commit,
            "wall_s": round(wall), "median_images_per_s": round(statistics.median(rates)) if rates else None,
            "ranks": args.ranks, "command": " ".join(cmd[1:])}


def linear(args, out: Path) -> dict:
    """The suite's linear probe on the run's final backbone, on the run's own kNN pair of datasets."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(args.ranks), "--module", "ifc_eval.suite",
           "--checkpoint", str(out), "protocols=[linear]", "baselines=[]", f"output_dir={out / 'suite'}"]
    subprocess.run(cmd, cwd=REPO, check=True, env=dict(os.environ), stdout=subprocess.DEVNULL)
    results = json.loads((out / "suite" / "results.json").read_text())
    (entry,) = [v for k, v in results.items() if not k.startswith("_")]
    return {k: v for k, v in entry.items() if k.startswith("linear")}


def run_all(args, results: Path) -> None:
    for seed in args.seeds:
        for variant in args.variants:
            kept = results / slug(variant) / f"seed{seed}"
            out = Path(args.out) / budget_name(args.limit, args.epochs) / slug(variant) / f"seed{seed}"
            if not (kept / "eval.json").exists():
                print(f"training {variant}, seed {seed} -> {out}", flush=True)
                run = train(variant, seed, args, out)
                kept.mkdir(parents=True, exist_ok=True)
                for name in ("eval.json", "metrics.jsonl", "config.yaml"):
                    shutil.copy(out / name, kept / name)
                (kept / "run.json").write_text(json.dumps(run, indent=1))
            if args.linear and not (kept / "linear.json").exists() and (out / "checkpoints").is_dir():
                print(f"linear probe {variant}, seed {seed}", flush=True)
                (kept / "linear.json").write_text(json.dumps(linear(args, out), indent=1))


def load(results: Path) -> dict:
    """variant -> [(seed, eval.json, linear.json or None, run.json)] of every kept run."""
    runs = {}
    for run_file in sorted(results.glob("*/seed*/run.json")):
        run = json.loads(run_file.read_text())
        folder = run_file.parent
        lin = json.loads((folder / "linear.json").read_text()) if (folder / "linear.json").exists() else None
        runs.setdefault(run["variant"], []).append((run["seed"], json.loads((folder / "eval.json").read_text()),
                                                    lin, run))
    return runs


def _mean_range(vals: list[float]) -> str:
    if not vals:
        return ""
    return f"{statistics.mean(vals):.2f}" + (f" ({min(vals):.2f}-{max(vals):.2f})" if len(vals) > 1 else "")


def _versus(variant: str, vals: list[float], recipe: list[float]) -> str:
    """The variant's mean minus the recipe's, judged against the recipe's seed-to-seed range: a
    difference inside that range is 'no measurable effect', never a gain or a loss."""
    spread = max(recipe) - min(recipe) if len(recipe) > 1 else None
    if variant == RECIPE:
        return f"seed range {spread:.2f}" if spread is not None else ""
    if not vals or not recipe:
        return ""
    diff = statistics.mean(vals) - statistics.mean(recipe)
    if spread is None:
        return f"{diff:+.2f} (one recipe seed: no spread yet)"
    return f"{diff:+.2f}" + (" no measurable effect" if abs(diff) <= spread else "")


def report(runs: dict, results: Path, title: str) -> None:
    if not runs:
        print(f"no runs in {results}")
        return
    order = [v for v in VARIANTS if v in runs]
    knn = {v: [100 * e["knn_top1"] for _, e, _, _ in runs[v]] for v in order}
    lin = {v: [100 * lj["linear_top1"] for _, _, lj, _ in runs[v] if lj] for v in order}
    print(f"{title}\n")
    print("| variant | seeds | final kNN top-1 %: mean (min-max) | vs recipe (points) | linear top-1 %: mean (min-max) "
          "| vs recipe (points) | img/s (median logged; separate runs, the machine drifts) |")
    print("|---|---|---|---|---|---|---|")
    for v in order:
        rates = [r["median_images_per_s"] for *_, r in runs[v] if r.get("median_images_per_s")]
        print(f"| {v} | {','.join(str(s) for s, *_ in runs[v])} | {_mean_range(knn[v])} | "
              f"{_versus(v, knn[v], knn.get(RECIPE, []))} | {_mean_range(lin[v])} | "
              f"{_versus(v, lin[v], lin.get(RECIPE, []))} | {f'{statistics.median(rates):.0f}' if rates else ''} |")
    plot(runs, order, results / "knn_curves.png", title)


def plot(runs: dict, order: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, v in enumerate(order):
        color = f"C{i}"
        seeds = len(runs[v])
        for n, (_, ev, _, _) in enumerate(runs[v]):
            xs = [h["epoch"] for h in ev["history"]]
            ax.plot(xs, [100 * h["knn_top1"] for h in ev["history"]], color=color, marker="o", markersize=3,
                    label=f"{v} ({seeds} seed{'s' if seeds > 1 else ''})" if n == 0 else None,
                    alpha=0.9 if n == 0 else 0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\ncurves: {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cifar10")
    parser.add_argument("--limit", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=RECIPE_EPOCHS)
    parser.add_argument("--eval-every", type=int, default=RECIPE_EVAL_EVERY)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=[RECIPE], choices=list(VARIANTS))
    parser.add_argument("--linear", action="store_true", help="the suite's linear probe on each final backbone")
    parser.add_argument("--out", default="out/ablation", help="run folders (checkpoints)")
    parser.add_argument("--results", default=None,
                        help="kept small files (default benchmarks/results/ablation/<budget>)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra key=value for every run")
    args = parser.parse_args()
    budget = budget_name(args.limit, args.epochs)
    results = Path(args.results or REPO / "benchmarks" / "results" / "ablation" / budget)
    if not args.report_only:
        run_all(args, results)
    report(load(results), results, f"kNN top-1 on {args.limit:,} CIFAR-10 training rows -> 10,000 test rows "
           f"(k=200, T=0.07),\n{args.ranks} ranks, {args.epochs} epochs ({budget})")


if __name__ == "__main__":
    main()
