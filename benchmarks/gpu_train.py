"""One accelerator: the trainer's step on tensors already in memory against the same step fed by the
whole data path, ResNet-50 at 224 px with ``ds_configs/zero2_bf16.json`` on a JPEG dataset this script
makes; the classifier's share of the step; peak device memory.

    python benchmarks/gpu_train.py                      # on a GPU: 4,096 JPEGs, all spare cores as workers
    python benchmarks/gpu_train.py --device cpu --model resnet18 --size 64 --images 256 --batch 16 --steps 3

Rows (each measured in this run, after warm-up steps, with the device synchronised):
* step on tensors in memory: ``train_step`` + ``optimizer_step`` on a fixed normalised batch (the limit);
* backbone only: the same engine with a trivial loss (so 1 - backbone / step is the classifier's share);
* end to end, CPU decode: DataLoader workers decode + crop (``SampleCrop``), the device does the rest;
* end to end, device decode: the workers pass JPEG bytes, the device decodes them (nvJPEG).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _jpeg(seed: int) -> bytes:
    """A 320x256 JPEG (quality 90) with smooth content, about the size and entropy of a photo."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((320, 256), Image.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_dataset(folder: Path, images: int, files: int = 4) -> str:
    import datasets

    with Pool(min(16, os.cpu_count() or 1)) as pool:
        encoded = pool.map(_jpeg, range(images))
    features = datasets.Features({"image": datasets.Image()})
    per_file = -(-images // files)
    for f in range(files):
        part = encoded[f * per_file:(f + 1) * per_file]
        datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in part]},
                                   features=features).to_parquet(str(folder / f"part-{f}.parquet"))
    return f"parquet:{folder}/*.parquet"


def fed_step(epochs, views, engines, size: int, dev):
    """One trainer step fed by ``epochs`` (a MapEpochs), epoch after epoch, as the trainer runs it."""
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

    return step


def timed(step, steps: int, sync) -> float:
    """Median seconds per call over ``steps`` calls, after 3 warm-up calls."""
    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--instances", type=int, default=0,
                        help="classifier rows N (default: --images); e.g. 1281167 for ImageNet's scale")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=(os.cpu_count() or 2) - 1)
    parser.add_argument("--ds-config", default="ds_configs/zero2_bf16.json")
    args = parser.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from ifc_ds.augment import DeviceViews, train_crop
    from ifc_ds.classifier import ShardedInstanceClassifier
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

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        spec = make_dataset(Path(tmp), args.images)
        made = time.perf_counter() - t0
        loaded = load_dataset(spec)
        cfg = load_config(None, [f"model.name={args.model}", f"train.batch_size={args.batch}",
                                 f"train.ds_config={args.ds_config}", f"data.image_size={args.size}",
                                 "augment.blur_p=0.5"])
        encoder = InstanceEncoder(cfg.model, args.size)
        num_rows = max(args.instances, loaded.num_instances)  # the fed rows' ids are the first --images
        classifier = ShardedInstanceClassifier(num_rows, cfg.model.dim, 0.1).to(dev)
        engines = build_engines(cfg, encoder, classifier, steps_per_epoch=100, world_size=1)
        mean, std = data_config(args.model)
        views = DeviceViews(cfg.augment, args.size, mean, std, 0, engines.dtype(), True)
        gen = torch.Generator().manual_seed(0)
        fixed = torch.randn(args.batch, 3, args.size, args.size).to(dev, engines.dtype())
        fixed = fixed.contiguous(memory_format=torch.channels_last)

        def step_in_memory():
            ids = torch.randint(0, num_rows, (args.batch,), generator=gen).to(dev)
            train_step(engines, fixed, ids, 0, 0.0)
            optimizer_step(engines)

        def backbone_only():
            backbone_only_step(engines, fixed)

        rows, memory = {}, {}
        for name, step in (("step on tensors in memory", step_in_memory), ("backbone only", backbone_only)):
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            rows[name] = timed(step, args.steps, sync)
            memory[name] = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")

        for name, raw in (("end to end, CPU decode (workers)", False), ("end to end, device decode", True)):
            if raw and dev.type != "cuda":
                continue
            crop = train_crop(cfg.augment, args.size, 0, raw_jpeg=raw)
            sampler = InstanceBatchSampler(loaded.num_instances, args.batch, 0, 1, 0)
            epochs = MapEpochs(loaded, sampler, crop, args.workers, dev.type == "cuda", None, 600)
            step_fed = fed_step(epochs, views, engines, args.size, dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            rows[name] = timed(step_fed, args.steps, sync)
            memory[name] = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")

    limit = rows["step on tensors in memory"]
    print(f"{torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'CPU'}, {args.model} {args.size} px, "
          f"batch {args.batch}, {args.ds_config}, {args.images:,} JPEGs (made in {made:.0f} s), "
          f"classifier N={num_rows:,} ({classifier.fused} -> {'fused' if dev.type == 'cuda' else 'block loops'}), "
          f"{args.workers} workers, {args.steps} timed steps each\n")
    print("| row | ms/step | images/s | x step in memory | peak memory GiB |\n|---|---|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {args.batch / seconds:,.0f} | {limit / seconds:.3f} | "
              f"{memory[name]:.2f} |")
    share = 1 - rows["backbone only"] / limit
    print(f"\nclassifier's share of the step (1 - backbone only / step): {share:.1%}")


if __name__ == "__main__":
    main()
