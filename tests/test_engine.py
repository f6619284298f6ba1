"""The two-engine wiring on 2 real gloo ranks: classifier shards are never averaged, the backbone is,
and with the offload ds_config ZeRO keeps the classifier's optimizer state on the CPU."""

import pytest
import torch
import torch.distributed as dist

from ifc_ds.classifier import ShardedInstanceClassifier
from ifc_ds.config import load_config
from ifc_ds.engine import build_engines, optimizer_step, train_step, warmup_cosine
from ifc_ds.model import InstanceEncoder
from tests._dist import run_ranks

N = 33  # odd: the shards differ in size, so an all-reduce over the classifier grads could not even run


def _build(rank, world_size, ds_config, *overrides):
    cfg = load_config(None, ["model.name=test_resnet", "model.head_hidden=16", "model.dim=8",
                             f"train.ds_config={ds_config}", "train.batch_size=4", "train.lr=0.5", *overrides])
    torch.manual_seed(rank)  # different init per rank: DeepSpeed must broadcast the backbone
    encoder = InstanceEncoder(cfg.model, 16)
    classifier = ShardedInstanceClassifier(N, cfg.model.dim, 0.1)
    return build_engines(cfg, encoder, classifier, steps_per_epoch=4, world_size=world_size), encoder, classifier


def _two_engines(rank, world_size, ds_config):
    engines, encoder, classifier = _build(rank, world_size, ds_config)
    assert engines.classifier.dp_world_size == 1 and engines.backbone.dp_world_size == world_size
    start_rows = classifier.weight.detach().clone()

    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own images and ids
    for _ in range(2):
        images = torch.randn(4, 3, 16, 16, generator=gen)
        ids = torch.randint(0, N, (4,), generator=gen)
        assert train_step(engines, images, ids, 0, 0.0) is not None
        optimizer_step(engines)
    # classifier: every rank's rows moved, and rank 0's rows differ from rank 1's (never averaged)
    rows = classifier.weight.detach()
    assert not torch.equal(rows, start_rows)
    full = classifier.full_weight()  # uneven shards (17 + 16 rows): a DP all-reduce of them would abort
    assert full.shape == (N, 8) and torch.isfinite(full).all()
    # backbone: data parallel, identical on every rank
    flat = torch.cat([p.detach().flatten() for p in encoder.parameters()])
    copies = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(copies, flat)
    assert torch.equal(copies[0], copies[1])
    return engines


def _offload(rank, world_size):
    engines = _two_engines(rank, world_size, "ds_configs/zero2_offload_fp32.json")
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engines.classifier.optimizer
    assert isinstance(opt, DeepSpeedZeroOptimizer) and opt.cpu_offload
    master = opt.single_partition_of_fp32_groups[0]
    state = opt.optimizer.state[master]
    assert master.device.type == "cpu" and state["momentum_buffer"].device.type == "cpu"
    assert master.numel() >= engines.classifier.module.weight.numel()


def _zero0(rank, world_size):
    _two_engines(rank, world_size, "ds_configs/zero0_fp32.json")


def _classifier_clip(rank, world_size):
    """train.classifier_grad_clip bounds the global norm (over both shards) of the rows' first SGD update;
    the backbone is not clipped unless its ds_config says so."""
    clip = 1e-3
    engines, _, classifier = _build(rank, world_size, "ds_configs/zero0_fp32.json",
                                    f"train.classifier_grad_clip={clip}")
    assert engines.classifier.gradient_clipping() == clip and engines.backbone.gradient_clipping() == 0.0
    start = classifier.full_weight().clone()
    gen = torch.Generator().manual_seed(7 + rank)
    train_step(engines, torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, N, (4,), generator=gen), 0, 0.0)
    lr = engines.classifier.get_lr()[0]
    optimizer_step(engines)
    moved = (classifier.full_weight() - start).norm()  # first step: momentum buffer = clipped gradient
    assert 0 < moved <= lr * clip * 1.0001, (moved, lr * clip)


@pytest.mark.parametrize("check", [_zero0, _offload, _classifier_clip], ids=["zero0", "zero2_offload", "clip"])
def test_two_engines_on_two_ranks(check):
    run_ranks(check, 2)


def test_warmup_cosine():
    values = [warmup_cosine(s, 10, 2, 0.0) for s in range(10)]
    assert values[0] == 0.5 and values[1] == 1.0 and values[-1] < 0.05
    assert all(a >= b for a, b in zip(values[1:], values[2:]))
