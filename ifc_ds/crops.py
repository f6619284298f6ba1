"""The geometric part of a view: decode, choose a crop box, crop and resize to uint8 ``[3, S, S]``.

This is all a training view costs the CPU (everything photometric runs batched on the device,
``ifc_ds.augment``). One crop function serves every path, so they give bitwise the same crops:

* on the fly, per sample in DataLoader workers: ``SampleCrop`` decodes one image (a JPEG larger than
  needed is decoded at a reduced size with PIL's ``draft``) and crops it;
* in memory, batched: images decoded once (``ifc_ds.decoded``) are cropped a batch at a time, on
  the device (``crop_resize`` on ``[B, 3, H, W]`` with per-sample boxes).

Crop and resize is torchvision's ``roi_align`` (bilinear, ``aligned=True``): with an adaptive
sampling ratio it averages ``ceil(box / S)`` samples per output pixel and axis, so a downscale is
antialiased, and it handles a batch of different boxes in one call. Boxes follow torchvision's
``RandomResizedCrop.get_params`` (integer boxes, 10 attempts, then a centre crop of the ratio's
bounds), with the random numbers of ``ifc_ds.keyed_random``.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ifc_ds.keyed_random import CROP, keyed_uniform

_ATTEMPTS = 10  # torchvision's RandomResizedCrop


def random_resized_boxes(uniform: np.ndarray, heights, widths, scale: tuple[float, float],
                         ratio: tuple[float, float]) -> np.ndarray:
    """``[B, 4]`` boxes ``(x0, y0, x1, y1)`` in pixels, as ``RandomResizedCrop.get_params`` draws them.
    ``uniform``: ``[B, 4 * 10]`` numbers in ``[0, 1)``; ``heights`` / ``widths``: ``[B]`` image sizes."""
    height = np.asarray(heights, dtype=np.float64).reshape(-1, 1)
    width = np.asarray(widths, dtype=np.float64).reshape(-1, 1)
    u = uniform.reshape(-1, 4, _ATTEMPTS)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    w = np.round(np.sqrt(area * aspect))
    h = np.round(np.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(axis=1)  # the first attempt that fits, as torchvision's loop takes it
    rows = np.arange(len(first))
    w, h = w[rows, first], h[rows, first]
    y0 = np.floor(u[rows, 2, first] * (height[:, 0] - h + 1))
    x0 = np.floor(u[rows, 3, first] * (width[:, 0] - w + 1))
    # no attempt fits: a centre crop, its aspect ratio clamped to the ratio's bounds
    fallback = ~fits.any(axis=1)
    if fallback.any():
        hh, ww = height[fallback, 0], width[fallback, 0]
        in_ratio = ww / hh
        fw = np.where(in_ratio < ratio[0], ww, np.where(in_ratio > ratio[1], np.round(hh * ratio[1]), ww))
        fh = np.where(in_ratio < ratio[0], np.round(ww / ratio[0]), hh)
        w[fallback], h[fallback] = fw, fh
        y0[fallback], x0[fallback] = np.floor((hh - fh) / 2), np.floor((ww - fw) / 2)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1)


def center_boxes(heights, widths, crop_pct: float) -> np.ndarray:
    """``[B, 4]`` centred square boxes of ``crop_pct`` of the short side: resizing the short side to
    ``S / crop_pct`` and centre-cropping ``S`` (the evaluation transform) takes the same pixels."""
    height = np.asarray(heights, dtype=np.float64).reshape(-1)
    width = np.asarray(widths, dtype=np.float64).reshape(-1)
    side = np.minimum(height, width) * crop_pct
    x0, y0 = (width - side) / 2, (height - side) / 2
    return np.stack([x0, y0, x0 + side, y0 + side], axis=1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``images [B, 3, H, W]``, float ``boxes [B, 4]`` (pixels) -> uint8 ``[B, 3, size, size]``,
    on the images' device."""
    from torchvision.ops import roi_align

    rois = torch.cat([torch.arange(len(boxes), device=images.device, dtype=torch.float32)[:, None],
                      boxes.to(images.device, torch.float32)], dim=1)
    out = roi_align(images.float(), rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1,
                    aligned=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------- per sample, on the CPU
def open_image(cell) -> Image.Image:
    """An HF ``Image(decode=False)`` cell (``{"bytes", "path"}``) -> a PIL image, not decoded yet."""
    if cell is None:
        raise ValueError("empty image cell")
    data, path = cell.get("bytes"), cell.get("path")
    return Image.open(io.BytesIO(data)) if data else Image.open(path)


def decode_image(cell) -> Image.Image:
    """An HF ``Image(decode=False)`` cell -> RGB PIL image, fully decoded; raises on bad data."""
    img = open_image(cell)
    img.load()  # force full decoding now: truncated files fail here, not inside a transform
    return img.convert("RGB")


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 ``[3, H, W]``."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


@dataclass
class RawJpeg:
    """A JPEG left undecoded for the device (``SampleCrop(raw_jpeg=True)``): its bytes and crop box."""

    data: torch.Tensor  # uint8 [num bytes]
    box: torch.Tensor  # float [4], in the pixels of the full-size image
    size: int


_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class SampleCrop:
    """One sample's geometric view on the CPU: ``(image cell, instance id) -> uint8 [3, size, size]``.

    ``train=True``: a random resized crop drawn from ``(seed, epoch, id)`` (set ``epoch`` before each
    epoch's DataLoader is made); ``train=False``: the evaluation centre crop. ``draft``: decode a JPEG
    at the smallest power-of-two reduction that still gives the crop ``size`` pixels (PIL's ``draft``,
    which skips most of the IDCT work)."""

    size: int
    train: bool = True
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_pct: float = 1.0
    seed: int = 0
    epoch: int = 0
    draft: bool = True
    raw_jpeg: bool = False  # leave JPEGs (from bytes) undecoded for the device: only the header is read

    def boxes(self, ids, heights, widths) -> np.ndarray:
        if not self.train:
            return center_boxes(heights, widths, self.crop_pct)
        uniform = keyed_uniform(self.seed, self.epoch, ids, CROP, 4 * _ATTEMPTS)
        return random_resized_boxes(uniform, heights, widths, self.scale, self.ratio)

    def __call__(self, cell, instance_id: int) -> torch.Tensor | RawJpeg:
        img = open_image(cell)
        width, height = img.size
        box = self.boxes([instance_id], [height], [width])[0]
        data = (cell or {}).get("bytes")
        if self.raw_jpeg and data and data[:3] == _JPEG_MAGIC:
            return RawJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.from_numpy(box).float(),
                           self.size)
        if self.draft and img.format == "JPEG":
            # the box must keep >= size pixels per side after the reduction
            need = (math.ceil(width * self.size / max(box[2] - box[0], 1)),
                    math.ceil(height * self.size / max(box[3] - box[1], 1)))
            if need[0] < width and need[1] < height:
                img.draft("RGB", need)
        img.load()
        img = img.convert("RGB")
        if img.size != (width, height):  # decoded at a reduced size: the same box, in its pixels
            box = box * np.array([img.size[0] / width, img.size[1] / height] * 2)
        return crop_resize(to_uint8_tensor(img)[None], torch.from_numpy(box[None]), self.size)[0]


def batch_crops(batch: dict, size: int, device) -> torch.Tensor:
    """uint8 ``[B, 3, size, size]`` on ``device`` from a collated batch of any of the three forms:
    crops made by the workers; whole images with ``boxes`` (decoded in memory); JPEG bytes with their
    boxes (``jpeg``), decoded here on the device (``torchvision.io.decode_jpeg``: nvJPEG on CUDA)."""
    images = batch["images"].to(device, non_blocking=True)
    if batch.get("boxes") is not None:
        images = crop_resize(images, batch["boxes"], size)
    jpeg = batch.get("jpeg")
    if jpeg:
        decoded = decode_jpegs(jpeg["data"], device)
        crops = [crop_resize(image[None], box[None], size)[0] for image, box in zip(decoded, jpeg["boxes"])]
        images[jpeg["index"].to(device)] = torch.stack(crops)
    return images


def decode_jpegs(data: list[torch.Tensor], device) -> list[torch.Tensor]:
    """A batch of JPEG byte tensors -> RGB uint8 ``[3, H, W]`` tensors on ``device`` (one nvJPEG call on
    CUDA). TorchCodec when installed (``pip install ifc_ds[decode]``), else torchvision.io, whose image
    decoders TorchCodec supersedes (deprecated since torchvision 0.29)."""
    try:
        from torchcodec.decoders import decode_jpeg

        return decode_jpeg(list(data), mode="RGB", device=device)
    except ImportError:
        import warnings

        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device)
