"""Training views (SimCLR / PIC family) and the evaluation transform, with torchvision.transforms.v2.

    python -m ifc_ds.augment --data sklearn:digits --out views.png   # look at what the network sees
"""

from __future__ import annotations

import argparse

import torch
from torchvision.transforms import v2

from ifc_ds.config import AugmentConfig


def train_transform(cfg: AugmentConfig, size: int, mean, std) -> v2.Compose:
    """PIL image -> normalised float tensor [3, size, size], one random view."""
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=(cfg.scale_min, cfg.scale_max), antialias=True),
        v2.RandomHorizontalFlip(cfg.hflip_p),
        v2.RandomApply([v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter_p),
        v2.RandomGrayscale(cfg.grayscale_p),
    ]
    if cfg.blur_p > 0:
        kernel = max(3, (size // 10) | 1)  # ~10% of the image, odd
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, (cfg.blur_sigma_min, cfg.blur_sigma_max))],
                                    p=cfg.blur_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def eval_transform(size: int, mean, std, crop_pct: float = 0.875) -> v2.Compose:
    """Resize the short side to size / crop_pct, centre-crop size (crop_pct 1.0 for 32x32 data)."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(int(round(size / crop_pct)), antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def eval_crop_pct(cfg: AugmentConfig, size: int) -> float:
    """Small images are not cropped: at 32x32 a centre crop throws away a sixth of the object."""
    return 1.0 if size <= 64 else cfg.eval_crop_pct


def save_view_grid(dataset, transform, mean, std, path: str, num_images: int = 8, views: int = 6,
                   seed: int = 0) -> None:
    """Writes a PNG: one row per image, its ``views`` augmented views side by side."""
    from torchvision.utils import save_image

    from ifc_ds.data import decode_image

    torch.manual_seed(seed)
    table, column = dataset.table, dataset.image_column
    tiles = []
    for row in range(min(num_images, len(table))):
        image = decode_image(table[row][column])
        tiles += [transform(image) for _ in range(views)]
    grid = torch.stack(tiles) * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    save_image(grid.clamp(0, 1), path, nrow=views, padding=2)


def main(argv=None) -> None:
    from ifc_ds.config import load_config
    from ifc_ds.data import load_dataset
    from ifc_ds.model import data_config

    parser = argparse.ArgumentParser(description="Write a PNG grid of augmented training views.")
    parser.add_argument("--config", default=None)
    parser.add_argument("--data", default=None, help="dataset spec (default: the config's data.train)")
    parser.add_argument("--out", default="views.png")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--views", type=int, default=6)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    loaded = load_dataset(args.data or cfg.data.train, limit=args.images)
    mean, std = data_config(cfg.model.name)
    transform = train_transform(cfg.augment, cfg.data.image_size, mean, std)
    save_view_grid(loaded, transform, mean, std, args.out, args.images, args.views, cfg.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
