"""One accelerator: the trainer's step on tensors already in memory against the same step fed by the
whole data path, ResNet-50 at 224 px with ``ds_configs/zero2_bf16.json`` on a JPEG dataset this script
makes; the classifier's share of the step; peak device memory.

    python benchmarks/gpu_train.py --images 16384       # on a GPU: all spare cores as workers
    python benchmarks/gpu_train.py --device cpu --model resnet18 --size 64 --images 128 --batch 16 --steps 3

Rows (each measured in this run with the device synchronised; each printed as soon as it is measured,
a failing row printed as ``failed`` without stopping the others):
* step on tensors in memory: ``train_step`` + ``optimizer_step`` on a fixed normalised batch (the limit);
* backbone only: the same engine with a trivial loss (so 1 - backbone / step is the classifier's share);
* end to end, CPU decode: DataLoader workers decode + crop (``SampleCrop``), the device does the rest;
* end to end, device decode: the workers pass JPEG bytes, the device decodes them (nvJPEG).
The rows on tensors in memory are medians over ``--steps`` steps after 3 warm-up steps. The fed rows
skip 2 x workers steps first (the first rounds of every worker, and what the loader decoded ahead while
the device warmed up), then time max(--steps, 2 x workers) steps as one interval (batches arrive in
bursts of one per worker: a median would hide the waits); the dataset is made large enough that these
steps fit one epoch (``--images`` is raised if needed).

The classifier's operands: the trainer passes ``features.detach().float()`` to a classifier engine that
DeepSpeed keeps in fp32 (no bf16 section), so under bf16 ZeRO the backbone runs in bf16 but the
classifier's GEMMs take fp32 operands (the fused kernels with IEEE fp32 dots, no TF32): compare its
share with benchmarks/classifier.py's fp32 rows, not its ``--bf16`` rows.

The JPEGs: 320x256 px, quality 90, smooth content (16x12 random pixels upsampled bicubically), about
15 KB each: smaller and cheaper to decode than a typical ImageNet photo (~500x375 px, ~110 KB), so the
CPU-decode row is an upper bound for ImageNet's decode throughput.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import traceback
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PREFETCH_FACTOR = 4  # ifc_ds.data.batches.make_loader's, per worker


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _jpeg(seed: int) -> bytes:
    """A 320x256 JPEG (quality 90) of smooth content, about 15 KB (a typical ImageNet JPEG is ~110 KB)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((320, 256), Image.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_dataset(folder: Path, images: int, files: int = 4) -> tuple[str, float]:
    """Parquet files of ``images`` generated JPEGs; returns their spec and the mean JPEG size in bytes."""
    import datasets

    with Pool(max(1, min(16, _cores()))) as pool:
        encoded = pool.map(_jpeg, range(images), chunksize=64)
    features = datasets.Features({"image": datasets.Image()})
    per_file = -(-images // files)
    for f in range(files):
        part = encoded[f * per_file:(f + 1) * per_file]
        datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in part]},
                                   features=features).to_parquet(str(folder / f"part-{f}.parquet"))
    return f"parquet:{folder}/*.parquet", sum(map(len, encoded)) / max(1, len(encoded))


def fed_step(epochs, views, engines, size: int, dev):
    """One trainer step fed by ``epochs`` (a MapEpochs), epoch after epoch, as the trainer runs it;
    and a function that stops its DataLoader."""
    from ifc_ds.crops import batch_crops
    from ifc_ds.engine import optimizer_step, train_step

    state = {"epoch": 0, "it": epochs.batches(0, 0)}

    def step():
        item = next(state["it"], None)
        if item is None:
            state["epoch"] += 1
            state["it"] = epochs.batches(state["epoch"], 0)
            item = next(state["it"])
        _, _, batch = item
        images = views.train(batch_crops(batch, size, dev), batch["ids"], state["epoch"])
        train_step(engines, images, batch["ids"].to(dev), 0, 0.0)
        optimizer_step(engines)

    def close():
        state["it"].close()  # the DataLoader iterator goes with the generator: its workers exit

    return step, close


def timed(step, steps: int, sync, warmup: int = 3, interval: bool = False) -> float:
    """Seconds per call: after ``warmup`` calls, the median over ``steps`` timed calls, or with
    ``interval`` the mean over them (one interval: throughput, which bursty arrivals need)."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return (time.perf_counter() - start) / steps if interval else statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=16384,
                        help="JPEGs to make; raised to what the fed rows' warm-up + timed steps need in one epoch")
    parser.add_argument("--instances", type=int, default=0,
                        help="classifier rows N (default: --images); e.g. 1281167 for ImageNet's scale")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=max(0, _cores() - 1),
                        help="DataLoader workers of the fed rows (default: every core this process may use but one)")
    parser.add_argument("--fused", choices=("auto", "never"), default="auto",
                        help="the classifier's fused Triton kernels: auto (on CUDA with triton) or never (block loops)")
    parser.add_argument("--ds-config", default="ds_configs/zero2_bf16.json")
    args = parser.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    fed_warmup = max(3, 2 * args.workers)
    fed_steps = max(args.steps, 2 * args.workers)
    need = args.batch * (fed_warmup + fed_steps + 2)  # one epoch: no DataLoader restart in the timed steps
    if args.images < need:
        print(f"warning: --images {args.images:,} is fewer than the fed rows need in one epoch "
              f"({fed_warmup} warm-up + {fed_steps} timed steps of {args.batch}): making {need:,}", flush=True)
        args.images = need

    from ifc_ds.augment import DeviceViews, train_crop
    from ifc_ds.classifier import ShardedInstanceClassifier, _use_fused
    from ifc_ds.config import load_config
    from ifc_ds.data import InstanceBatchSampler, MapEpochs, load_dataset
    from ifc_ds.dist import init_distributed
    from ifc_ds.engine import backbone_only_step, build_engines, optimizer_step, train_step
    from ifc_ds.model import InstanceEncoder, data_config

    init_distributed(600)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.cuda.set_device(0)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def peak_gib():
        return torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        spec, jpeg_bytes = make_dataset(Path(tmp), args.images)
        made = time.perf_counter() - t0
        loaded = load_dataset(spec)
        cfg = load_config(None, [f"model.name={args.model}", f"train.batch_size={args.batch}",
                                 f"train.ds_config={args.ds_config}", f"data.image_size={args.size}",
                                 "augment.blur_p=0.5", f"classifier.fused={args.fused}"])
        encoder = InstanceEncoder(cfg.model, args.size)
        num_rows = max(args.instances, loaded.num_instances)  # the fed rows' ids are the first --images
        classifier = ShardedInstanceClassifier(num_rows, cfg.model.dim, 0.1, fused=args.fused).to(dev)
        engines = build_engines(cfg, encoder, classifier, steps_per_epoch=100, world_size=1)
        mean, std = data_config(args.model)
        views = DeviceViews(cfg.augment, args.size, mean, std, 0, engines.dtype(), True)
        gen = torch.Generator().manual_seed(0)
        fixed = torch.randn(args.batch, 3, args.size, args.size).to(dev, engines.dtype())
        fixed = fixed.contiguous(memory_format=torch.channels_last)
        path = "fused Triton kernels" if _use_fused(args.fused, dev, cfg.model.dim) else "block loops"

        print(f"{torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'CPU'}, {args.model} {args.size} px, "
              f"batch {args.batch}, {args.ds_config} (backbone {engines.dtype()}), {args.images:,} JPEGs of "
              f"320x256 px, {jpeg_bytes / 1024:.1f} KB on average (made in {made:.0f} s), classifier N={num_rows:,} "
              f"D={cfg.model.dim} with fp32 operands (the trainer's features.detach().float()), fused={args.fused} "
              f"-> {path}; {args.workers} workers x prefetch {PREFETCH_FACTOR}; in memory: median of {args.steps} "
              f"steps after 3; fed: mean of {fed_steps} steps after {fed_warmup}\n", flush=True)
        print("| row | ms/step | images/s | x step in memory | peak memory GiB |\n|---|---|---|---|---|", flush=True)
        rows = {}

        def measure(name, run):
            try:
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                rows[name] = seconds = run()
                limit = rows.get("step on tensors in memory", float("nan"))
                print(f"| {name} | {seconds * 1e3:.1f} | {args.batch / seconds:,.0f} | {limit / seconds:.3f} | "
                      f"{peak_gib():.2f} |", flush=True)
            except Exception as exc:  # one row's failure (nvJPEG, a DataLoader timeout, OOM) loses only that row
                traceback.print_exc()
                first = (str(exc).splitlines() or [""])[0][:300]
                print(f"| {name} | failed: {type(exc).__name__}: {first} |", flush=True)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()

        def step_in_memory():
            ids = torch.randint(0, num_rows, (args.batch,), generator=gen).to(dev)
            train_step(engines, fixed, ids, 0, 0.0)
            optimizer_step(engines)

        measure("step on tensors in memory", lambda: timed(step_in_memory, args.steps, sync))
        measure("backbone only", lambda: timed(lambda: backbone_only_step(engines, fixed), args.steps, sync))

        for name, raw in (("end to end, CPU decode (workers)", False), ("end to end, device decode", True)):
            if raw and dev.type != "cuda":
                continue

            def fed(raw=raw):
                crop = train_crop(cfg.augment, args.size, 0, raw_jpeg=raw)
                sampler = InstanceBatchSampler(loaded.num_instances, args.batch, 0, 1, 0)
                epochs = MapEpochs(loaded, sampler, crop, args.workers, dev.type == "cuda", None, 600)
                step, close = fed_step(epochs, views, engines, args.size, dev)
                try:
                    return timed(step, fed_steps, sync, warmup=fed_warmup, interval=True)
                finally:
                    close()

            measure(name, fed)

    if "step on tensors in memory" in rows and "backbone only" in rows:
        share = 1 - rows["backbone only"] / rows["step on tensors in memory"]
        print(f"\nclassifier's share of the step (1 - backbone only / step): {share:.1%}")


if __name__ == "__main__":
    main()
