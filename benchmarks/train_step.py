"""The training step, from the encoder alone to the whole trainer, on ``--ranks`` gloo ranks (2) of
``--threads`` threads each (1):

* encoder alone: plain torch, ResNet-18 32x32 + head, fwd + bwd + SGD, channels-last weights and
  inputs, on a batch already in memory (no DeepSpeed, no classifier);
* encoder alone, the slower rank of each step: the same times, the larger of the ranks' per step:
  a synchronised step waits for the slower rank, so no data-parallel step of these processes can beat it;
* encoder alone, the trainer's weight layout: the same with the weights as ``build_engines`` lays them out
  (``ifc_ds.model.to_channels_last``: plain for k x k kernels on 1x1 maps), the like-for-like baseline;
* backbone engine only: the same through the DeepSpeed engine (gradient all-reduce included) with a
  trivial loss;
* with classifier: the trainer's step (``ifc_ds.engine.train_step`` + ``optimizer_step``) on batches
  already in memory: both engines, the sharded classifier, N = 50,000; with ``--smoothing-k K`` also
  the same step with hard-label smoothing over the top K negatives;
* with ``--end-to-end``: the trainer's step fed by its real data path (CIFAR-10 decoded in memory,
  batched crops, device views), the same with the gradients averaged through DeepSpeed's
  shared-memory all-reduce and through gloo's instead of the node-shared buffers, ``train.py`` itself on
  CIFAR-10 (``configs/cifar10.yaml``: data path, device views, hooks, logging), its steady-state
  images/s from ``metrics.jsonl``; then the fed step and the encoder alone phase by phase on every
  rank (wall time of the data path, each engine's forward, backward and step, the gradient buffer's
  all-reduce), which names what the fed step spends beyond the encoder alone.

    python benchmarks/train_step.py                                   # the step table
    python benchmarks/train_step.py --end-to-end --cifar ../shared/data/cifar10/train.parquet
    python benchmarks/train_step.py --profile                         # where a trainer step's time goes
    python benchmarks/train_step.py --instances 1000000 --chunk 32768
    python benchmarks/train_step.py --instances 10000 --smoothing-k 5   # what smoothing adds to a step
    python benchmarks/train_step.py --ranks 1 --instances 10000 --end-to-end   # the same without synchronisation

All rows run in the same invocation, one after the other, with nothing else on the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ifc_ds.classifier import ShardedInstanceClassifier  # noqa: E402
from ifc_ds.config import load_config  # noqa: E402
from ifc_ds.dist import free_port, init_distributed  # noqa: E402
from ifc_ds.engine import backbone_only_step, build_engines, optimizer_step, train_step  # noqa: E402
from ifc_ds.model import InstanceEncoder, to_channels_last  # noqa: E402


class PhaseClock:
    """Wall time per phase of a step, on this rank: wraps methods of the engines and the data path in
    place, so the trainer's own code runs unchanged and is timed from outside. Only steps run under
    ``timing(row)`` are recorded; a phase that includes a collective includes the wait for the slower
    rank."""

    def __init__(self):
        self.active: dict | None = None
        self.rows: dict[str, list[dict]] = {}

    def wrap(self, obj, attr: str, phase: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            if self.active is None:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - t0)

        setattr(obj, attr, timed)

    def add(self, phase: str, seconds: float) -> None:
        if self.active is not None:
            self.active[phase] = self.active.get(phase, 0.0) + seconds

    @contextmanager
    def timing(self, row: str):
        self.active, t0 = {}, time.perf_counter()
        try:
            yield
        finally:
            self.active[TOTAL] = time.perf_counter() - t0
            self.rows.setdefault(row, []).append(self.active)
            self.active = None


# the phases of a step, in order (the encoder alone has forward, backward and its optimizer step)
DATA, ATTACH, BB_FWD, CLF_FWD, CLF_BWD, BB_BWD, ALL_REDUCE, CLF_STEP, BB_STEP, TOTAL = (
    "data: next batch, crops, device views", "gradients dropped for the step's backward", "backbone forward",
    "classifier forward (feature all-gather, softmax all-reduces)",
    "classifier backward (feature-gradient all-reduce)", "backbone backward (encoder alone: with zero_grad)",
    "backbone gradient average + divide (with any wait for the slower rank)",
    "classifier optimizer step",
    "backbone optimizer step", "whole step")
REST = "the rest (engine and Python between the phases)"
PHASES = (DATA, ATTACH, BB_FWD, CLF_FWD, CLF_BWD, BB_BWD, ALL_REDUCE, CLF_STEP, BB_STEP, REST, TOTAL)


def _time_phases(clock: PhaseClock, engines) -> None:
    clock.wrap(engines.backbone, "forward", BB_FWD)
    clock.wrap(engines.backbone, "backward", BB_BWD)
    clock.wrap(engines.backbone, "step", BB_STEP)
    clock.wrap(engines.classifier, "forward", CLF_FWD)
    clock.wrap(engines.classifier, "backward", CLF_BWD)
    clock.wrap(engines.classifier, "step", CLF_STEP)
    if engines.flat_grads is not None:
        clock.wrap(engines.flat_grads, "attach", ATTACH)
        clock.wrap(engines.flat_grads, "all_reduce", ALL_REDUCE)


def rank_environment(rank: int, world: int, port: int, threads: int) -> dict[str, str]:
    """What DeepSpeed's launcher sets for a rank (LOCAL_SIZE lets the backbone's gradient all-reduce use
    shared memory), and OMP_NUM_THREADS: without it ``init_distributed`` gives each rank its share of
    the cores (both cores to a single rank), whatever the row says."""
    return dict(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))


def _worker(rank, world, port, args, out):
    os.environ.update(rank_environment(rank, world, port, args.threads))
    init_distributed(600)
    torch.set_num_threads(args.threads)  # (init_distributed leaves it so too: OMP_NUM_THREADS is set)
    cfg = load_config(None, [f"model.name={args.model}", f"train.batch_size={args.batch}"])
    gen = torch.Generator().manual_seed(rank)
    images = torch.randn(args.batch, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)

    clock = PhaseClock()

    def encoder_alone_step(encoder: InstanceEncoder):
        optimizer = torch.optim.SGD(encoder.parameters(), lr=0.01, momentum=0.9)

        def step():
            t0 = time.perf_counter()
            loss = encoder(images).square().mean()
            t1 = time.perf_counter()
            optimizer.zero_grad()
            loss.backward()
            t2 = time.perf_counter()
            optimizer.step()
            clock.add(BB_FWD, t1 - t0)
            clock.add(BB_BWD, t2 - t1)
            clock.add(BB_STEP, time.perf_counter() - t2)
        return step

    encoder_alone = encoder_alone_step(InstanceEncoder(cfg.model, 32).to(memory_format=torch.channels_last))
    trainers_layout = InstanceEncoder(cfg.model, 32)
    to_channels_last(trainers_layout, 32)  # as build_engines lays the backbone out

    classifier = ShardedInstanceClassifier(args.instances, cfg.model.dim, 0.1, chunk_size=args.chunk)
    engines = build_engines(cfg, InstanceEncoder(cfg.model, 32), classifier, steps_per_epoch=100, world_size=world)
    _time_phases(clock, engines)

    def with_classifier(smoothing_k=0, smoothing_eps=0.0):
        ids = torch.randint(0, args.instances, (args.batch,), generator=gen)
        train_step(engines, images, ids, smoothing_k, smoothing_eps)
        optimizer_step(engines)

    def backbone_only():
        backbone_only_step(engines, images)

    steps = [("encoder alone", encoder_alone), (LAYOUT_ROW, encoder_alone_step(trainers_layout)),
             ("backbone engine only", backbone_only),
             ("with classifier", with_classifier)]
    if args.smoothing_k:  # what hard-label smoothing adds: the top-K search and its sparse targets
        steps.append((f"with classifier, smoothing K={args.smoothing_k} eps={args.smoothing_eps}",
                      lambda: with_classifier(args.smoothing_k, args.smoothing_eps)))
    if args.end_to_end:
        fed = _data_path_step(args, cfg, engines, rank, world, clock)
        flat = engines.flat_grads
        if flat is not None and world > 1:  # the same step with the gradients averaged the other ways
            other_ways = [(flat.PROCESS_GROUP, GLOO_ROW)]
            if flat.watchdog is not None:  # DeepSpeed's shared-memory all-reduce is set up
                other_ways.insert(0, (flat.DEEPSPEED_SHM, DEEPSPEED_ROW))
            for mode, row in other_ways:
                if mode != flat.mode:
                    steps.append((row, _averaged_through(flat, mode, fed)))
        steps.append((FED_ROW, fed))
    if args.profile:
        _profile(rank, dict([steps[0], steps[-1]]), out)
        dist.destroy_process_group()
        return
    results = {}
    for _ in range(2):  # warm-up
        for _, step in steps:
            step()
    for _ in range(args.steps):  # interleaved step by step: machine drift hits every row alike
        for name, step in steps:
            dist.barrier()
            t0 = time.perf_counter()
            with clock.timing(name):
                step()
            results.setdefault(name, []).append(time.perf_counter() - t0)
    every_rank = [None] * world
    dist.all_gather_object(every_rank, results)
    phases = [None] * world
    dist.all_gather_object(phases, clock.rows)
    if rank == 0:  # the rows are rank 0's times, and one row from every rank's:
        # a synchronised step waits for the slower rank; the encoder alone does not. Its per-step maximum
        # over the ranks is the fastest any data-parallel step of these processes could be.
        slower = [max(times) for times in zip(*(r["encoder alone"] for r in every_rank))]
        alone = {"encoder alone": results.pop("encoder alone"), SLOWER_ROW: slower}
        mode = engines.flat_grads.mode if engines.flat_grads is not None else None
        torch.save({"rows": {**alone, **results}, "phases": phases, "average": mode if world > 1 else None}, out)
    dist.destroy_process_group()


FED_ROW = "with classifier + data path (CIFAR-10 in memory, device views)"
SLOWER_ROW = "encoder alone, the slower rank of each step"
LAYOUT_ROW = "encoder alone, the trainer's weight layout (plain for k x k kernels on 1x1 maps)"
GLOO_ROW = "with classifier + data path, gradients averaged through gloo's all-reduce"
DEEPSPEED_ROW = "with classifier + data path, gradients averaged through DeepSpeed's shared-memory all-reduce"


def _averaged_through(flat, mode: str, step):
    """``step`` with the backbone's gradients averaged through ``mode`` (a ``FlatGradients`` mode)."""
    def run():
        default, flat.mode = flat.mode, mode
        try:
            step()
        finally:
            flat.mode = default

    return run


def _data_path_step(args, cfg, engines, rank, world, clock: PhaseClock):
    """The trainer's step fed by its real data path: CIFAR-10 decoded into memory once, a batch of this
    rank's ids per step, batched crops and device views, as ``ifc_ds.trainer`` runs them."""
    from ifc_ds.augment import DeviceViews, train_crop
    from ifc_ds.crops import batch_crops
    from ifc_ds.data import InstanceBatchSampler, MapEpochs, load_dataset
    from ifc_ds.decoded import decode_into_memory

    loaded = load_dataset(f"parquet:{args.cifar}", limit=args.instances)
    decoded = decode_into_memory(loaded, (32, 32))
    crop = train_crop(cfg.augment, 32, cfg.seed)
    sampler = InstanceBatchSampler(loaded.num_instances, args.batch * world, rank, world, cfg.seed)
    epochs = MapEpochs(loaded, sampler, crop, 0, False, decoded)
    views = DeviceViews(cfg.augment, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), cfg.seed, engines.dtype())
    state = {"epoch": 0, "batches": epochs.batches(0, 0)}
    device = torch.device("cpu")

    def step():
        t0 = time.perf_counter()
        item = next(state["batches"], None)
        if item is None:
            state["epoch"] += 1
            state["batches"] = epochs.batches(state["epoch"], 0)
            item = next(state["batches"])
        _, _, batch = item
        images = views.train(batch_crops(batch, 32, device), batch["ids"], state["epoch"])
        clock.add(DATA, time.perf_counter() - t0)
        train_step(engines, images, batch["ids"], 0, 0.0)
        optimizer_step(engines)

    return step


def _profile(rank, steps, out):
    """Self CPU time per op over 6 steps of the encoder alone and 6 of the trainer step (``steps``:
    name -> step), profiled one after the other on every rank: the difference per op names what the
    trainer step spends beyond the encoder (a collective's self time includes the wait for the
    slower rank)."""
    from torch.profiler import ProfilerActivity, profile

    per_step = {}
    for name, step in steps.items():
        for _ in range(2):
            step()
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(6):
                step()
        per_step[name] = {e.key: (e.self_cpu_time_total / 6e3, e.count / 6) for e in prof.key_averages()}
    if rank == 0:
        torch.save(per_step, out)


def _print_profile(per_step: dict) -> None:
    (alone_name, alone), (step_name, trainer) = per_step.items()
    total_alone = sum(ms for ms, _ in alone.values())
    total = sum(ms for ms, _ in trainer.values())
    print(f"rank 0, self CPU ms per step: {alone_name} {total_alone:.0f} ms, {step_name} {total:.0f} ms; "
          f"the 20 ops whose time differs most:\n")
    print("| op | encoder alone ms/step | trainer step ms/step | difference | calls/step (trainer) |")
    print("|---|---|---|---|---|")
    keys = sorted(set(alone) | set(trainer),
                  key=lambda k: -abs(trainer.get(k, (0, 0))[0] - alone.get(k, (0, 0))[0]))
    for key in keys[:20]:
        a, t = alone.get(key, (0.0, 0))[0], trainer.get(key, (0.0, 0))
        print(f"| {key} | {a:.1f} | {t[0]:.1f} | {t[0] - a:+.1f} | {t[1]:g} |")


def train_command(args, out: str) -> tuple[list[str], dict[str, str]]:
    """``train.py`` on the CIFAR recipe with the benchmark's ranks, threads per rank, batch and N."""
    overrides = [f"data.train=parquet:{args.cifar}", f"data.limit={args.instances}", "eval.train=null",
                 f"train.batch_size={args.batch}", f"train.max_steps={args.e2e_steps}", "train.log_every=5",
                 "checkpoint.every_epochs=0", "log.progress=false", "hooks.raw_init.enabled=false",
                 f"output_dir={out}", f"model.name={args.model}"]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), str(REPO / "train.py"),
           "--config", str(REPO / "configs" / "cifar10.yaml"), *overrides]
    return cmd, dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")


def end_to_end(args) -> float:
    """Steady-state images/s per rank of ``train.py`` on CIFAR-10 (``--ranks`` ranks), from metrics.jsonl."""
    with tempfile.TemporaryDirectory() as out:
        cmd, env = train_command(args, out)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return logged_images_per_sec(out) / args.ranks


def logged_images_per_sec(out: str) -> float:
    """The median images/s (all ranks) that a run logged in ``out/metrics.jsonl``, past its start."""
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["images_per_sec"] for r in rows[2:])  # the first intervals include start-up and warm-up


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=128, help="per rank")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--steps", type=int, default=24, help="timed steps per row (interleaved)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="per rank, in every row and in train.py")
    parser.add_argument("--end-to-end", action="store_true", help="also run train.py on CIFAR-10")
    parser.add_argument("--cifar", default=str(REPO.parent / "shared" / "data" / "cifar10" / "train.parquet"))
    parser.add_argument("--e2e-steps", type=int, default=60)
    parser.add_argument("--profile", action="store_true", help="profile the trainer step instead")
    parser.add_argument("--smoothing-k", type=int, default=0,
                        help="also a row with hard-label smoothing over the top K negatives (the recipe: 5)")
    parser.add_argument("--smoothing-eps", type=float, default=0.1)
    args = parser.parse_args()
    e2e = end_to_end(args) if args.end_to_end and not args.profile else None
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.pt")
        mp.spawn(_worker, args=(args.ranks, free_port(), args, out), nprocs=args.ranks)
        saved = torch.load(out)
    if args.profile:
        _print_profile(saved)
        return
    results = saved["rows"]
    ranks, threads = f"{args.ranks} rank{'s' * (args.ranks != 1)}", f"{args.threads} thread{'s' * (args.threads != 1)}"
    print(f"{ranks} x {threads}, {args.model} 32x32, {args.batch} images/rank, "
          f"N={args.instances:,}, {args.steps} timed steps each, interleaved step by step (a round: one step of "
          f"every row)\n")
    base = statistics.median(results["with classifier"])
    alone = statistics.median(results["encoder alone"])
    print("| step | ms median (min-max) | images/s per rank | x with classifier |")
    print("|---|---|---|---|")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"| {name} | {med * 1e3:.0f} ({min(times) * 1e3:.0f}-{max(times) * 1e3:.0f}) | "
              f"{args.batch / med:.1f} | {med / base:.3f} |")
    if e2e is not None:
        print(f"| end to end: train.py, CIFAR-10 (median of its logged intervals, separate run) | "
              f"{args.batch / e2e * 1e3:.0f} | {e2e:.1f} | {args.batch / e2e / base:.3f} |")
        fed = results[FED_ROW]
        fed_median = statistics.median(fed)
        print("\n| fed step (with the data path) against | ratio of medians | median of per-round ratios | target |")
        print("|---|---|---|---|")
        for name, row, target in (("the trainer step on batches in memory", "with classifier", ">= 0.95"),
                                  ("the encoder step alone, channels-last weights (rank 0)", "encoder alone",
                                   ">= 0.85"),
                                  ("the encoder step alone on the slower rank of each step", SLOWER_ROW, ""),
                                  ("the encoder step alone, the trainer's weight layout (rank 0)", LAYOUT_ROW, "")):
            print(f"| {name} | {statistics.median(results[row]) / fed_median:.3f} | "
                  f"{_per_round(results[row], fed):.3f} | {target} |")
        # the ratio above divides by rank 0's encoder alone; where one core is slower than the other, the
        # fed step is bound by it, so each rank's own is shown too (the target stays on rank 0's)
        own = [1e-3 * _phase_medians(rank["encoder alone"])[TOTAL] / fed_median for rank in saved["phases"]]
        print("\nwith the data path / each rank's own encoder step alone (ratio of medians): "
              + ", ".join(f"rank {r} {ratio:.3f}" for r, ratio in enumerate(own))
              + f"; their mean {statistics.mean(own):.3f}")
        print(f"train.py end to end / trainer step on batches in memory: {e2e / (args.batch / base):.3f}; / encoder "
              f"alone: {e2e / (args.batch / alone):.3f}")
        _print_phases(saved["phases"])
        if saved["average"]:
            _print_averages(saved["phases"], saved["average"])


def _per_round(baseline: list[float], fed: list[float]) -> float:
    """images/s of the fed step over the baseline's, per round (the two steps ran seconds apart), median
    over the rounds. The host's speed drifts within a run here (in one run of 24 rounds the encoder
    alone, the same code every round, took 560-690 ms for 15 rounds, then 430-500 ms): a ratio of two
    medians can compare steps of different speeds, a ratio within a round does not."""
    return statistics.median(b / f for b, f in zip(baseline, fed))


def _phase_medians(steps: list[dict]) -> dict[str, float]:
    """Median ms per phase over the steps; "the rest" is the step's time outside every named phase."""
    steps = [{**step, REST: step[TOTAL] - sum(v for k, v in step.items() if k not in (TOTAL, REST))} for step in steps]
    return {phase: 1e3 * statistics.median(step.get(phase, 0.0) for step in steps) for phase in PHASES}


def _print_averages(phases: list[dict], trainers: str) -> None:
    """The backbone's gradient average, each way it ran, from the same
    interleaved steps (``trainers``: the ``FlatGradients`` mode of the trainer's own, the fed step's)."""
    ways = [(FED_ROW, f"{trainers} (the trainer's)"), (DEEPSPEED_ROW, "DeepSpeed's shared-memory all-reduce"),
            (GLOO_ROW, "gloo's all-reduce")]
    parts = []
    for row, name in ways:
        if all(rank.get(row) for rank in phases):
            medians = [_phase_medians(rank[row]) for rank in phases]
            ms = statistics.mean(m[ALL_REDUCE] for m in medians)
            parts.append(f"{name} {ms:.1f} ms")
    print("\nthe backbone's gradient average + divide per step (median, mean of ranks): " + "; ".join(parts))


def _print_phases(phases: list[dict]) -> None:
    """The fed step against the encoder alone and against the same step on batches in memory, phase by
    phase, on every rank (wall clock, same run)."""
    alone = [_phase_medians(rank["encoder alone"]) for rank in phases]
    in_memory = [_phase_medians(rank["with classifier"]) for rank in phases]
    fed = [_phase_medians(rank[FED_ROW]) for rank in phases]
    ranks = range(len(phases))
    print("\nwall ms per phase, median over the timed steps, per rank (the fed step is the row above):\n")
    print("| phase | " + " | ".join(f"encoder alone, rank {r}" for r in ranks) + " | "
          + " | ".join(f"in memory, rank {r}" for r in ranks) + " | "
          + " | ".join(f"fed step, rank {r}" for r in ranks) + " | fed - alone, mean of ranks | "
          "fed - in memory, mean of ranks |")
    print("|---|" + "---|" * (3 * len(phases) + 2))
    for phase in PHASES:
        from_alone = statistics.mean(f[phase] - a[phase] for a, f in zip(alone, fed))
        from_memory = statistics.mean(f[phase] - m[phase] for m, f in zip(in_memory, fed))
        print(f"| {phase} | " + " | ".join(f"{a[phase]:.1f}" for a in alone) + " | "
              + " | ".join(f"{m[phase]:.1f}" for m in in_memory) + " | "
              + " | ".join(f"{f[phase]:.1f}" for f in fed) + f" | {from_alone:+.1f} | {from_memory:+.1f} |")


if __name__ == "__main__":
    main()
