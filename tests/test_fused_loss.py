"""The fused Triton path of the instance classifier (ifc_ds.fused_loss) against the same
single-process reference as tests/test_classifier.py (full weight + F.cross_entropy).

Without a GPU the kernels run in Triton's interpreter. ``TRITON_INTERPRET=1`` must be set before the
kernels are defined (``@triton.jit`` reads it when ``ifc_ds.fused_loss`` is imported), and must not
leak into other tests (a CUDA test would be interpreted): so every interpreter case runs in ranks of
its own (``tests._dist.run_ranks``, gloo, world size 1 or 2) that take this process's monkeypatched
environment before they import ``ifc_ds.fused_loss``, and this process never imports it.

Under the interpreter ``tl.dot`` is right for fp32 and fp16 operands but not for bf16, so the bf16
kernels are checked by the CUDA-only tests at the end.
"""

import importlib.util
import math

import pytest
import torch

from ifc_ds import classifier as classifier_module
from ifc_ds.classifier import ShardedInstanceClassifier
from ifc_ds.config import ConfigError, load_config
from tests._dist import run_ranks
from tests.test_classifier import assert_close_rel, reference_loss, run_my_slice

# 37 rows: 19 + 18 over 2 ranks, and with the interpreter's 16-row tiles and 2 row splits, one split
# of a shard holds 3 rows (fewer than K = 5). A global batch of 21 spans two 16-wide batch tiles.
N, D = 37, 16
BATCH_SIZES = {1: [21], 2: [9, 12]}
# (K, eps, T): T = 0.1 runs unshifted (1/T <= 40), T = 0.02 with the online row maximum
CASES = [(k, eps, temp) for temp in (0.1, 0.02) for (k, eps) in ((0, 0.0), (1, 0.1), (5, 0.2))]
FP16_UNIT_ROUNDOFF = 2.0**-11
# CPU-only torch wheels come without triton: the interpreter tests need it
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def _interpreted(monkeypatch, fn, world_size, *args):
    """Runs ``fn(rank, world_size, *args)`` on fresh ranks with the Triton interpreter on."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    run_ranks(fn, world_size, *args)


def _case(world_size, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    sizes = BATCH_SIZES[world_size]
    feats = (torch.randn(sum(sizes), D, generator=gen) * 3).to(dtype)
    ids = torch.randint(0, N, (sum(sizes),), generator=gen)
    ids[1] = ids[0]  # repeated ids in a batch
    weight = torch.randn(N, D, generator=gen)
    return sizes, feats, ids, weight


def _reference_accuracy(feats, weight, ids):
    """Fraction of samples whose own id scores above every other id."""
    logits = torch.nn.functional.normalize(feats, dim=1) @ torch.nn.functional.normalize(weight, dim=1).T
    own = logits[torch.arange(len(ids)), ids]
    logits[torch.arange(len(ids)), ids] = -math.inf
    return (own > logits.amax(1)).float().mean()


def _run_layer(rank, world_size, case_no, k, eps, temp, dtype):
    """(loss, features' grad, weight grad, accuracy, reference values) of one case on this rank."""
    sizes, feats, ids, weight = _case(world_size, case_no, dtype)
    clf = ShardedInstanceClassifier(N, D, temperature=temp, fused="always")
    clf.track_accuracy = True  # K = 0 still searches the best other id for the accuracy
    loss, mine, my_rows = run_my_slice(clf, weight, feats, ids, sizes, rank, k, eps)
    assert "logits" not in clf._workspace.buffers and "block" not in clf._workspace.buffers  # no [n, B] buffer

    # the reference: fp32 math on the same (possibly fp16-rounded) features
    ref_feats, ref_w = feats.float().clone().requires_grad_(), weight.clone().requires_grad_()
    ref = reference_loss(ref_feats, ref_w, ids, temp, k, eps)
    ref.backward()
    rows = slice(clf.row_start, clf.row_end)
    return ((loss.detach(), mine.grad.float(), clf.weight.grad, clf.last_accuracy),
            (ref.detach(), world_size * ref_feats.grad[my_rows], ref_w.grad[rows],
             _reference_accuracy(feats.float(), weight, ids)))


def _check_fp32(rank, world_size):
    for case_no, (k, eps, temp) in enumerate(CASES):
        got, want = _run_layer(rank, world_size, case_no, k, eps, temp, torch.float32)
        msg = f"fused case {case_no} (k={k}, eps={eps}, T={temp}) rank {rank}/{world_size}"
        for name, a, b in zip(("loss", "grad_features", "grad_weight"), got[:3], want[:3]):
            assert_close_rel(a, b, f"{msg} {name}")  # 1e-5, the unfused tests' tolerance
        assert got[3].item() == want[3].item(), msg


@needs_triton
@pytest.mark.parametrize("world_size", [1, 2])
def test_fused_fp32_matches_single_process_reference(monkeypatch, world_size):
    """fp32 operands, ``input_precision="ieee"``: the kernels differ from the reference by summation
    order only, so the unfused path's tolerance (1e-5 of the largest entry) holds."""
    _interpreted(monkeypatch, _check_fp32, world_size)


def _check_fp16(rank, world_size):
    for case_no, (k, eps, temp) in enumerate(CASES):
        got, want = _run_layer(rank, world_size, case_no, k, eps, temp, torch.float16)
        msg = f"fp16 case {case_no} (k={k}, eps={eps}, T={temp})"
        # fp16 operands: each GEMM input is rounded to fp16 (unit roundoff u = 2^-11) after scaling,
        # so a logit carries an absolute error of order u |z| with |z| <= 1/T, and so do exp(z) and
        # the gradients relatively: u / (2T) (2.4e-3 at T = 0.1, 1.2e-2 at T = 0.02) is 5-10x the
        # largest error measured on these cases. The loss is a mean over the batch of a log-sum-exp
        # whose errors average out (measured <= 1.4e-5).
        grad_rel = FP16_UNIT_ROUNDOFF / (2 * temp)
        assert_close_rel(got[0], want[0], f"{msg} loss", rel=1e-4)
        assert_close_rel(got[1], want[1], f"{msg} grad_features", rel=grad_rel)
        assert_close_rel(got[2], want[2], f"{msg} grad_weight", rel=grad_rel)


@needs_triton
def test_fused_fp16_operands_match_reference(monkeypatch):
    """fp16 features: the GEMMs that make logits run on fp16 operands (the backward's probability
    operand stays fp32: fp16 cannot hold exp(1/T) nor 1/N)."""
    _interpreted(monkeypatch, _check_fp16, 1)


def _check_scan_topk(rank, world_size):
    from ifc_ds import fused_loss

    tiles = fused_loss.Tiles(block_n=16, block_b=16, grad_block_n=16, num_warps=1, num_stages=1, splits=3)
    gen = torch.Generator().manual_seed(7)
    # (rows, batch, k, shifted, rows sorted by sample 0's logit: every tile improves its top-k)
    for n_rows, batch, k, shift, ascending in ((300, 24, 5, False, False), (300, 24, 1, True, False),
                                               (3, 20, 5, False, False), (200, 16, 5, False, True)):
        weight = torch.randn(n_rows, 32, generator=gen)
        feats = torch.nn.functional.normalize(torch.randn(batch, 32, generator=gen), dim=1)
        if ascending:
            weight = weight[(torch.nn.functional.normalize(weight, dim=1) @ feats[0]).argsort()]
        col_scale2 = weight.norm(dim=1).reciprocal() / 0.05 * math.log2(math.e)
        own = torch.randint(-1, n_rows, (batch,), generator=gen)  # -1: owned by another rank
        res = fused_loss.scan(weight, col_scale2, feats, own, k, shift, tiles)

        logits2 = (weight * col_scale2[:, None]) @ feats.T
        others = logits2.clone()
        mine = own >= 0
        others[own[mine], torch.arange(batch)[mine]] = -math.inf
        ref_vals, ref_idx = others.topk(min(k, n_rows), dim=0)
        finite = torch.isfinite(ref_vals)
        gaps = (ref_vals[:-1] - ref_vals[1:])[finite[1:]]
        assert gaps.numel() == 0 or gaps.min() > 1e-3, "near-tied reference values: pick another seed"
        msg = f"n={n_rows} B={batch} k={k} shift={shift} ascending={ascending}"
        torch.testing.assert_close(res.top_vals[:len(ref_vals)], ref_vals, rtol=1e-5, atol=1e-5, msg=msg)
        assert torch.equal(torch.where(finite, res.top_idx[:len(ref_idx)], -1), torch.where(finite, ref_idx, -1)), msg
        assert (res.top_idx[~torch.isfinite(res.top_vals)] == -1).all(), msg  # missing candidates
        assert torch.isneginf(res.top_vals[len(ref_vals):]).all(), msg  # fewer rows than k

        if shift:
            row_max = res.maxes.amax(0)
            total = (res.sums * torch.exp2(res.maxes - row_max)).sum(0)
            torch.testing.assert_close(row_max, logits2.amax(0), msg=msg)
        else:
            row_max, total = torch.zeros(batch), res.sums.sum(0)
        torch.testing.assert_close(total, torch.exp2(logits2 - row_max).sum(0), rtol=1e-5, atol=0, msg=msg)


@needs_triton
def test_scan_topk_and_sum_match_torch(monkeypatch):
    """The kernel's in-tile top-k (own row excluded, 3 row splits merged) equals torch.topk on the
    dense logits (ties avoided), and its split sums add up to the dense sum of exp2."""
    _interpreted(monkeypatch, _check_scan_topk, 1)


def test_fused_option_errors(monkeypatch):
    with pytest.raises(ValueError, match="fused must be one of"):
        ShardedInstanceClassifier(N, D, fused="sometimes")
    with pytest.raises(ConfigError, match="classifier.fused"):
        load_config(None, ["classifier.fused=sometimes"])
    # auto never picks the kernels on CPU: the default CPU path is the block loops
    assert not classifier_module._use_fused("auto", torch.device("cpu"), D)
    if classifier_module._triton_available():  # on CPU the kernels run only in the interpreter
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        clf = ShardedInstanceClassifier(N, D, fused="always")
        with pytest.raises(ConfigError, match="classifier.fused=always on CPU .* TRITON_INTERPRET"):
            clf(torch.randn(3, D), torch.tensor([0, 1, 2]))
    monkeypatch.setattr(classifier_module, "_triton_available", lambda: False)
    with pytest.raises(ConfigError, match="classifier.fused=always needs triton"):
        ShardedInstanceClassifier(N, D, fused="always")
    assert not classifier_module._use_fused("auto", torch.device("cuda"), D)


# --------------------------------------------------------------------------- CUDA only
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda_only
def test_fused_fp32_matches_reference_on_cuda():
    """The compiled kernels, fp32 operands: the unfused tolerance (1e-5 of the largest entry)."""
    dev = torch.device("cuda")
    for case_no, (k, eps, temp) in enumerate(CASES):
        _, feats, ids, weight = _case(1, case_no)
        clf = ShardedInstanceClassifier(N, D, temperature=temp, fused="always").to(dev)
        with torch.no_grad():
            clf.weight.copy_(weight)
        mine = feats.to(dev).requires_grad_()
        loss = clf(mine, ids.to(dev), smoothing_k=k, smoothing_eps=eps)
        loss.backward()
        ref_feats, ref_w = feats.to(dev).requires_grad_(), weight.to(dev).requires_grad_()
        ref = reference_loss(ref_feats, ref_w, ids.to(dev), temp, k, eps)
        ref.backward()
        msg = f"cuda fused case {case_no} (k={k}, eps={eps}, T={temp})"
        assert_close_rel(loss.detach(), ref.detach(), msg)
        assert_close_rel(mine.grad, ref_feats.grad, msg)
        assert_close_rel(clf.weight.grad, ref_w.grad, msg)


def _step_with_peak(clf, feats, ids):
    """(loss, features' grad, weight grad, peak bytes allocated beyond what existed before)."""
    clf.weight.grad = None
    mine = feats.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = clf(mine, ids, smoothing_k=5, smoothing_eps=0.1)
    loss.backward()
    torch.cuda.synchronize()
    return loss.detach(), mine.grad.float(), clf.weight.grad, torch.cuda.max_memory_allocated() - before


@cuda_only
def test_fused_bf16_close_to_unfused_and_lean_on_cuda():
    """N = 100k, B = 512, bf16 autocast: the fused layer (bf16 operands, fp32 accumulation) against
    the unfused one (fp32 GEMMs on the same bf16 features), and its peak extra memory.

    Tolerances: bf16 keeps 8 significant bits (unit roundoff 2^-9), so a logit (|z| <= 1/T = 10)
    carries an error of order 1e-2 and exp(z) one of order 1%; the loss averages these out. The
    K = 5 hard negatives can swap between candidates closer than that error, and a swapped id moves
    eps / K of a sample's target mass: both gradients are compared at 5% of their largest entry.
    Not yet run on a GPU when written: adjust with measured errors, keeping the reasons."""
    dev = torch.device("cuda")
    n, batch, dim = 100_000, 512, 128
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(batch, dim, generator=gen).to(dev, torch.bfloat16)
    ids = torch.randint(0, n, (batch,), generator=gen).to(dev)
    fused = ShardedInstanceClassifier(n, dim, temperature=0.1, fused="always").to(dev)
    unfused = ShardedInstanceClassifier(n, dim, temperature=0.1, fused="never").to(dev)
    unfused.load_state_dict(fused.state_dict())

    got = _step_with_peak(fused, feats, ids)
    want = _step_with_peak(unfused, feats, ids)
    assert_close_rel(got[0], want[0], "bf16 loss", rel=5e-3)
    assert_close_rel(got[1], want[1], "bf16 grad_features", rel=5e-2)
    assert_close_rel(got[2], want[2], "bf16 grad_weight", rel=5e-2)
    # the fused step holds the [n, D] fp32 weight gradient and O(splits B D) partials (about 17 MB
    # here on an H200: 66 row splits), never [n, B] logits (205 MB here)
    logits_bytes, grad_bytes = n * batch * 4, n * dim * 4
    assert got[3] < grad_bytes + logits_bytes // 4, (got[3], grad_bytes, logits_bytes)
    assert want[3] > logits_bytes  # the unfused step keeps its logits: the comparison means something


# --------------------------------------------------------------------------- compiled, without a GPU
def _compile_cases(torch_dtype):
    """(kernel, signature, constexprs, Tiles) of every kernel for operands of ``torch_dtype`` with
    the default CUDA tiles, D = 128, K = 5, shifted (the paths with the most code)."""
    from ifc_ds import fused_loss

    tiles = fused_loss.default_tiles(torch.device("cuda"), torch_dtype)
    op = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}[torch_dtype]
    prec = fused_loss._dot_precision(torch_dtype)
    f32, i32 = "*fp32", "i32"
    common = dict(BLOCK_B=tiles.block_b, BLOCK_D=128, PRECISION=prec, SHIFT=True)
    scan_sig = dict(w_ptr=f32, scale_ptr=f32, f_ptr=op, own_ptr="*i32", sum_ptr=f32, max_ptr=f32, top_val_ptr=f32,
                    top_idx_ptr="*i32", n_rows=i32, B=i32, D=i32, rows_per_split=i32, stride_w=i32, stride_f=i32)
    gw_sig = dict(w_ptr=f32, scale_ptr=f32, inv_norm_ptr=f32, f_ptr=op, shift_ptr=f32, row_scale_ptr=f32, gw_ptr=f32,
                  n_rows=i32, B=i32, D=i32, inv_temperature="fp32", stride_w=i32, stride_f=i32, stride_gw=i32)
    gf_sig = dict(w_ptr=f32, scale_ptr=f32, f_ptr=op, shift_ptr=f32, row_scale_ptr=f32, gf_ptr=f32,
                  n_rows=i32, B=i32, D=i32, rows_per_split=i32, stride_w=i32, stride_f=i32)
    bf16_p = torch_dtype == torch.bfloat16
    return tiles, [
        (fused_loss._scan_kernel, scan_sig, dict(common, K=5, K_PAD=8, BLOCK_N=tiles.block_n)),
        (fused_loss._grad_weight_kernel, gw_sig, dict(common, BF16_P=bf16_p, BLOCK_N=tiles.grad_block_n)),
        (fused_loss._grad_features_kernel, gf_sig, dict(common, BF16_P=bf16_p, BLOCK_N=tiles.block_n)),
    ]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_kernels_compile_for_hopper(dtype):
    """The interpreter accepts code that the compiler rejects (e.g. a loop-carried name that changes
    type): compile every kernel down to an sm_90a cubin, which needs no GPU, and check that its shared
    memory fits a block (227 KB on H100 / H200)."""
    import os

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("the kernels are interpreted in this process")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    tiles, cases = _compile_cases(dtype)
    for kernel, signature, constexprs in cases:
        signature = dict(signature, **{name: "constexpr" for name in constexprs})
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages))
        assert "cubin" in compiled.asm
        assert compiled.metadata.shared <= 227 * 1024, (kernel.__name__, compiled.metadata.shared)
