"""timm backbone + projection head: images [B, 3, H, W] -> features [B, D]."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import timm
import torch
from torch import nn

from ifc_ds.config import ConfigError, ModelConfig


def adapt_stem_to_small_images(backbone: nn.Module) -> None:
    """ResNet stem for 32x32 inputs: a 3x3 stride-1 first conv and no max-pool (the stock 7x7/2 conv +
    pool reduce a 32x32 image to 8x8 before the first block)."""
    conv = getattr(backbone, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(backbone, "maxpool"):
        raise ConfigError(f"model.small_images=true supports timm ResNet-style models (conv1 + maxpool), "
                          f"not {type(backbone).__name__}")
    backbone.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
    backbone.maxpool = nn.Identity()


def create_backbone(cfg: ModelConfig, image_size: int | None = None) -> nn.Module:
    """``timm.create_model(name, num_classes=0)``: pooled features [B, backbone.num_features]."""
    if ":" not in cfg.name and not timm.is_model(cfg.name):  # (hf-hub: / local-dir: names are timm's to check)
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=3, cutoff=0.8)
        raise ConfigError(f"model.name={cfg.name!r} is not a timm model"
                          + (f"; did you mean {', '.join(close)}?" if close else " (timm.list_models() lists them)"))
    kwargs = dict(cfg.kwargs)
    if image_size is not None and _takes_img_size(cfg.name):
        kwargs.setdefault("img_size", image_size)
    try:
        backbone = timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as exc:  # a model.kwargs key the architecture does not take
        if "unexpected keyword argument" not in str(exc):
            raise
        raise ConfigError(f"model.kwargs={cfg.kwargs}: {cfg.name} does not take it ({exc})") from None
    if cfg.small_images:
        adapt_stem_to_small_images(backbone)
    return backbone


EXPORT_STEM_KEY = "ifc_ds_small_images"  # config.json field of an export whose backbone has the small-image stem


@dataclass(frozen=True)
class Export:
    """What an ``ifc-export`` folder's ``config.json`` says about its backbone."""

    folder: Path
    architecture: str
    model_args: dict  # timm's create_model arguments, less num_classes (the loader sets it)
    small_images: bool  # the small-image stem (``EXPORT_STEM_KEY``)
    input_size: int  # the side the backbone was trained and evaluated at

    @property
    def weights(self) -> Path:
        return self.folder / "model.safetensors"

    def model_config(self, base: ModelConfig) -> ModelConfig:
        """``base`` (head, dim, ...) with this export's backbone."""
        return replace(base, name=self.architecture, small_images=self.small_images, kwargs=dict(self.model_args))


def read_export(folder: str | Path) -> Export:
    """Parses ``<folder>/config.json`` of an ``ifc-export`` folder (the layout timm's ``save_for_hf`` writes)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    args = {k: v for k, v in config.get("model_args", {}).items() if k != "num_classes"}
    return Export(folder, config["architecture"], args, bool(config.get(EXPORT_STEM_KEY)),
                  int(config["pretrained_cfg"]["input_size"][-1]))


def load_exported(folder: str, **kwargs) -> nn.Module:
    """A backbone exported by ``ifc-export`` (``config.json`` + ``model.safetensors``), pooled features.

    Plain backbones load with timm alone: ``timm.create_model("local-dir:<folder>", pretrained=True,
    num_classes=0)``. The small-image stem is not a timm ResNet option (timm has no 3x3 stride-1 stem
    without max-pool), so timm cannot build it from ``model_args``; its config.json says so in
    ``EXPORT_STEM_KEY`` and this loader rebuilds the stem before loading the weights, from the folder alone."""
    from safetensors.torch import load_file

    export = read_export(folder)
    if not export.small_images:
        return timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0, **kwargs)
    backbone = timm.create_model(export.architecture, pretrained=False, num_classes=0,
                                 **{**export.model_args, **kwargs})
    adapt_stem_to_small_images(backbone)
    backbone.load_state_dict(load_file(export.weights))
    return backbone


def _takes_img_size(name: str) -> bool:
    """Models whose input size is fixed at construction (ViT-family patch grids, as timm's
    pretrained_cfg says) are built for the run's image size."""
    cfg = timm.models.get_pretrained_cfg(name)
    return bool(cfg is not None and cfg.fixed_input_size)


def data_config(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) as timm resolves them for the model name, pretrained tag included
    (``resnet18d.ra4_e3600_r224_in1k``), without building the model; ImageNet's for an unknown name."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD
    resolved = timm.data.resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    return tuple(resolved["mean"]), tuple(resolved["std"])


class ProjectionHead(nn.Sequential):
    """Linear-BN-ReLU-Linear: [B, in] -> [B, D]."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


class InstanceEncoder(nn.Module):
    """backbone (timm, pooled) + projection head. ``forward``: images [B, 3, H, W] -> [B, D];
    ``backbone_features``: the pooled backbone output [B, F] used for transfer evaluation."""

    def __init__(self, cfg: ModelConfig, image_size: int | None = None):
        super().__init__()
        self.backbone = create_backbone(cfg, image_size)
        self.head = ProjectionHead(self.backbone.num_features, cfg.head_hidden, cfg.dim)
        self.image_size = image_size
        # The inputs go channels-last here; the weights too once the engine is built, where the ZeRO
        # stage allows it (ifc_ds.engine, by to_channels_last below): DeepSpeed's broadcast and ZeRO's
        # flat buffers need them plain.
        self.channels_last = cfg.channels_last

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self._prepare(images)))

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self._prepare(images))


def to_channels_last(module: nn.Module, image_size: int | None) -> None:
    """In place: ``module``'s 4-d weights channels-last, as its inputs are (``InstanceEncoder._prepare``),
    except, on CPU, the weights of dense k x k convolutions (k > 1) whose input maps are 1x1 at ``image_size``
    (ResNet-18's and ResNet-50's last 3x3 convolutions at 32 px), which stay plain. oneDNN's backward is
    slow there with a channels-last weight: a 3x3 512-channel convolution on 1x1 maps took 0.43-0.54x
    the time with a plain weight (forward + backward, 1 thread), while on larger maps, and for 1x1
    kernels, plain / channels-last came out at 0.88-1.05 with no consistent direction
    (``benchmarks/weight_layout.py``). Grouped (depthwise) and non-square kernels were not measured and
    stay channels-last.
    Parameters keep their objects (``.data`` is swapped), so an optimizer built on them still holds them."""
    module.to(memory_format=torch.channels_last)
    first = next(module.parameters(), None)
    if first is None or first.device.type != "cpu" or not image_size:
        return
    for conv in wide_kernels_on_single_pixels(module, image_size):
        conv.weight.data = conv.weight.data.contiguous()


def wide_kernels_on_single_pixels(module: nn.Module, image_size: int) -> list[nn.Conv2d]:
    """The dense (ungrouped) ``nn.Conv2d`` of ``module`` with a k x k kernel, k > 1, whose input maps are
    1x1 when it sees ``image_size`` images."""
    return [conv for _, conv, (_, height, width) in convolution_inputs(module, image_size)
            if height * width == 1 and conv.kernel_size[0] == conv.kernel_size[1] > 1 and conv.groups == 1]


def convolution_inputs(module: nn.Module, image_size: int) -> list[tuple[str, nn.Conv2d, tuple[int, int, int]]]:
    """(name, convolution, its input's [C, H, W]) for every ``nn.Conv2d`` of ``module`` that runs on
    ``image_size`` images, in the order they run: one forward of a single blank image in eval mode
    (batch norm's running statistics untouched; every submodule's mode restored after)."""
    found = []
    hooks = [m.register_forward_hook(lambda conv, inputs, _out, name=name: found.append(
        (name, conv, tuple(inputs[0].shape[1:])))) for name, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            module(torch.zeros(1, 3, image_size, image_size, device=next(module.parameters()).device))
    finally:
        for m, training in modes:
            m.training = training
        for hook in hooks:
            hook.remove()
    return found
