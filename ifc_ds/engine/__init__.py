"""DeepSpeed wiring: the data-parallel backbone engine, the classifier-shard engine, the LR schedule.

Two engines, one training step (``gradient_accumulation_steps`` micro-batches)::

    for images, ids in micro_batches:                    # gas micro-batches of this rank's batch
        features = backbone(images)                      # [B_micro, D], data parallel
        leaf = features.detach().requires_grad_()
        loss = classifier(leaf, ids, k, eps)             # sharded rows, same loss on every rank
        classifier.backward(loss * weight)               # weight.grad (own rows) + leaf.grad
        backbone.backward((features * leaf.grad).sum())  # both accumulate locally
    classifier.step(); backbone.step()                   # reduce (backbone) and update, once

The surrogate ``(features * leaf.grad).sum()`` has exactly ``leaf.grad`` as its gradient w.r.t.
``features``, so the backbone receives the true gradient while each engine keeps its own gradient
reduction: the backbone's is averaged over all ranks (ZeRO 0/1/2 from the ds_config), the
classifier's is never averaged because its engine's data-parallel group is the rank alone
(``RankAloneMPU``). ZeRO still partitions/offloads the classifier's optimizer state: the ds_config's
``offload_optimizer`` section applies to both engines.

Gradient accumulation runs in DeepSpeed's unmanaged mode (``managed_gradient_accumulation: false``;
with one micro-batch per step DeepSpeed's default mode is the same thing):
``backward`` only accumulates and ``step`` is the boundary, so the trainer decides what a step is. A
micro-batch's loss is weighted by its share of the step's global batch, so ``gas`` micro-batches of
``B`` give the gradient of one batch of ``gas * B``; a non-finite micro-batch contributes nothing, and
a step none of whose micro-batches was finite is not taken at all.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import timm.optim
import torch
from torch import nn

from ifc_ds import collectives
from ifc_ds.config import Config, ConfigError
from ifc_ds.dist import EXIT_PEER_LOST, Watchdog
from ifc_ds.engine import shared_memory
from ifc_ds.engine.fused_sgd import DenseFusedSGD, _dense
from ifc_ds.engine.node_buffers import NodeBuffers
from ifc_ds.engine.shared_step import SharedSGDStep
from ifc_ds.model import to_channels_last

REPO_ROOT = Path(__file__).resolve().parents[2]  # (this file is ifc_ds/engine/__init__.py)
log = logging.getLogger(__name__)


# a ds_config's precision sections ("bfloat16": DeepSpeed's older name for "bf16", still read when "bf16" is absent)
PRECISION_SECTIONS = ("fp16", "bf16", "bfloat16", "amp", "torch_autocast")


def read_ds_config(path: str) -> dict:
    """Reads a ds_config JSON (relative paths: the working directory, then the repository)."""
    candidates = [Path(path), REPO_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"train.ds_config {candidate}: invalid JSON: {exc}") from None
    raise ConfigError(f"train.ds_config {path} does not exist")


def backbone_ds_config(ds_config: dict, micro_batch: int, world_size: int) -> dict:
    """Fills in the batch sizes; optimizer and schedule come from the ifc_ds config, not the JSON."""
    cfg = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ConfigError(f"ds_config has a '{key}' section: ifc_ds sets the optimizer and LR schedule "
                              "from train.* (two engines must share them); remove it")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"ZeRO stage {stage} is not supported (use 0, 1 or 2)")
    for key in PRECISION_SECTIONS:
        if key in cfg and not isinstance(cfg[key], dict):
            raise ConfigError(f"ds_config {key} must be a section ({{\"enabled\": true, ...}}), got {cfg[key]!r}")
        enabled = cfg.get(key, {}).get("enabled", False)
        if not isinstance(enabled, bool):  # DeepSpeed takes "true", "false" (!) and 1 as enabled, each its own way
            raise ConfigError(f"ds_config {key}.enabled must be true or false (a JSON boolean), got {enabled!r}")
    autocast = cfg.get("torch_autocast") or {}
    if autocast.get("enabled") and str(autocast.get("dtype", "")).removeprefix("torch.") not in ("bfloat16", "bf16"):
        # measured: ZeRO-1/2's step found the scaled gradients' overflow and returned before its GradScaler could
        # lower the scale, so every step was skipped for good; ZeRO-0's scaler skipped steps that DeepSpeed still
        # reported as applied; no dtype means fp16 under CUDA's autocast, with no scaler at all
        raise ConfigError("ds_config torch_autocast needs \"dtype\": \"torch.bfloat16\": with float16 (the CUDA "
                          "default when no dtype is given) DeepSpeed's loss scaling skips steps silently or for good; "
                          "for fp16 use the \"fp16\" section with ZeRO stage 1 or 2 (ds_configs/zero1_fp16.json)")
    if stage == 0 and cfg.get("fp16", {}).get("enabled"):
        # DeepSpeed's engine.backward scales the loss only for its ZeRO optimizers, and its fp16 optimizer for
        # stage 0 still divides the gradients by the loss scale: every update came out 2^16 times too small and
        # the backbone did not train, with no warning (deepspeedai/DeepSpeed#8393, open; measured here: 0 change)
        raise ConfigError("fp16 with ZeRO stage 0 does not train under DeepSpeed: its loss is never scaled but its "
                          "gradients are unscaled (deepspeedai/DeepSpeed#8393); use ZeRO stage 1 "
                          "(ds_configs/zero1_fp16.json) or bf16")
    gas = cfg.get("gradient_accumulation_steps", 1)
    if gas == "auto":
        gas = 1
    if not isinstance(gas, int) or isinstance(gas, bool) or gas < 1:
        raise ConfigError(f"ds_config gradient_accumulation_steps must be a positive integer, got {gas!r}")
    if gas > 1:
        if cfg.get("managed_gradient_accumulation", False):
            raise ConfigError("ds_config managed_gradient_accumulation=true is not supported: ifc_ds owns the "
                              "accumulation boundary (one optimizer step = gradient_accumulation_steps micro-batches)")
        cfg["managed_gradient_accumulation"] = False  # with one micro-batch, every step is a boundary anyway
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = gas
    cfg["train_batch_size"] = micro_batch * gas * world_size
    cfg.setdefault("steps_per_print", 10**9)  # ifc_ds logs itself
    # DeepSpeed clips at norm 1.0 when the key is absent: make "no clipping" the default instead, so
    # that switching ZeRO stage or ds_config never changes the optimisation silently
    cfg.setdefault("gradient_clipping", 0.0)
    if stage > 0:
        cfg["zero_allow_untested_optimizer"] = True  # torch SGD / AdamW are element-wise: safe to partition
    if cfg.get("zero_optimization", {}).get("offload_optimizer"):
        cfg["zero_force_ds_cpu_optimizer"] = False  # SGD/LARS from torch/timm run on the offloaded state
    return cfg


def accumulation_steps(cfg: Config) -> int:
    """Micro-batches per optimizer step: the ds_config's ``gradient_accumulation_steps``."""
    return backbone_ds_config(read_ds_config(cfg.train.ds_config), cfg.train.batch_size, 1)[
        "gradient_accumulation_steps"]


def classifier_ds_config(backbone_cfg: dict, grad_clip: float) -> dict:
    """The classifier engine: same ZeRO stage and offload, fp32 (cosine logits need it), its own
    gradient clip (the norm is taken over all shards: the engine's model-parallel group is the group
    the rows are sharded over), and a data-parallel world of one."""
    cfg = copy.deepcopy(backbone_cfg)
    for key in PRECISION_SECTIONS:
        cfg.pop(key, None)
    cfg["gradient_clipping"] = grad_clip
    cfg["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"]
    return cfg


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(encoder: nn.Module, weight_decay: float) -> list[dict]:
    """timm's weight-decay split (``param_groups_weight_decay``): none on biases and normalisation
    parameters (ndim <= 1), nor on what the backbone's ``no_weight_decay()`` names (a ViT's pos_embed
    and cls_token). The split is taken at a placeholder decay and the value set afterwards: timm
    returns one group for a decay of 0, and the groups must not depend on the value (the fp32
    masters of a bf16 checkpoint are saved and read back group by group)."""
    backbone = getattr(encoder, "backbone", encoder)
    prefix = "backbone." if backbone is not encoder else ""
    skip = {prefix + name for name in getattr(backbone, "no_weight_decay", set)()}
    groups = timm.optim.param_groups_weight_decay(encoder, 1.0, no_weight_decay_list=skip)
    for group in groups:
        group["weight_decay"] = weight_decay if group["weight_decay"] else 0.0
    return groups


class RankAloneMPU:
    """The ``mpu`` DeepSpeed is given for the classifier engine.

    DeepSpeed averages gradients over an engine's data-parallel group and broadcasts its parameters
    from the group's first rank. The classifier rows differ on every rank (tensor parallel), so this
    engine's data-parallel group is the rank alone: no averaging, no broadcast, while ZeRO still
    manages (and can offload) the optimizer state. The model-parallel group is the group the rows
    are sharded over (``classifier_group``; None: the world), so gradient-norm clipping and checkpoint
    file names see the shards as one sharded parameter. Collective: every rank creates every
    single-rank group (``new_group`` is collective over the world).
    """

    def __init__(self, classifier_group=None):
        world, me = torch.distributed.get_world_size(), torch.distributed.get_rank()
        alone = [torch.distributed.new_group([r]) for r in range(world)]
        self._alone, self._global_rank = alone[me], me
        self._group = classifier_group if classifier_group is not None else torch.distributed.group.WORLD

    def get_data_parallel_group(self):
        return self._alone

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_data_parallel_world_size(self) -> int:
        return 1

    def get_data_parallel_group_ranks(self):
        return [self._global_rank]

    def get_model_parallel_group(self):
        return self._group

    def get_model_parallel_rank(self) -> int:
        return collectives.rank_in(self._group)

    def get_model_parallel_world_size(self) -> int:
        return collectives.size(self._group)


# config.OptimizerName -> timm's optimizer registry (a test holds the names equal). Ours are the
# paper's: "sgd" is classical momentum SGD, which timm calls "momentum" (timm's "sgd" is Nesterov);
# "lars" is timm's LARS (SGD + trust ratio); "adamw" is torch's, through timm.
OPTIMIZERS = {"sgd": "momentum", "lars": "lars", "adamw": "adamw"}


# torch's fused SGD step (one kernel per tensor, where the default on CPU runs one op per term and, with
# weight decay, allocates a decayed copy of every gradient), handed 1-D runs of memory
# (``fused_sgd.DenseFusedSGD``: channels-last weights are slow in the kernel otherwise, and tensors of
# mixed layouts wrong); bitwise the same results (benchmarks/step_parts.py times them). Not AdamW's:
# its fused CPU kernel has the same flaw, and a state loaded in another layout than the weights would
# be updated wrongly, silently. timm's LARS has none. The devices: those ifc_ds runs on.
FUSED_OPTIMIZERS, FUSED_DEVICES = ("sgd",), ("cpu", "cuda")


def make_optimizer(name: str, groups: list[dict], lr: float, momentum: float,
                   fused: bool | None = None) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` on ready parameter groups (each carries its weight decay); SGD's
    fused step (``DenseFusedSGD``) on the devices in ``FUSED_DEVICES`` (``fused=None``) or as asked."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer: unknown '{name}'; choose from {', '.join(OPTIMIZERS)}")
    if fused is None:
        from deepspeed.accelerator import get_accelerator

        fused = name in FUSED_OPTIMIZERS and get_accelerator().device_name() in FUSED_DEVICES
    if fused:  # timm's "momentum" is torch's SGD without Nesterov: the same, fused
        if name not in FUSED_OPTIMIZERS:
            raise ConfigError(f"train.optimizer={name} has no fused step here (only {', '.join(FUSED_OPTIMIZERS)})")
        return DenseFusedSGD(groups, lr=lr, momentum=momentum)
    return timm.optim.create_optimizer_v2(groups, OPTIMIZERS[name], lr=lr, momentum=momentum)


@dataclass
class Engines:
    backbone: deepspeed.DeepSpeedEngine
    classifier: deepspeed.DeepSpeedEngine
    base_lr: float  # backbone LR after batch scaling
    schedule: dict  # {"total": steps, "warmup": steps}: read by both LR schedules at every step
    accumulation_steps: int = 1  # micro-batches per optimizer step
    classifier_lr_scale: float = 1.0
    flat_grads: FlatGradients | None = None  # ZeRO-0 fp32: the backbone's gradient all-reduce

    def dtype(self) -> torch.dtype:
        return next(self.backbone.module.parameters()).dtype

    @property
    def encoder(self) -> nn.Module:
        """The backbone + head module the backbone engine trains."""
        return self.backbone.module

    @property
    def num_instances(self) -> int:
        return self.classifier.module.num_instances

    @property
    def dim(self) -> int:
        return self.classifier.module.dim

    def save_state(self, folder: Path) -> None:
        """Collective: weights and optimizer states of both engines into the checkpoint ``folder``."""
        from ifc_ds.engine.state import save_engines  # (state imports this package: no import cycle)

        save_engines(self, folder)

    def load_state(self, folder: Path, same_world: bool) -> None:
        """Collective: both engines from the checkpoint ``folder``, re-sharded if ``not same_world``."""
        from ifc_ds.engine.state import load_engines

        load_engines(self, folder, same_world)

    def set_total_steps(self, total: int) -> None:
        """The LR schedule's length in optimizer steps (warm-up unchanged): a resume re-plans it."""
        self.schedule["total"] = max(1, total)

    def set_schedule_step(self, step: int) -> None:
        """Puts both LR schedules at optimizer step ``step`` with base LRs from *this* run's config and
        global batch: ``LambdaLR.load_state_dict`` would restore the checkpoint's base LRs, so a new
        ``train.lr``, ``classifier_lr_scale`` or global batch would be ignored after a resume."""
        for engine, base in ((self.backbone, self.base_lr), (self.classifier, self.base_lr * self.classifier_lr_scale)):
            scheduler = engine.lr_scheduler
            scheduler.base_lrs = [base] * len(scheduler.optimizer.param_groups)
            scheduler.last_epoch = step
            for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
                group["lr"] = base * factor(step)


def build_engines(cfg: Config, encoder: nn.Module, classifier: nn.Module, steps_per_epoch: int,
                  world_size: int) -> Engines:
    ds_cfg = backbone_ds_config(read_ds_config(cfg.train.ds_config), cfg.train.batch_size, world_size)
    if cfg.train.optimizer == "lars" and ds_cfg.get("zero_optimization", {}).get("stage", 0) > 0:
        raise ConfigError("train.optimizer=lars needs ZeRO stage 0: its per-layer trust ratio would be computed "
                          "on ZeRO's flat partitions instead of layers")
    if ds_cfg.get("zero_optimization", {}).get("elastic_checkpoint") and cfg.train.optimizer != "adamw":
        # measured: a same-world resume failed on DeepSpeed's AssertionError (its loader of that layout wants a
        # step count in the optimizer state); a run that could never resume is refused before it starts
        raise ConfigError(f"ds_config elastic_checkpoint=true with train.optimizer={cfg.train.optimizer}: DeepSpeed "
                          "cannot load that layout without a step count in the optimizer state, which only adamw "
                          "keeps; drop elastic_checkpoint (ifc_ds re-partitions ZeRO state across world sizes itself)")
    _check_the_accelerator_has(ds_cfg)
    global_batch = ds_cfg["train_batch_size"]
    lr = cfg.train.lr * global_batch / 256  # linear scaling rule
    # mutable (Engines.set_total_steps): a resume on another global batch re-plans the remaining steps
    plan = {"total": max(1, steps_per_epoch * cfg.train.epochs),
            "warmup": int(round(cfg.train.warmup_epochs * steps_per_epoch))}

    def schedule(step: int) -> float:
        return warmup_cosine(step, plan["total"], plan["warmup"], cfg.train.min_lr_ratio)

    # The classifier engine is built first: DeepSpeed stores an engine's mpu in a module-level global
    # (deepspeed.utils.groups.mpu), which must be back to None when the backbone engine is built and run.
    for p in classifier.parameters():
        p.model_parallel = True  # counted by every rank in DeepSpeed's gradient-norm all-reduce
        p.tensor_model_parallel = True
    clf_groups = [{"params": list(classifier.parameters()), "weight_decay": cfg.train.classifier_weight_decay}]
    clf_opt = make_optimizer(cfg.train.optimizer, clf_groups, lr * cfg.train.classifier_lr_scale, cfg.train.momentum)
    shared_memory.prefer_environment_ninja()  # deepspeed.initialize builds its op where init_distributed did not
    clf_engine, _, _, _ = deepspeed.initialize(
        model=classifier, optimizer=clf_opt, config=classifier_ds_config(ds_cfg, cfg.train.classifier_grad_clip),
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(clf_opt, schedule), mpu=RankAloneMPU(classifier.group),
        dist_init_required=False)
    from deepspeed.utils import groups

    groups.mpu = None
    if clf_engine.zero_optimization_stage() == 0:
        # Without ZeRO the engine looks its data-parallel group up in that global at every backward,
        # which is the whole world again once it is reset: switch its gradient all-reduce off (the rows
        # are never averaged). ZeRO-1/2 keep the rank-alone group they captured at construction.
        clf_engine.enable_backward_allreduce = False
    bb_opt = make_optimizer(cfg.train.optimizer, param_groups(encoder, cfg.train.weight_decay), lr, cfg.train.momentum)
    bb_engine, _, _, _ = deepspeed.initialize(
        model=encoder, optimizer=bb_opt, config=ds_cfg,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(bb_opt, schedule), dist_init_required=False)
    _match_norm_buffers_on_cpu(bb_engine.module)
    flat_grads = None
    if _plain_zero0(bb_engine):
        if cfg.model.channels_last:
            # after deepspeed.initialize: its parameter broadcast needs the plain layout
            to_channels_last(bb_engine.module, getattr(bb_engine.module, "image_size", None) or cfg.data.image_size)
        # DeepSpeed's step scales the gradients in place to clip them, or to unscale them (a torch-autocast
        # gradient scaler: fp16 autocast, which backbone_ds_config refuses today)
        writes = bb_engine.gradient_clipping() > 0 or getattr(bb_engine, "torch_autocast_z0_gradscaler", None)
        flat_grads = FlatGradients(bb_engine.module, cfg.dist.timeout_s, cfg.output_dir,
                                   step_writes_gradients=bool(writes))
        if isinstance(bb_engine.optimizer, DenseFusedSGD):  # (collective)
            bb_engine.optimizer.shared_step = SharedSGDStep.create(flat_grads, bb_engine.optimizer)
        bb_engine.enable_backward_allreduce = False  # FlatGradients averages, in place
    return Engines(backbone=bb_engine, classifier=clf_engine, base_lr=lr, schedule=plan,
                   accumulation_steps=ds_cfg["gradient_accumulation_steps"],
                   classifier_lr_scale=cfg.train.classifier_lr_scale, flat_grads=flat_grads)


def _check_the_accelerator_has(ds_cfg: dict) -> None:
    """The ds_config's precision, refused in one line where DeepSpeed's accelerator lacks it; its engine
    would raise a ValueError from inside ``deepspeed.initialize``. On CPU, fp16 needs oneDNN's fp16
    kernels (AVX512-FP16 or AMX-FP16): an AMD EPYC 2-core VM here has neither, another has them."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    checks = (("fp16", accelerator.is_fp16_supported), ("bf16", accelerator.is_bf16_supported),
              ("bfloat16", accelerator.is_bf16_supported))
    for section, supported in checks:
        if ds_cfg.get(section, {}).get("enabled") and not supported():
            names = ", ".join(str(t).removeprefix("torch.") for t in accelerator.supported_dtypes())
            raise ConfigError(f"ds_config {section}: DeepSpeed's {accelerator.device_name()} accelerator does not "
                              f"support it on this machine (it supports {names}); use another ds_config")


def _plain_zero0(engine) -> bool:
    """ZeRO-0 in fp32 keeps each parameter (and gradient) as its own tensor. ZeRO-1/2 and DeepSpeed's
    bf16/fp16 optimizers make them views of flat buffers of their own, whose layout a conversion would
    break: there the inputs alone are channels-last, and DeepSpeed reduces the gradients."""
    return engine.zero_optimization_stage() == 0 and not (engine.fp16_enabled() or engine.bfloat16_enabled())


class FlatGradients:
    """The data-parallel gradient all-reduce of a ZeRO-0 fp32 backbone, without copies.

    DeepSpeed's ZeRO-0 all-reduce concatenates every gradient into a fresh flat tensor, reduces it
    and copies the result back: on a CPU that is most of its cost (profiled, ResNet-18 on 2 ranks:
    ~120 ms of copies around a ~40 ms all-reduce, see benchmarks/README.md). Here each parameter's
    gradient lands in its slice of one persistent flat buffer (in the parameter's own memory format, so
    channels-last weights get channels-last gradients), and the buffer is averaged in place, like DDP's
    ``gradient_as_bucket_view``. A step's first backward writes each gradient into its slice once:
    the gradients start as None, and a post-accumulate hook copies the tensor autograd made into the
    slice and makes the slice the ``.grad``, which later micro-batches accumulate into. Accumulating
    the first backward into zeroed slices instead needs the slices zeroed for every step: given
    ResNet-18's 11.5 M gradients on this CPU, 10.3 ms with a separate zeroing pass against 6.5 ms
    copied (``benchmarks/step_parts.py``); the node-shared average used to zero its rows in its own
    pass, and there the backward and the average took about 4 ms less per step (benchmarks/README.md).
    How the buffer is averaged (``mode``):

    * ``NODE_BUFFERS``: every rank on one CPU node: the buffers of all ranks are rows of one
      shared-memory mapping (``node_buffers.NodeBuffers``), averaged where they lie into a mean row
      that every rank's optimizer step reads (the ``.grad`` views move there). Where the step writes
      the gradients (``step_writes_gradients``: DeepSpeed's gradient clipping or its autocast gradient
      scaler scales them in place), each rank copies the mean into its own row first: every rank
      scaling the one shared row would scale it once per rank, racing;
    * ``DEEPSPEED_SHM``: DeepSpeed's shared-memory all-reduce (where the node-shared mapping could not
      be made), under a watchdog of ``timeout_s`` since it has no timeout of its own;
    * ``PROCESS_GROUP``: torch.distributed's all-reduce (several nodes, or a GPU)."""

    NODE_BUFFERS, DEEPSPEED_SHM, PROCESS_GROUP = "node-shared buffers", "DeepSpeed's shared memory", "process group"

    def __init__(self, module: nn.Module, timeout_s: float = 300.0, output_dir: str = ".",
                 step_writes_gradients: bool = False):
        params = [p for p in module.parameters() if p.requires_grad]
        numel, dtype, device = _flat_offsets(params)[1], params[0].dtype, params[0].device
        self.node = NodeBuffers.create(numel, dtype) if device.type == "cpu" else None  # (collective)
        self.flat = self.node.own if self.node is not None else torch.zeros(numel, dtype=dtype, device=device)
        self.watchdog = None
        if shared_memory.all_reduce_applies(self.flat):
            self.watchdog = Watchdog(timeout_s, "a peer rank died or a collective timed out; restart with "
                                     f"resume=auto to continue from the last complete checkpoint in "
                                     f"{output_dir}/checkpoints", EXIT_PEER_LOST)
        self.mode = (self.NODE_BUFFERS if self.node is not None else
                     self.DEEPSPEED_SHM if self.watchdog is not None else self.PROCESS_GROUP)
        if collectives.size() > 1:
            log.info("backbone gradients: averaged through %s (%d ranks)", self.mode, collectives.size())
        self.views = _views_of(self.flat, params)  # [(param, its gradient's view of the flat buffer)]
        shared_mean = self.node is not None and not step_writes_gradients
        self.mean_views = _views_of(self.node.mean, params) if shared_mean else None
        self.collecting = False  # between attach and all_reduce: gradients go into the buffer
        for param, view in self.views:
            param.register_post_accumulate_grad_hook(self._into_buffer(view))

    def _into_buffer(self, view: torch.Tensor):
        def hook(param: torch.Tensor) -> None:
            # the step's first gradient of this parameter is autograd's own tensor: copy it into the
            # buffer (the slice's old contents are overwritten, never read); later ones accumulate there
            if self.collecting and param.grad.data_ptr() != view.data_ptr():
                view.copy_(param.grad)
                param.grad = view
        return hook

    def attach(self) -> None:
        """Before a step's first backward: no gradients yet (the engine's step drops them too)."""
        self.collecting = True
        for param, _ in self.views:
            param.grad = None

    def all_reduce(self) -> None:
        """After a step's last backward: the mean over the data-parallel ranks as the gradients."""
        self.collecting = False
        for param, view in self.views:
            if param.grad is None:  # no backward reached it this step: its slice holds an older gradient
                view.zero_()
                param.grad = view
        world = collectives.size()
        if world == 1:
            return
        if self.mode == self.NODE_BUFFERS:
            self.node.average_()
            if self.mean_views is None:  # the step scales the gradients: into this rank's own row
                self.flat.copy_(self.node.mean)
                return
            for param, view in self.mean_views:
                param.grad = view
            return
        if self.mode == self.DEEPSPEED_SHM:
            with self.watchdog.guard("the backbone's gradient all-reduce"):
                shared_memory.all_reduce_(self.flat)
        else:
            collectives.all_reduce_sum(self.flat)
        self.flat.div_(world)


def _flat_offsets(params: list[torch.Tensor]) -> tuple[list[int], int]:
    """Where each parameter starts in a flat buffer (one after the other), and the buffer's length."""
    offsets, offset = [], 0
    for p in params:
        offsets.append(offset)
        offset += p.numel()
    return offsets, offset


def _views_of(flat: torch.Tensor, params: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each parameter's slice of ``flat`` (laid out by ``_flat_offsets``) with the parameter's own strides
    where it is dense (channels-last weights get channels-last gradients; the slice in memory order is
    the parameter's), else contiguous. Own strides, not merely the memory format: a 1x1 convolution's
    channels-last weight is contiguous too, and as a weight with contiguous strides it gave oneDNN's
    convolutions results that differ in the last bits (``shared_step`` makes weights of such views)."""
    views = []
    for p, offset in zip(params, _flat_offsets(params)[0]):
        chunk = flat[offset:offset + p.numel()]
        views.append((p, chunk.as_strided(p.shape, p.stride()) if _dense(p) else chunk.view(p.shape)))
    return views


def _match_norm_buffers_on_cpu(module: nn.Module) -> None:
    """DeepSpeed's bf16/fp16 casts parameters but keeps batch-norm statistics in fp32. CUDA's kernels
    take that mix; the CPU kernel needs statistics of the parameters' dtype, so on CPU (tests, smoke
    runs) they are cast too."""
    for norm in module.modules():
        if isinstance(norm, nn.modules.batchnorm._NormBase) and norm.weight is not None \
                and norm.weight.device.type == "cpu" and norm.running_mean is not None \
                and norm.running_mean.dtype != norm.weight.dtype:
            norm.running_mean.data = norm.running_mean.data.to(norm.weight.dtype)
            norm.running_var.data = norm.running_var.data.to(norm.weight.dtype)


def train_step(engines: Engines, images: torch.Tensor, ids: torch.Tensor, smoothing_k: int, smoothing_eps: float,
               on_features=None, step_batch: int | None = None) -> torch.Tensor | None:
    """Forward + both backwards of one optimizer step: this rank's ``images [B, ...]`` and ``ids [B]``
    split into ``engines.accumulation_steps`` micro-batches, whose gradients accumulate. Returns the
    step's loss (detached, the same on all ranks), or None when no micro-batch was finite: then nothing
    was accumulated and the caller skips ``optimizer_step``. ``step_batch``: the step's global batch
    (default: this rank's batch times the world size), which weights each micro-batch's loss by its
    share. ``on_features(features [b, D], ids [b])`` runs between the backbone and the classifier."""
    gas = engines.accumulation_steps
    step_batch = step_batch or images.shape[0] * engines.backbone.dp_world_size
    if engines.flat_grads is not None:
        engines.flat_grads.attach()
    total, dropped = None, 0
    for micro_images, micro_ids in zip(torch.tensor_split(images, gas), torch.tensor_split(ids, gas)):
        features = engines.backbone(micro_images.to(engines.dtype()))
        leaf = features.detach().float().requires_grad_()
        if on_features is not None:
            on_features(leaf.detach(), micro_ids)
        loss = engines.classifier(leaf, micro_ids, smoothing_k=smoothing_k, smoothing_eps=smoothing_eps)
        if not torch.isfinite(loss).item():  # one host sync per micro-batch; the loss is the same on every rank
            dropped += 1
            continue
        share = engines.classifier.module.last_batch_size / step_batch  # of the step's global batch
        engines.classifier.backward(loss * share, scale_wrt_gas=False)
        engines.backbone.backward((features * leaf.grad.to(features.dtype)).sum(), scale_wrt_gas=False)
        total = loss.detach() * share if total is None else total + loss.detach() * share
    if dropped and total is not None:
        log.warning("%d of %d micro-batches had a non-finite loss and contribute no gradient to this step",
                    dropped, gas)
    return total


def optimizer_step(engines: Engines) -> None:
    if engines.flat_grads is not None:
        engines.flat_grads.all_reduce()
    with _groups_of(engines.classifier):
        engines.classifier.step()
    engines.backbone.step()
    for engine in (engines.classifier, engines.backbone):
        if not engine.was_step_applied():
            # DeepSpeed leaves a step it skipped (gradients not finite; it logs each) out of that engine's LR
            # schedule, but the other engine stepped and the run counts the step: without this the schedule
            # fell one step behind per skip, and a resume (which sets both at the run's step) did not continue
            # the run it resumed
            with warnings.catch_warnings():  # ("lr_scheduler.step() before optimizer.step()": the skip itself)
                warnings.simplefilter("ignore", UserWarning)
                engine.lr_scheduler.step()


@contextlib.contextmanager
def _groups_of(engine):
    """DeepSpeed's global groups set to ``engine``'s mpu for the duration. Its ZeRO-0 gradient clip
    sums the squared norm over the mpu's model-parallel group (the classifier's), then averages the
    norm over the *global* data-parallel group (meant for MoE), which is the world once ``groups.mpu``
    is reset for the backbone: two classifiers sharded over two halves of the world would share one
    mean norm. With the classifier's mpu in place that group is the rank alone. ZeRO-1/2 use the
    groups they captured at construction, so this changes nothing there."""
    from deepspeed.utils import groups

    saved, groups.mpu = groups.mpu, engine.mpu
    try:
        yield
    finally:
        groups.mpu = saved


def backbone_only_step(engines: Engines, images: torch.Tensor) -> None:
    """One optimizer step of the backbone alone on a trivial loss of its features (benchmarks: the
    classifier's share of a step), with the same gradient protocol as ``train_step`` + ``optimizer_step``."""
    if engines.flat_grads is not None:
        engines.flat_grads.attach()
    features = engines.backbone(images)
    engines.backbone.backward(features.float().square().mean())
    if engines.flat_grads is not None:
        engines.flat_grads.all_reduce()
    engines.backbone.step()


def current_lr(engines: Engines) -> float:
    return engines.backbone.get_lr()[0]


def current_classifier_lr(engines: Engines) -> float:
    return engines.classifier.get_lr()[0]
