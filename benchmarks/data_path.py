"""Per-core throughput of the data path, every row measured in this run on this machine (1 thread):

* before: PIL decode + per-sample torchvision.transforms.v2 views (the path ifc_ds had; kept here
  as the baseline);
* now: the CPU half (decode + random resized crop to uint8, ``ifc_ds.crops.SampleCrop``) and the
  device half (batched photometric ops, ``ifc_ds.augment.DeviceViews``; run on the CPU here), on
  the fly or from a dataset decoded once into memory;
* the photometric half alone, hand-written vs ``kornia.augmentation`` (same ops, batched);
* the training step alone on tensors in memory (encoder fwd + bwd + SGD, channels-last weights and
  inputs): the rate the data path has to keep up with.

At 32 px on CIFAR-10 (the parquet, PNG) and at 224 px on a JPEG dataset the script makes (the first
CIFAR images upscaled to 256 px, quality 90).

    python benchmarks/data_path.py --cifar ../shared/data/cifar10/train.parquet
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from ifc_ds.augment import DeviceViews, blur_kernel_size, train_crop  # noqa: E402
from ifc_ds.config import AugmentConfig, ModelConfig  # noqa: E402
from ifc_ds.crops import crop_resize, decode_image  # noqa: E402
from ifc_ds.data import load_dataset, memory_batches  # noqa: E402
from ifc_ds.decoded import decode_into_memory  # noqa: E402
from ifc_ds.dist import retain_freed_memory  # noqa: E402
from ifc_ds.model import InstanceEncoder  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def v2_views(cfg: AugmentConfig, size: int) -> v2.Compose:
    """The per-sample PIL + torchvision.transforms.v2 training view ifc_ds used before (the baseline)."""
    steps = [v2.ToImage(), v2.RandomResizedCrop(size, scale=(cfg.scale_min, cfg.scale_max), antialias=True),
             v2.RandomHorizontalFlip(cfg.hflip_p),
             v2.RandomApply([v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter_p),
             v2.RandomGrayscale(cfg.grayscale_p)]
    if cfg.blur_p > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), (cfg.blur_sigma_min,
                                                                               cfg.blur_sigma_max))], p=cfg.blur_p))
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def kornia_views(cfg: AugmentConfig):
    import kornia.augmentation as K

    ops = [K.RandomHorizontalFlip(p=cfg.hflip_p),
           K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.jitter_p),
           K.RandomGrayscale(p=cfg.grayscale_p)]
    if cfg.blur_p > 0:
        ops.append(K.RandomGaussianBlur((23, 23), (cfg.blur_sigma_min, cfg.blur_sigma_max), p=cfg.blur_p))
    ops.append(K.Normalize(torch.tensor(MEAN), torch.tensor(STD)))
    return K.AugmentationSequential(*ops)


def rate(fn, images: int, repeats: int = 3) -> float:
    """Images per second: the median of ``repeats`` timed runs of ``fn`` (which handles ``images``)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return images / statistics.median(times)


def batches_of(items, batch: int):
    return [items[i:i + batch] for i in range(0, len(items), batch)]


def measure(cells, size: int, cfg: AugmentConfig, batch: int, loaded=None, with_kornia=True,
            step_batch: int | None = None, step_repeats: int = 3) -> dict:
    """{row name: images/s} for one resolution."""
    n = len(cells)
    ids = np.arange(n)
    out = {}
    old = v2_views(cfg, size)
    out["before: PIL decode + per-sample v2 views"] = rate(lambda: [old(decode_image(c)) for c in cells], n)
    crop = train_crop(cfg, size, seed=0)
    no_draft = train_crop(cfg, size, seed=0)
    no_draft.draft = False
    views = DeviceViews(cfg, size, MEAN, STD)
    out["now, CPU half: decode + crop to uint8 (JPEG draft)"] = rate(lambda: [crop(c, i) for i, c in enumerate(cells)],
                                                                      n)
    if size > 64:
        out["now, CPU half without JPEG draft"] = rate(lambda: [no_draft(c, i) for i, c in enumerate(cells)], n)
    crops = torch.stack([crop(c, i) for i, c in enumerate(cells)])
    id_tensor = torch.from_numpy(ids)

    def device_half():
        for i in range(0, n, batch):
            views.train(crops[i:i + batch], id_tensor[i:i + batch], epoch=0)

    out["now, device half: batched photometric (on this CPU)"] = rate(device_half, n)

    def on_the_fly():
        for i in range(0, n, batch):
            part = torch.stack([crop(c, int(j)) for j, c in zip(ids[i:i + batch], cells[i:i + batch])])
            views.train(part, id_tensor[i:i + batch], epoch=0)

    out["now, on the fly: both halves"] = rate(on_the_fly, n)
    if loaded is not None:
        t0 = time.perf_counter()
        decoded = decode_into_memory(loaded, (size, size))
        out["now, in memory: decode once (per image, once per run)"] = n / (time.perf_counter() - t0)

        def in_memory():
            for b in memory_batches(decoded, batches_of(list(range(n)), batch), crop):
                views.train(crop_resize(b["images"], b["boxes"], size), b["ids"], epoch=0)

        out["now, in memory: batched crop + photometric, no decoding"] = rate(in_memory, n)
    if with_kornia:
        try:
            augment = kornia_views(cfg)
        except ImportError:
            print("(kornia not installed: pip install kornia for its row)")
        else:
            floats = crops.float() / 255

            def kornia_half():
                with torch.no_grad():
                    for i in range(0, n, batch):
                        augment(floats[i:i + batch])

            out["photometric alone: kornia.augmentation (same ops)"] = rate(kornia_half, n)
            out["photometric alone: hand-written (ifc_ds.augment)"] = out[
                "now, device half: batched photometric (on this CPU)"]
    out["training step alone (limit)"] = step_rate(size, step_batch or batch, step_repeats)
    return out


def step_rate(size: int, batch: int, repeats: int) -> float:
    """Encoder fwd + bwd + SGD on a batch already in memory, channels-last weights and inputs."""
    model = InstanceEncoder(ModelConfig(name="resnet18"), size).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)

    def step():
        loss = model(images).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return rate(step, batch, repeats)


def jpeg_cells(cells, side: int = 256, quality: int = 90) -> list[dict]:
    out = []
    for cell in cells:
        buf = io.BytesIO()
        decode_image(cell).resize((side, side), Image.BICUBIC).save(buf, format="JPEG", quality=quality)
        out.append({"bytes": buf.getvalue(), "path": None})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data"
                                               / "cifar10" / "train.parquet"))
    parser.add_argument("--images", type=int, default=2048, help="images per 32 px measurement")
    parser.add_argument("--images-224", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as init_distributed has every CPU rank do
    loaded = load_dataset(f"parquet:{args.cifar}", limit=args.images)
    cells = [loaded.table[i][loaded.image_column] for i in range(args.images)]
    print(f"{args.threads} thread(s), batch {args.batch}; CIFAR-10 from {args.cifar}\n")
    small = measure(cells, 32, AugmentConfig(), args.batch, loaded=loaded)
    big_cfg = AugmentConfig(blur_p=0.5)  # at 224 px the views blur half the images (SimCLR / ImageNet recipes)
    big = measure(jpeg_cells(cells[:args.images_224]), 224, big_cfg, 32, with_kornia=False, step_batch=32,
                  step_repeats=1)
    print("| what | 32 px, CIFAR-10 PNG: images/s | ms per image | 224 px, JPEG 256 px q90: images/s "
          "| ms per image |")
    print("|---|---|---|---|---|")
    for name in dict.fromkeys(list(small) + list(big)):
        cells_out = []
        for table in (small, big):
            value = table.get(name)
            cells_out += [f"{value:,.0f}", f"{1e3 / value:.3f}"] if value else ["", ""]
        print(f"| {name} | " + " | ".join(cells_out) + " |")
    old, new_cpu = "before: PIL decode + per-sample v2 views", "now, CPU half: decode + crop to uint8 (JPEG draft)"
    both, memory = "now, on the fly: both halves", "now, in memory: batched crop + photometric, no decoding"
    print("\nCPU time per training image, now / before:")
    print(f"- GPU runs (the photometric half runs on the device): 32 px {small[old] / small[new_cpu]:.2f}, "
          f"224 px {big[old] / big[new_cpu]:.2f}")
    print(f"- CPU-only runs (both halves on the CPU): 32 px on the fly {small[old] / small[both]:.2f}, in memory "
          f"{small[old] / small[memory]:.2f}; 224 px on the fly {big[old] / big[both]:.2f}")


if __name__ == "__main__":
    main()
