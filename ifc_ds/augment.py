"""Training and evaluation views on the device: batched, with per-sample random parameters.

The CPU only decodes and crops (``ifc_ds.crops``); a batch arrives as uint8 ``[B, 3, S, S]`` (or, for
a dataset decoded in memory, as whole images plus their crop boxes) and everything else runs here,
on the engine's device, for the whole batch at once::

    crop + resize (in-memory data) -> horizontal flip -> colour jitter (brightness, contrast,
    saturation, hue in a random order per sample) -> grayscale -> Gaussian blur -> normalise
    -> the engine's dtype, channels-last

Each op is written as torchvision.transforms.v2.functional defines it, with a ``[B]`` tensor of
factors instead of one scalar; the parameters of sample ``i`` come from ``(seed, epoch, id_i)``
(``ifc_ds.keyed_random``), so they are independent across the batch and a view never depends on the
rank, worker or batch it landed in. Hand-written rather than ``kornia.augmentation``: kornia defines
brightness additively and jitters in one order per batch, and the small ops below measured faster
on this CPU (``benchmarks/data_path.py`` times both in one run).

    python -m ifc_ds.augment --data sklearn:digits --out views.png   # look at what the network sees
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ifc_ds.config import AugmentConfig
from ifc_ds.crops import SampleCrop, crop_resize
from ifc_ds.keyed_random import BLUR, FLIP, GRAYSCALE, JITTER, keyed_uniform
from ifc_ds.lifecycle import bad_input_exits

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)
_SMALLEST_FLOAT = torch.finfo(torch.float32).smallest_normal * 2.0 ** -23  # the smallest positive float32
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


# --------------------------------------------------------------------------- batched functional ops
# x: float [B, 3, H, W] in [0, 1]; factors: [B] tensors on x's device
def _per_sample(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    ratio = _per_sample(ratio)
    return (x * ratio + other * (1.0 - ratio)).clamp_(0.0, 1.0)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, 1, H, W]`` luma."""
    r, g, b = x.unbind(dim=1)
    return (r * _GRAY_WEIGHTS[0] + g * _GRAY_WEIGHTS[1] + b * _GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotates the hue by ``factor`` turns (in ``[-0.5, 0.5]``) through HSV, as torchvision does.

    Written in float arithmetic only: on the CPU a comparison, ``where`` or ``remainder`` costs 5-20
    times an add on the same tensor, and this op ran two to three times slower with them. Each branch-free
    form below gives bitwise what the branch gives, for finite values in ``[0, 1]``: a 0.0 / 1.0
    selector ``s`` picks ``a * s + b * (1 - s)`` (``a + 0`` is ``a``), and ``k - floor(k)`` is
    ``remainder(k, 1)`` (fmod is exact, and so is the subtraction of a whole turn)."""
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    spread = maxc - minc
    colored = torch.sign(spread)
    gray = 1.0 - colored
    saturation = spread / maxc.clamp_min(_SMALLEST_FLOAT)  # black: 0 / tiny = 0
    inv = (spread + gray).reciprocal_()  # 1 / spread, and 1 for grays
    # hue in sixths of a turn from whichever channel is the maximum, r before g before b (zero for grays)
    not_red_max, not_green_max = torch.sign(maxc - r), torch.sign(maxc - g)  # 0.0 where r (g) is the maximum
    red_max, green_max = 1.0 - not_red_max, 1.0 - not_green_max
    from_red = (g - b).mul_(inv)
    from_green = (b - r).mul_(inv).add_(2.0)
    from_blue = (r - g).mul_(inv).add_(4.0)
    hue = from_green.mul_(green_max).add_(from_blue.mul_(not_green_max))
    hue = from_red.mul_(red_max).add_(hue.mul_(not_red_max))
    hue.mul_(colored).div_(6.0)
    hue.sub_(hue.floor())  # remainder 1 (hue was in [-1/6, 5/6])
    hue.add_(factor.view(-1, 1, 1))
    hue.sub_(hue.floor())  # remainder 1 (hue was in [-1/2, 3/2))
    h6 = hue.mul_(6.0)
    # HSV -> RGB without branches: channel n (5, 3, 1 for r, g, b) is v - v s clamp(min(k, 4 - k), 0, 1)
    # with k = (n + 6 h) mod 6, the same function as torchvision's sector table
    chroma = maxc * saturation
    out = torch.empty_like(x)
    for channel, n in enumerate((5.0, 3.0, 1.0)):
        k = h6 + n
        k.sub_(torch.div(k, 6.0).floor_().mul_(6.0))  # remainder 6 (k was in [1, 11))
        torch.minimum(k, 4.0 - k, out=k).clamp_(0.0, 1.0).mul_(chroma)
        torch.sub(maxc, k, out=out[:, channel])
    return out


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample ``sigma [B]``, one odd ``kernel_size``, reflect padding (torchvision's kernel)."""
    batch, channels, height, width = x.shape
    half = (kernel_size - 1) / 2
    grid = torch.linspace(-half, half, kernel_size, device=x.device)
    kernel = torch.exp(-0.5 * (grid[None, :] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # [B*C, k]
    pad = kernel_size // 2
    flat = x.reshape(1, batch * channels, height, width)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=batch * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernel[:, None, :, None], groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


_JITTER_OPS = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast, SATURATION: adjust_saturation,
               HUE: adjust_hue}


def blur_kernel_size(size: int) -> int:
    """~10% of the image, odd, at least 3 (SimCLR's 23 at 224 px)."""
    return max(3, (size // 10) | 1)


# --------------------------------------------------------------------------- per-sample parameters
@dataclass
class ViewParams:
    """Per-sample photometric parameters of a batch (CPU tensors, ``[B]`` unless noted)."""

    flip: torch.Tensor  # bool
    jitter: torch.Tensor  # bool: colour jitter applied
    factors: torch.Tensor  # [B, 4] float: brightness, contrast, saturation, hue
    order: torch.Tensor  # [B, 4] int: the jitter ops in the order they are applied
    gray: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor  # float


def sample_params(cfg: AugmentConfig, seed: int, epoch: int, ids) -> ViewParams:
    """The random choices of ``RandomHorizontalFlip``, ``RandomApply(ColorJitter)``,
    ``RandomGrayscale`` and ``RandomApply(GaussianBlur)``, drawn per sample from ``(seed, epoch, id)``."""
    ids = np.asarray(ids, dtype=np.int64)
    flip = keyed_uniform(seed, epoch, ids, FLIP, 1)[:, 0] < cfg.hflip_p
    u = keyed_uniform(seed, epoch, ids, JITTER, 9)
    jitter = u[:, 0] < cfg.jitter_p
    lows = np.array([max(0.0, 1 - cfg.brightness), max(0.0, 1 - cfg.contrast), max(0.0, 1 - cfg.saturation),
                     -cfg.hue])
    highs = np.array([1 + cfg.brightness, 1 + cfg.contrast, 1 + cfg.saturation, cfg.hue])
    factors = lows + (highs - lows) * u[:, 1:5]
    order = np.argsort(u[:, 5:9], axis=1, kind="stable")  # a uniformly random permutation per sample
    gray = keyed_uniform(seed, epoch, ids, GRAYSCALE, 1)[:, 0] < cfg.grayscale_p
    b = keyed_uniform(seed, epoch, ids, BLUR, 2)
    blur = b[:, 0] < cfg.blur_p
    sigma = cfg.blur_sigma_min + (cfg.blur_sigma_max - cfg.blur_sigma_min) * b[:, 1]
    return ViewParams(torch.from_numpy(flip), torch.from_numpy(jitter), torch.from_numpy(factors).float(),
                      torch.from_numpy(order), torch.from_numpy(gray), torch.from_numpy(blur),
                      torch.from_numpy(sigma).float())


def jitter_ops(cfg: AugmentConfig) -> list[int]:
    """The jitter ops the config enables (a zero range is no op at all, as ColorJitter's None)."""
    ranges = {BRIGHTNESS: cfg.brightness, CONTRAST: cfg.contrast, SATURATION: cfg.saturation, HUE: cfg.hue}
    return [op for op, r in ranges.items() if r > 0]


def _rows(flags: torch.Tensor, device) -> torch.Tensor:
    return flags.nonzero().flatten().to(device)


def photometric(x: torch.Tensor, params: ViewParams, cfg: AugmentConfig) -> torch.Tensor:
    """Flip, colour jitter, grayscale and blur of float ``x [B, 3, H, W]`` in ``[0, 1]``, per sample, in
    place.

    Each op touches only the samples it applies to (gather, op, write back), so a sample an op does not
    apply to is left bitwise unchanged. The jitter runs slot by slot, and in slot s every sample gets
    the op its own order puts there: the jittered samples are gathered once per slot, grouped by that
    slot's op, and each op runs on its contiguous group (one gather per slot, where a gather and a
    scatter per op and slot took longer). Rows move with ``index_select`` / ``index_copy_``: on the
    CPU advanced indexing (``x[rows]``) took three times as long."""
    dev = x.device
    flip = _rows(params.flip, dev)
    if len(flip):
        x.index_copy_(0, flip, x.index_select(0, flip).flip(-1))
    enabled = jitter_ops(cfg)
    if enabled and params.jitter.any():
        held = params.jitter.nonzero().flatten()  # held[i]: the sample in row i of y
        factors, order = params.factors[held], params.order[held]
        y = x
        for slot in range(4):
            group = torch.argsort(order[:, slot], stable=True)
            counts = torch.bincount(order[:, slot], minlength=4).tolist()
            held, factors, order = held[group], factors[group], order[group]
            y = x.index_select(0, held.to(dev)) if slot == 0 else y.index_select(0, group.to(dev))
            start = 0
            for op, count in enumerate(counts):
                if count and op in enabled:
                    part = slice(start, start + count)
                    y[part] = _JITTER_OPS[op](y[part], factors[part, op].to(dev))
                start += count
        x.index_copy_(0, held.to(dev), y)
    gray = _rows(params.gray, dev)
    if len(gray):
        x.index_copy_(0, gray, grayscale(x.index_select(0, gray)).expand(-1, 3, -1, -1))
    blur = _rows(params.blur, dev)
    if len(blur):
        sigma = params.sigma[blur.cpu()].to(dev)
        x.index_copy_(0, blur, gaussian_blur(x.index_select(0, blur), sigma, blur_kernel_size(x.shape[-1])))
    return x


# --------------------------------------------------------------------------- the device pipeline
class DeviceViews:
    """uint8 batches -> normalised network inputs on the device (train: random views; eval: as is).

    ``images``: uint8 ``[B, 3, h, w]`` already cropped to ``size``, or whole images with ``boxes [B, 4]``
    (data decoded in memory), cropped here in one batched call."""

    def __init__(self, cfg: AugmentConfig, size: int, mean, std, seed: int = 0, dtype=torch.float32,
                 channels_last: bool = True):
        self.cfg, self.size, self.seed, self.dtype, self.channels_last = cfg, size, seed, dtype, channels_last
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def _crop(self, images: torch.Tensor, boxes) -> torch.Tensor:
        return images if boxes is None else crop_resize(images, boxes, self.size)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """float ``[B, 3, S, S]`` in [0, 1] -> normalised (in place), in the engine's dtype and memory format."""
        x = x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.no_grad()
    def train(self, images: torch.Tensor, ids: torch.Tensor, epoch: int, boxes=None) -> torch.Tensor:
        x = self._crop(images, boxes).float().div_(255.0)
        x = photometric(x, sample_params(self.cfg, self.seed, epoch, ids.cpu().numpy()), self.cfg)
        return self.normalize(x)

    @torch.no_grad()
    def eval(self, images: torch.Tensor, boxes=None) -> torch.Tensor:
        return self.normalize(self._crop(images, boxes).float().div_(255.0))


def eval_crop_pct(cfg: AugmentConfig, size: int) -> float:
    """Small images are not cropped: at 32x32 a centre crop throws away a sixth of the object."""
    return 1.0 if size <= 64 else cfg.eval_crop_pct


def train_crop(cfg: AugmentConfig, size: int, seed: int, raw_jpeg: bool = False) -> SampleCrop:
    """The CPU half of a training view: decode + random resized crop to uint8."""
    return SampleCrop(size, train=True, scale=(cfg.scale_min, cfg.scale_max), seed=seed, draft=cfg.jpeg_draft,
                      raw_jpeg=raw_jpeg)


def eval_crop(cfg: AugmentConfig, size: int, raw_jpeg: bool = False) -> SampleCrop:
    """The CPU half of an evaluation view: decode + centre crop to uint8."""
    return SampleCrop(size, train=False, crop_pct=eval_crop_pct(cfg, size), draft=cfg.jpeg_draft, raw_jpeg=raw_jpeg)


# --------------------------------------------------------------------------- preview
def save_view_grid(loaded, cfg: AugmentConfig, size: int, mean, std, path: str, num_images: int = 8,
                   views: int = 6, seed: int = 0) -> None:
    """Writes a PNG: one row per image, ``views`` training views of it side by side (views of epochs
    0, 1, ... so each differs), made by the trainer's own CPU crop and device pipeline."""
    from torchvision.utils import save_image

    crop = train_crop(cfg, size, seed)
    pipeline = DeviceViews(cfg, size, mean, std, seed, channels_last=False)
    table, column = loaded.table, loaded.image_column
    tiles = []
    for row in range(min(num_images, len(table))):
        for epoch in range(views):
            crop.epoch = epoch
            image = crop(table[row][column], row)[None]
            tiles.append(pipeline.train(image, torch.tensor([row]), epoch)[0])
    grid = torch.stack(tiles) * pipeline.std + pipeline.mean
    save_image(grid.clamp(0, 1), path, nrow=views, padding=2)


@bad_input_exits
def main(argv=None) -> int:
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
    save_view_grid(loaded, cfg.augment, cfg.data.image_size, mean, std, args.out, args.images, args.views, cfg.seed)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

