"""ifc_ds.collectives on real gloo groups: every collective honours the group it is given (a subgroup
of ranks 1 and 2 while rank 0 runs its own world collectives), uneven sizes, and a world of one
without any process group. The classifier and its DeepSpeed MPU follow the group they are given."""

import pytest
import torch
import torch.distributed as dist

from ifc_ds import collectives as C
from tests._dist import run_ranks


def test_without_a_process_group_every_collective_is_a_world_of_one():
    assert not dist.is_initialized()
    x = torch.arange(6.0).reshape(3, 2)
    assert C.size() == 1 and C.rank_in() == 0
    for reduce in (C.all_reduce_sum, C.all_reduce_max, C.all_reduce_min):
        assert torch.equal(reduce(x.clone()), x)
    assert torch.equal(C.all_gather_equal(x), x[None])
    assert torch.equal(C.all_gather_rows(x, [3]), x) and torch.equal(C.gather_uneven(x), x)
    assert C.broadcast_object({"a": 1}) == {"a": 1} and C.all_gather_object(5) == [5]
    assert torch.equal(C.broadcast_(x.clone()), x)
    C.barrier()
    assert list(C.lockstep(iter([1, 2]), "cpu")) == [1, 2]
    with pytest.raises(ValueError, match="until must be 'all' or 'any', not 'every'"):
        next(C.lockstep(iter([1, 2]), "cpu", "every"))


def _on_a_subgroup(rank, world_size):
    sub = dist.new_group([1, 2])  # collective over the world: every rank makes it
    if rank == 0:  # outside the subgroup: world collectives of its own must not meet the subgroup's
        assert C.all_gather_object("zero") == ["zero", "one", "two"]
        return
    me = rank - 1  # rank within the subgroup
    assert (C.size(sub), C.rank_in(sub)) == (2, me)
    rows = torch.full((2 + 3 * me, 2), float(rank))  # 2 rows on rank 1, 5 on rank 2
    expected = torch.cat([torch.full((2, 2), 1.0), torch.full((5, 2), 2.0)])
    assert torch.equal(C.gather_uneven(rows, sub), expected)
    assert torch.equal(C.all_gather_rows(rows, [2, 5], sub), expected)
    assert torch.equal(C.all_gather_equal(torch.tensor([rank]), sub), torch.tensor([[1], [2]]))
    assert C.all_reduce_sum(torch.tensor([rank]), sub).item() == 3
    assert C.all_reduce_max(torch.tensor([rank]), sub).item() == 2
    assert C.all_reduce_min(torch.tensor([rank]), sub).item() == 1
    # src is a rank of the group: 0 is global rank 1 here
    assert C.broadcast_(torch.tensor([10 * rank]), src=0, group=sub).item() == 10
    assert C.broadcast_object(f"from {rank}", src=1, group=sub) == "from 2"
    assert C.all_gather_object(rank, sub) == [1, 2]
    # uneven iterators: "any" stops with the shorter, "all" runs the longer out with None for the other
    items = list(range(2 + me))  # 2 items on rank 1, 3 on rank 2
    assert list(C.lockstep(iter(items), "cpu", "any", sub)) == [0, 1]
    assert list(C.lockstep(iter(items), "cpu", "all", sub)) == ([0, 1, None] if me == 0 else [0, 1, 2])
    C.barrier(sub)
    if rank == 1:
        assert C.all_gather_object("one") == ["zero", "one", "two"]
    else:
        assert C.all_gather_object("two") == ["zero", "one", "two"]


def test_every_collective_honours_its_group():
    run_ranks(_on_a_subgroup, 3)


def _classifier_and_mpu_in_pairs(rank, world_size):
    from ifc_ds.classifier import ShardedInstanceClassifier, shard_range
    from ifc_ds.engine import RankAloneMPU
    from tests.test_classifier import D, N, make_case, reference_loss, run_my_slice

    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pair, me = pairs[rank // 2], rank % 2
    mpu = RankAloneMPU(pair)
    assert (mpu.get_model_parallel_group(), mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()) \
        == (pair, me, 2)
    assert mpu.get_data_parallel_world_size() == 1 and mpu.get_data_parallel_group_ranks() == [rank]

    # each pair shards all N rows over its two ranks and sees its own batch
    clf = ShardedInstanceClassifier(N, D, temperature=0.15, group=pair)
    assert (clf.row_start, clf.row_end) == shard_range(N, 2, me)
    sizes, feats, ids, weight = make_case(2, seed=40 + rank // 2)
    loss, mine, my_rows = run_my_slice(clf, weight, feats, ids, sizes, me, 5, 0.2)
    ref_feats, ref_weight = feats.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = reference_loss(ref_feats, ref_weight, ids, 0.15, 5, 0.2)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    # the features' gradient is the pair's size times the reference (the backbone engine averages)
    torch.testing.assert_close(mine.grad, 2 * ref_feats.grad[my_rows])
    torch.testing.assert_close(clf.weight.grad, ref_weight.grad[clf.row_start:clf.row_end])


def test_classifier_and_its_deepspeed_mpu_follow_the_group_they_are_given():
    """Two classifiers, each sharded over a pair of a 4-rank world (before, the MPU reported the world
    as the model-parallel group whatever the classifier's group)."""
    run_ranks(_classifier_and_mpu_in_pairs, 4)


def _clipped_in_pairs(rank, world_size, ds_config):
    from ifc_ds.classifier import ShardedInstanceClassifier
    from ifc_ds.config import load_config
    from ifc_ds.engine import build_engines, current_classifier_lr, optimizer_step, train_step
    from ifc_ds.model import InstanceEncoder

    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pair = pairs[rank // 2]
    max_norm = 1e-3  # far below any gradient norm here: every step is clipped
    cfg = load_config(None, ["model.name=test_resnet", "model.head_hidden=16", "model.dim=8",
                             f"train.ds_config={ds_config}", "train.batch_size=4", "train.momentum=0", "train.lr=1000",
                             "train.classifier_weight_decay=0", f"train.classifier_grad_clip={max_norm}"])
    classifier = ShardedInstanceClassifier(21, 8, 0.1, group=pair)
    engines = build_engines(cfg, InstanceEncoder(cfg.model, 16), classifier, steps_per_epoch=4, world_size=4)
    gen = torch.Generator().manual_seed(rank)
    # the second pair's gradients are 100x larger: a norm taken over the world would be the second's
    images = torch.randn(4, 3, 16, 16, generator=gen) * (1 if rank < 2 else 100)
    before, lr = classifier.weight.detach().clone(), current_classifier_lr(engines)
    grads = []  # (ZeRO-1/2 move .grad into their own buffers: a hook sees it on the way)
    classifier.weight.register_hook(lambda g: grads.append(g.detach().clone()))
    assert train_step(engines, images, torch.randint(0, 21, (4,), generator=gen), 0, 0.0) is not None
    grad = grads[0]
    pair_norm = C.all_reduce_sum(grad.square().sum(), pair).sqrt()
    optimizer_step(engines)
    step = classifier.weight.detach() - before
    unclipped = -lr * grad
    coefficient = (step * unclipped).sum() / unclipped.square().sum()  # least squares: rounding averages out
    # DeepSpeed's clip coefficient; the other pair's norm differs by about 8% (a world norm: 40%)
    torch.testing.assert_close(coefficient, max_norm / (pair_norm + 1e-6), rtol=2e-3, atol=0)
    torch.testing.assert_close(step, unclipped * coefficient, rtol=0, atol=1e-7)  # (weights of ~1: fp32 steps)


@pytest.mark.parametrize("ds_config", ["zero0_fp32", "zero1_fp32"])
def test_the_classifier_engine_clips_by_the_norm_over_its_own_group(ds_config):
    """Before, the norm was the world's (the MPU's model-parallel group), and under ZeRO-0 DeepSpeed
    then averaged it over the world's data-parallel group."""
    run_ranks(_clipped_in_pairs, 4, f"ds_configs/{ds_config}.json")
