"""ShardedInstanceClassifier against a single-process reference: full weight + F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from ifc_ds.classifier import ShardedInstanceClassifier, shard_range
from tests._dist import run_ranks

N, D = 23, 8  # N not divisible by 2, 3 or 4


def reference_loss(features_all, weight_full, ids_all, temperature, k, eps):
    """Independent reference: materialise all N logits, build dense soft targets, F.cross_entropy."""
    logits = F.normalize(features_all, dim=1) @ F.normalize(weight_full, dim=1).T / temperature
    targets = F.one_hot(ids_all, weight_full.shape[0]).float() * (1 - eps if k and eps else 1.0)
    if k and eps:
        others = logits.detach().clone()
        others[torch.arange(len(ids_all)), ids_all] = float("-inf")
        top = others.topk(k, dim=1).indices
        targets.scatter_add_(1, top, torch.full(top.shape, eps / k, device=top.device))
    return F.cross_entropy(logits, targets)


def batch_sizes(world_size):
    return [5 + 2 * r for r in range(world_size)]  # unequal B_local per rank


def make_case(world_size, seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = batch_sizes(world_size)
    feats = torch.randn(sum(sizes), D, generator=gen) * 3
    ids = torch.randint(0, N, (sum(sizes),), generator=gen)
    ids[1] = ids[0]  # repeated ids in a batch
    weight = torch.randn(N, D, generator=gen)
    return sizes, feats, ids, weight


CASES = [(k, eps, chunk, temp) for k in (0, 1, 5) for chunk in (None, 4) for (eps, temp) in ((0.1, 0.15),)]
CASES += [(5, 0.2, None, 0.02), (5, 0.2, 3, 0.02), (0, 0.0, 2, 0.1)]  # small T: shifted path


def run_my_slice(clf, weight, feats, ids, sizes, rank, k, eps):
    """Loads the reference ``weight [N, D]``'s rows into ``clf``, then forward + backward on this rank's
    slice of the global batch (``sizes`` per rank). Returns (loss, this rank's features with their
    grad, the slice of the global batch they are)."""
    with torch.no_grad():
        clf.weight.copy_(weight[clf.row_start:clf.row_end])
    lo = sum(sizes[:rank])
    my_rows = slice(lo, lo + sizes[rank])
    mine = feats[my_rows].clone().requires_grad_()
    loss = clf(mine, ids[my_rows], smoothing_k=k, smoothing_eps=eps)
    loss.backward()
    return loss, mine, my_rows


def _check_exact(rank, world_size):
    for case_no, (k, eps, chunk, temp) in enumerate(CASES):
        sizes, feats, ids, weight = make_case(world_size, seed=case_no)
        clf = ShardedInstanceClassifier(N, D, temperature=temp, chunk_size=chunk)
        assert (clf.row_start, clf.row_end) == shard_range(N, world_size, rank)
        loss, mine, my_rows = run_my_slice(clf, weight, feats, ids, sizes, rank, k, eps)

        ref_feats, ref_w = feats.clone().requires_grad_(), weight.clone().requires_grad_()
        ref = reference_loss(ref_feats, ref_w, ids, temp, k, eps)
        ref.backward()
        msg = f"case {case_no} (k={k}, eps={eps}, chunk={chunk}, T={temp}) rank {rank}/{world_size}"
        assert_close_rel(loss.detach(), ref.detach(), msg)
        assert_close_rel(mine.grad, world_size * ref_feats.grad[my_rows], msg)
        assert_close_rel(clf.weight.grad, ref_w.grad[clf.row_start:clf.row_end], msg)


def assert_close_rel(actual, expected, msg, rel=1e-5):
    """Within ``rel`` of the reference, relative to the tensor's largest entry: gradients are sums of
    large terms that cancel, so an entry near 0 carries the rounding error of the large terms."""
    scale = expected.abs().max().clamp_min(1e-12).item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=lambda m: f"{msg}: {m}")


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_matches_single_process_reference(world_size):
    if world_size == 1:
        _check_exact(0, 1)  # no process group at all
    else:
        run_ranks(_check_exact, world_size)


def _check_assign_and_errors(rank, world_size):
    clf = ShardedInstanceClassifier(N, D)
    # every rank assigns a disjoint strided set of ids; together they cover all N rows
    ids = torch.arange(rank, N, world_size)
    vecs = torch.randn(len(ids), D, generator=torch.Generator().manual_seed(rank)) * 5
    clf.assign_rows(ids, vecs)
    full = clf.full_weight()
    for r in range(world_size):
        r_ids = torch.arange(r, N, world_size)
        r_vecs = torch.randn(len(r_ids), D, generator=torch.Generator().manual_seed(r)) * 5
        torch.testing.assert_close(full[r_ids], F.normalize(r_vecs, dim=1))
    # bad input on ONE rank: every rank raises the same clear error, nobody hangs
    bad_ids = torch.tensor([0, N if rank == world_size - 1 else 1])
    with pytest.raises(ValueError, match="outside"):
        clf(torch.randn(2, D), bad_ids)
    wrong_dim = D + 1 if rank == 0 else D
    with pytest.raises(ValueError, match="dim"):
        clf(torch.randn(2, wrong_dim), torch.tensor([0, 1]))
    # the group still works after the errors
    loss = clf(torch.randn(3, D), torch.tensor([0, 1, 2]))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("world_size", [1, 3])
def test_assign_rows_round_trip_and_errors(world_size):
    if world_size == 1:
        _check_assign_and_errors(0, 1)
    else:
        run_ranks(_check_assign_and_errors, world_size)


def _too_few_rows(rank, world_size):
    with pytest.raises(ValueError, match="smaller than the world size"):
        ShardedInstanceClassifier(1, D)


def test_fewer_instances_than_ranks():
    run_ranks(_too_few_rows, 2)


def test_bad_arguments_single_process():
    clf = ShardedInstanceClassifier(N, D)
    with pytest.raises(ValueError, match="exceeds"):
        clf(torch.randn(2, D), torch.tensor([0, 1]), smoothing_k=N, smoothing_eps=0.1)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        clf(torch.randn(2, D), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="chunk_size"):
        ShardedInstanceClassifier(N, D, chunk_size=0)


def test_instance_accuracy_and_bf16_autocast():
    clf = ShardedInstanceClassifier(N, D, temperature=0.1)
    clf.track_accuracy = True
    ids = torch.arange(N)
    feats = clf.weight.detach().clone()  # every sample equals its own row: accuracy 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = clf(feats.bfloat16(), ids)
    assert loss.dtype == torch.float32
    assert clf.last_accuracy.item() == 1.0
    clf(-feats, ids)
    assert clf.last_accuracy.item() == 0.0


def test_workspace_reuse_gives_same_result():
    clf = ShardedInstanceClassifier(N, D)
    feats, ids = torch.randn(6, D), torch.randint(0, N, (6,))
    grads = []
    for _ in range(2):
        clf.weight.grad = None
        clf(feats, ids).backward()
        grads.append(clf.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    with torch.no_grad():  # no backward follows: the buffer must not stay claimed
        clf(feats, ids)
    assert not clf._workspace.kept_in_use()


def test_skipped_nonfinite_step_releases_the_kept_logits():
    """The trainer drops a non-finite loss without a backward: the next steps must keep their logits
    in the same buffer again, not fall back to recomputing them beside a second [n, B] buffer."""
    clf = ShardedInstanceClassifier(N, D)
    feats, ids = torch.randn(6, D), torch.randint(0, N, (6,))
    clf(feats.clone().requires_grad_(), ids).backward()
    storage = clf._workspace.buffers["logits"].untyped_storage().data_ptr()
    bad = feats.clone()
    bad[0, 0] = float("nan")
    loss = clf(bad.requires_grad_(), ids)
    assert not torch.isfinite(loss) and clf._workspace.kept_in_use()
    del loss  # skipped: the graph is dropped without a backward
    assert not clf._workspace.kept_in_use()
    for _ in range(2):
        clf.weight.grad = None
        clf(feats.clone().requires_grad_(), ids).backward()
        assert clf._workspace.buffers["logits"].untyped_storage().data_ptr() == storage
    assert "block" not in clf._workspace.buffers  # nothing was recomputed into a second buffer
    # a graph still alive (backward not yet run) keeps its buffer: a second forward must not reuse it
    first = clf(feats.clone().requires_grad_(), ids)
    second = clf(feats.clone().requires_grad_(), ids)
    first.backward()
    second.backward()
    assert "block" in clf._workspace.buffers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_matches_reference_on_cuda_with_bf16_features():
    """World size 1 on the GPU: bf16 features under autocast; the unfused layer computes in fp32, so
    the reference is fp32 math on the same bf16-rounded features (the fused kernels' bf16 operands are
    tested in tests/test_fused_loss.py)."""
    dev = torch.device("cuda")
    for case_no, (k, eps, chunk, temp) in enumerate(CASES):
        _, feats, ids, weight = make_case(1, seed=case_no)
        feats = feats.to(dev, torch.bfloat16)
        clf = ShardedInstanceClassifier(N, D, temperature=temp, chunk_size=chunk, fused="never").to(dev)
        with torch.no_grad():
            clf.weight.copy_(weight)
        mine = feats.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = clf(mine, ids.to(dev), smoothing_k=k, smoothing_eps=eps)
        loss.backward()
        ref_feats = feats.float().clone().requires_grad_()
        ref_w = weight.to(dev).clone().requires_grad_()
        ref = reference_loss(ref_feats, ref_w, ids.to(dev), temp, k, eps)
        ref.backward()
        msg = f"cuda case {case_no} (k={k}, eps={eps}, chunk={chunk}, T={temp})"
        assert_close_rel(loss.detach(), ref.detach(), msg)
        assert_close_rel(mine.grad.float(), ref_feats.grad, msg, rel=1e-2)  # the grad is returned in bf16
        assert_close_rel(clf.weight.grad, ref_w.grad, msg)


def test_ids_gathered_as_floats_only_where_floats_hold_them_exactly():
    """The ids' gather goes through fp32 (so it can take the node sum) up to 2^24 instances; beyond,
    fp32 would round ids (2^24 + 1 -> 2^24), so they stay int64."""
    from ifc_ds.classifier import _gather_ids

    top = 1 << 24
    ids = torch.tensor([top - 1, top - 2, 0, 12345])
    for sizes, expected in (([4], ids), (None, ids[None])):  # rows, or equal shapes with a rank dim
        gathered = _gather_ids(ids, None, top, sizes)
        assert gathered.dtype == torch.int64 and torch.equal(gathered, expected)
    ids = torch.tensor([top + 1, top + 3, -1])
    gathered = _gather_ids(ids, None, top + 10, [3])
    assert gathered.dtype == torch.int64 and gathered.tolist() == ids.tolist()
