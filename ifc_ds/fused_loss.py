"""Triton kernels for the sharded instance loss that never write the ``[n, B]`` logits.

The unfused path in :mod:`ifc_ds.classifier` writes this rank's ``[n, B]`` logits (class-major),
then streams them through exp / sum / top-K passes and two backward GEMMs: on an accelerator those
element-wise passes are memory-bound and cost far more than the GEMMs. Here every pass works on
tiles of (rows x batch) that live only in on-chip memory (as Apple's Cut Cross-Entropy and Liger
Kernel's fused linear cross-entropy do for language models), adapted to what this loss needs:

* cosine logits: the weight rows are scaled in the kernel by ``col_scale2 = log2(e) / (|w_c| T)``
  (so the logits come out in base-2 units and the exponential is ``exp2``), the features are
  already unit vectors;
* a sharded log-sum-exp: the kernels return per-split partial sums, and the caller all-reduces;
* top-K hard negatives per sample, excluding the sample's own row, found inside the scan: each
  program keeps K running candidates per column and moves a tile's best candidates in by rounds
  of max / argmax / mask, only while some column of the tile improves (most tiles: no round once
  the candidates are good; at most K); torch merges the splits' candidates;
* backward recomputes each tile (no kept logits) and applies the dense softmax part; the K + 1
  sparse targets stay in torch (they touch (K + 1) B entries).

Kernels (shapes: ``n`` rows of this shard, ``B`` gathered batch, ``D`` feature dim):

``scan``            forward: sum of exp2 (and the running max when shifted) and top-K candidates.
``dense_backward``  backward: ``grad_features`` and ``grad_weight`` of the dense softmax term.

Operand dtypes: the GEMM operands are the feature operand's dtype (bf16 / fp16 under autocast, or
fp32) with fp32 accumulation; fp32 operands use ``input_precision="ieee"`` (no TF32), so the fp32
path matches the unfused one to rounding. Softmax probabilities are GEMM operands in backward only
as bf16 (same exponent range as fp32) or fp32: fp16 cannot hold ``exp(1/T)`` nor ``1/N``.

Determinism: no atomics. Each program owns a (batch tile, row split) or a row tile and writes its
own partial; the partials are reduced in torch in a fixed order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["Tiles", "default_tiles", "scan", "dense_backward", "ScanResult"]


@dataclass(frozen=True)
class Tiles:
    """Tile shape of the kernels. ``block_n`` rows x ``block_b`` samples per tile (``grad_block_n``
    rows in the grad-weight kernel, whose program also holds a ``[rows, D]`` fp32 accumulator); the
    feature dim is one tile of ``next_pow2(D)`` columns (D <= 512: the classifier's D is 128).
    ``splits`` row splits per batch tile (None: enough programs to fill the device)."""

    block_n: int = 128
    block_b: int = 64
    grad_block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2
    splits: int | None = None


# GPU tiles, chosen without a GPU (not tuned): the largest tiles for which ptxas (sm_90a, D = 128)
# reported no spills, or the fewest, with shared memory well under H100/H200's 227 KB per block.
# 16-bit operands: a [128, 64] logits tile per program, the [64, D] feature tile resident across the
# row loop (scan: 83 KB shared, grad_features: 131 KB). fp32 operands ("ieee": FMA, no tensor
# cores) need smaller tiles and one stage (the backward kernels still spill ~2 KB per thread).
_CUDA_TILES = Tiles(block_n=128, block_b=64, grad_block_n=64, num_warps=8, num_stages=2)
_CUDA_TILES_FP32 = Tiles(block_n=64, block_b=64, grad_block_n=32, num_warps=8, num_stages=1)
# The interpreter (TRITON_INTERPRET=1, CPU tests): the smallest tiles tl.dot accepts, so that small
# test shapes already span several tiles and splits.
_INTERPRETER_TILES = Tiles(block_n=16, block_b=16, grad_block_n=16, num_warps=1, num_stages=1, splits=2)

MAX_DIM = 512  # the whole feature dim is one tile: larger D would need a loop over D chunks


def default_tiles(device: torch.device, dtype: torch.dtype) -> Tiles:
    """Tiles for operands of ``dtype`` on ``device`` (CPU: the interpreter)."""
    if device.type != "cuda":
        return _INTERPRETER_TILES
    return _CUDA_TILES_FP32 if dtype == torch.float32 else _CUDA_TILES


def _dim_block(dim: int) -> int:
    if dim > MAX_DIM:
        raise ValueError(f"the fused classifier kernels hold the whole feature dim in one tile: D={dim} > {MAX_DIM}")
    return max(16, triton.next_power_of_2(dim))  # tl.dot needs every dimension >= 16


def _row_splits(n_rows: int, batch_tiles: int, tiles: Tiles, device: torch.device) -> tuple[int, int]:
    """(splits, rows per split): rows per split are a multiple of ``block_n`` and no split is empty.
    Without an explicit count, about 4 programs per streaming multiprocessor."""
    row_tiles = triton.cdiv(n_rows, tiles.block_n)
    if tiles.splits is not None:
        splits = tiles.splits
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        splits = triton.cdiv(4 * sms, batch_tiles)
    splits = max(1, min(splits, row_tiles))
    rows_per_split = triton.cdiv(row_tiles, splits) * tiles.block_n
    return triton.cdiv(n_rows, rows_per_split), rows_per_split


def _dot_precision(dtype: torch.dtype) -> str:
    # "ieee" keeps fp32 operands exact (no TF32); for 16-bit operands the setting does not apply
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------- shared tile helpers
@triton.jit
def _scaled_weight_tile(w_ptr, scale_ptr, rows, row_mask, offs_d, d_mask, stride_w):
    """Two [BLOCK_N, BLOCK_D] fp32 tiles: the raw rows ``w_c`` and the scaled ``w_c * col_scale2_c``
    (zero outside the shard / D). Scaling here, not in torch, saves an [n, D] copy of the weight."""
    offs = rows.to(tl.int64)[:, None] * stride_w + offs_d[None, :]
    w = tl.load(w_ptr + offs, mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
    return w, w * scale[:, None]


@triton.jit
def _feature_tile(f_ptr, cols, col_mask, offs_d, d_mask, stride_f):
    """[BLOCK_B, BLOCK_D] tile of features in the operand dtype (zero outside B / D)."""
    offs = cols.to(tl.int64)[:, None] * stride_f + offs_d[None, :]
    return tl.load(f_ptr + offs, mask=col_mask[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _program_batch_tile(f_ptr, B, D, stride_f, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """The batch tile of a (batch tile ``program_id(0)`` x row split) program: its columns, their
    mask, the feature-dim offsets and mask, and the ``[BLOCK_B, BLOCK_D]`` features, resident for the
    whole split."""
    cols = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    col_mask = cols < B
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    return cols, col_mask, offs_d, d_mask, _feature_tile(f_ptr, cols, col_mask, offs_d, d_mask, stride_f)


# --------------------------------------------------------------------------- forward scan
@triton.jit
def _scan_kernel(w_ptr, scale_ptr, f_ptr, own_ptr, sum_ptr, max_ptr, top_val_ptr, top_idx_ptr,
                 n_rows, B, D, rows_per_split, stride_w, stride_f,
                 SHIFT: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr):
    """One program: batch tile ``program_id(0)`` x row split ``program_id(1)``.

    Writes, per column b of its batch tile (``[splits, B]`` / ``[splits, K, B]`` outputs):
      sum_ptr   sum over the split's rows of exp2(logits2) (SHIFT: exp2(logits2 - the split's max))
      max_ptr   SHIFT only: the split's max of logits2 (online log-sum-exp, as flash attention)
      top_*     K: the K largest logits2 of the split other than the column's own row, and their rows
    """
    split = tl.program_id(1)
    cols, col_mask, offs_d, d_mask, f = _program_batch_tile(f_ptr, B, D, stride_f, BLOCK_B, BLOCK_D)
    row_lo = split * rows_per_split
    row_hi = tl.minimum(row_lo + rows_per_split, n_rows)
    tile_rows = tl.arange(0, BLOCK_N)

    run_sum = tl.zeros([BLOCK_B], dtype=tl.float32)
    run_max = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    # the running top-K per column: slots >= K are padding at +inf, so they are never the minimum
    # that a new candidate replaces
    slots = tl.arange(0, K_PAD)
    top_val = tl.where(slots[:, None] < K, float("-inf"), float("inf")) + tl.zeros([K_PAD, BLOCK_B], tl.float32)
    top_idx = tl.full([K_PAD, BLOCK_B], -1, dtype=tl.int32)
    own = tl.load(own_ptr + cols, mask=col_mask, other=-1)

    for r0 in range(row_lo, row_hi, BLOCK_N):
        rows = r0 + tile_rows
        row_mask = rows < row_hi
        w2 = _scaled_weight_tile(w_ptr, scale_ptr, rows, row_mask, offs_d, d_mask, stride_w)[1]
        logits = tl.dot(w2.to(f.dtype), tl.trans(f), input_precision=PRECISION)  # [BLOCK_N, BLOCK_B] fp32
        masked = tl.where(row_mask[:, None], logits, float("-inf"))
        if SHIFT:  # rescale the running sum to the new running max
            new_max = tl.maximum(run_max, tl.max(masked, axis=0))
            run_sum = run_sum * tl.exp2(run_max - new_max) + tl.sum(tl.exp2(masked - new_max[None, :]), axis=0)
            run_max = new_max
        else:  # cosine logits are bounded by 1/T <= 40: no overflow, no max needed
            run_sum += tl.sum(tl.exp2(masked), axis=0)

        if K > 0:
            cand = tl.where(rows[:, None] == own[None, :], float("-inf"), masked)  # not its own row
            # Rounds of: each column's best remaining candidate of the tile replaces its worst slot
            # where it beats it. The rounds stop when no column improves: at once for most tiles once
            # the candidates are good, after at most K rounds (the tile's K best are then in).
            best, at = tl.max(cand, axis=0, return_indices=True)
            worst, slot = tl.min(top_val, axis=0, return_indices=True)
            rounds = tl.full([], 0, tl.int32)
            while (rounds < K) & (tl.max((best > worst).to(tl.int32), axis=0) > 0):
                hit = (slots[:, None] == slot[None, :]) & (best > worst)[None, :]
                top_val = tl.where(hit, best[None, :], top_val)
                top_idx = tl.where(hit, (r0 + at)[None, :], top_idx)
                cand = tl.where(tile_rows[:, None] == at[None, :], float("-inf"), cand)
                best, at = tl.max(cand, axis=0, return_indices=True)
                worst, slot = tl.min(top_val, axis=0, return_indices=True)
                rounds += 1

    out = split * B + cols
    tl.store(sum_ptr + out, run_sum, mask=col_mask)
    if SHIFT:
        tl.store(max_ptr + out, run_max, mask=col_mask)
    if K > 0:
        top_offs = (split * K + slots[:, None]) * B + cols[None, :]
        top_mask = (slots[:, None] < K) & col_mask[None, :]
        tl.store(top_val_ptr + top_offs, top_val, mask=top_mask)
        tl.store(top_idx_ptr + top_offs, top_idx, mask=top_mask)


@dataclass
class ScanResult:
    """What ``scan`` returns (base-2 units).

    sums      [splits, B] fp32: per row split, sum of exp2(logits2) (shifted: minus that split's max)
    maxes     [splits, B] fp32 split maxima (shifted scans only, else None)
    top_vals  [k, B] fp32: the k largest logits2 of this shard per sample, own row excluded; -inf
              where the shard has fewer than k other rows
    top_idx   [k, B] int64 local rows of ``top_vals`` (-1 with -inf)
    """

    sums: torch.Tensor
    maxes: torch.Tensor | None
    top_vals: torch.Tensor
    top_idx: torch.Tensor


def scan(weight: torch.Tensor, col_scale2: torch.Tensor, features: torch.Tensor, own_rows: torch.Tensor,
         k: int, shift: bool, tiles: Tiles | None = None) -> ScanResult:
    """The forward pass over this shard, without writing logits2 = ``(w * col_scale2) @ features.T``.

    Args:
        weight: ``[n, D]`` the shard's rows (any float dtype; read as fp32, scaled, cast to the operand dtype).
        col_scale2: ``[n]`` fp32, ``log2(e) / (|w_c| T)``.
        features: ``[B, D]`` unit features in the GEMM operand dtype (fp32, bf16 or fp16).
        own_rows: ``[B]`` int, the local row of each sample's own id, -1 where another rank owns it;
            excluded from the top-k (not from the sum).
        k: top-k candidates to find (0: none).
        shift: True for a running max per split (needed when 1/T > 40), else plain sums.
    """
    n_rows, dim = weight.shape
    batch = features.shape[0]
    device = features.device
    tiles = tiles or default_tiles(device, features.dtype)
    weight, features = weight.contiguous(), features.contiguous()
    batch_tiles = triton.cdiv(batch, tiles.block_b)
    splits, rows_per_split = _row_splits(n_rows, batch_tiles, tiles, device)
    sums = torch.empty(splits, batch, device=device, dtype=torch.float32)
    maxes = torch.empty_like(sums) if shift else sums  # unused pointer when not shifted
    k_pad = max(2, triton.next_power_of_2(k)) if k else 2
    top_vals = torch.empty(splits, max(k, 1), batch, device=device, dtype=torch.float32)
    top_idx = torch.empty(splits, max(k, 1), batch, device=device, dtype=torch.int32)
    own = own_rows.to(device=device, dtype=torch.int32).contiguous()
    _scan_kernel[(batch_tiles, splits)](
        weight, col_scale2.float().contiguous(), features, own, sums, maxes, top_vals, top_idx,
        n_rows, batch, dim, rows_per_split, weight.stride(0), features.stride(0),
        SHIFT=shift, K=k, K_PAD=k_pad, BLOCK_N=tiles.block_n, BLOCK_B=tiles.block_b,
        BLOCK_D=_dim_block(dim), PRECISION=_dot_precision(features.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    if k:  # merge the splits' candidates: [splits * k, B] -> the best k
        vals, pos = torch.topk(top_vals.reshape(splits * k, batch), k, dim=0)
        idx = torch.gather(top_idx.reshape(splits * k, batch), 0, pos).long()
    else:
        vals = features.new_empty((0, batch), dtype=torch.float32)
        idx = torch.empty((0, batch), device=device, dtype=torch.int64)
    return ScanResult(sums=sums, maxes=maxes if shift else None, top_vals=vals, top_idx=idx)


# --------------------------------------------------------------------------- backward
@triton.jit
def _softmax_tile(w2, f, shift_ptr, scale_ptr, cols, col_mask, SHIFT: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_N, BLOCK_B] ``exp2(logits2 - shift_b) * row_scale_b``: softmax x d loss / d logit,
    recomputed (zero for the columns outside B)."""
    logits = tl.dot(w2.to(f.dtype), tl.trans(f), input_precision=PRECISION)
    if SHIFT:
        logits -= tl.load(shift_ptr + cols, mask=col_mask, other=0.0)[None, :]
    row_scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
    return tl.exp2(logits) * row_scale[None, :]


@triton.jit
def _grad_weight_kernel(w_ptr, scale_ptr, inv_norm_ptr, f_ptr, shift_ptr, row_scale_ptr, gw_ptr,
                        n_rows, B, D, inv_temperature, stride_w, stride_f, stride_gw,
                        SHIFT: tl.constexpr, BF16_P: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
    """One program per row tile: ``g_c = sum_b p[c, b] f_b`` over all batch tiles (no atomics), then
    through the weight normalisation, ``(g - u <u, g>) / (|w| T)`` with ``u = w / |w|``, as
    ``classifier._through_weight_norm``."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    w2 = _scaled_weight_tile(w_ptr, scale_ptr, rows, row_mask, offs_d, d_mask, stride_w)[1]
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        cols = b0 + tl.arange(0, BLOCK_B)
        col_mask = cols < B
        f = _feature_tile(f_ptr, cols, col_mask, offs_d, d_mask, stride_f)
        p = _softmax_tile(w2, f, shift_ptr, row_scale_ptr, cols, col_mask, SHIFT, PRECISION)
        if BF16_P:
            acc += tl.dot(p.to(tl.bfloat16), f.to(tl.bfloat16))
        else:
            acc += tl.dot(p, f.to(tl.float32), input_precision="ieee")
    w = _scaled_weight_tile(w_ptr, scale_ptr, rows, row_mask, offs_d, d_mask, stride_w)[0]  # reloaded: not
    inv_norm = tl.load(inv_norm_ptr + rows, mask=row_mask, other=0.0)  # kept in registers over the loop
    radial = tl.sum(acc * w, axis=1) * inv_norm * inv_norm
    grad = (acc - w * radial[:, None]) * (inv_norm * inv_temperature)[:, None]
    offs = rows.to(tl.int64)[:, None] * stride_gw + offs_d[None, :]
    tl.store(gw_ptr + offs, grad, mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _grad_features_kernel(w_ptr, scale_ptr, f_ptr, shift_ptr, row_scale_ptr, gf_ptr,
                          n_rows, B, D, rows_per_split, stride_w, stride_f,
                          SHIFT: tl.constexpr, BF16_P: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                          PRECISION: tl.constexpr):
    """Batch tile ``program_id(0)`` x row split ``program_id(1)``: the split's partial
    ``sum_c p[c, b] w2_c`` into ``gf_ptr[split]`` (``[splits, B, D]``, summed in torch)."""
    split = tl.program_id(1)
    cols, col_mask, offs_d, d_mask, f = _program_batch_tile(f_ptr, B, D, stride_f, BLOCK_B, BLOCK_D)
    row_scale = tl.load(row_scale_ptr + cols, mask=col_mask, other=0.0)
    if SHIFT:
        shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)
    row_lo = split * rows_per_split
    row_hi = tl.minimum(row_lo + rows_per_split, n_rows)
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for r0 in range(row_lo, row_hi, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_mask = rows < row_hi
        # rows outside the split are zero in w2, so they add nothing below
        w2 = _scaled_weight_tile(w_ptr, scale_ptr, rows, row_mask, offs_d, d_mask, stride_w)[1]
        # the tile transposed, [BLOCK_B, BLOCK_N], so that p^T is the next dot's left operand as is
        # (a transposed fp32 operand made ptxas spill heavily)
        logits_t = tl.dot(f, tl.trans(w2.to(f.dtype)), input_precision=PRECISION)
        if SHIFT:
            logits_t -= shift[:, None]
        p_t = tl.exp2(logits_t) * row_scale[:, None]
        if BF16_P:
            acc += tl.dot(p_t.to(tl.bfloat16), w2.to(tl.bfloat16))
        else:
            acc += tl.dot(p_t, w2, input_precision="ieee")
    offs = (split * B + cols.to(tl.int64))[:, None] * D + offs_d[None, :]
    tl.store(gf_ptr + offs, acc, mask=col_mask[:, None] & d_mask[None, :])


def dense_backward(weight: torch.Tensor, col_scale2: torch.Tensor, inv_norm: torch.Tensor,
                   temperature: float, features: torch.Tensor, shift: torch.Tensor | None,
                   row_scale: torch.Tensor, tiles: Tiles | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense (softmax) part of the backward, recomputing the logits tile by tile.

    With ``p[c, b] = exp2(logits2[c, b] - shift_b) * row_scale_b`` (softmax x d loss / d logit; the
    caller's ``row_scale = grad / (B sum_exp)``):

    Returns:
        grad_features ``[B, D]`` fp32: ``sum_c p[c, b] w_c / (|w_c| T)`` (natural units).
        grad_weight ``[n, D]`` fp32: ``sum_b p[c, b] f_b`` taken through the weight normalisation.

    Args: weight ``[n, D]``, col_scale2 / inv_norm ``[n]`` fp32, features ``[B, D]`` unit, in the operand
    dtype, shift ``[B]`` fp32 base-2 row maxima or None, row_scale ``[B]`` fp32.
    """
    n_rows, dim = weight.shape
    batch = features.shape[0]
    device = features.device
    tiles = tiles or default_tiles(device, features.dtype)
    weight, features = weight.contiguous(), features.contiguous()
    col_scale2, inv_norm = col_scale2.float().contiguous(), inv_norm.float().contiguous()
    row_scale = row_scale.float().contiguous()
    shift_t = shift.float().contiguous() if shift is not None else row_scale  # unused pointer without shift
    consts = dict(SHIFT=shift is not None, BF16_P=features.dtype == torch.bfloat16,
                  BLOCK_B=tiles.block_b, BLOCK_D=_dim_block(dim),
                  PRECISION=_dot_precision(features.dtype), num_warps=tiles.num_warps,
                  num_stages=tiles.num_stages)

    grad_weight = torch.empty(n_rows, dim, device=device, dtype=torch.float32)
    _grad_weight_kernel[(triton.cdiv(n_rows, tiles.grad_block_n),)](
        weight, col_scale2, inv_norm, features, shift_t, row_scale, grad_weight,
        n_rows, batch, dim, 1.0 / temperature, weight.stride(0), features.stride(0), grad_weight.stride(0),
        BLOCK_N=tiles.grad_block_n, **consts)

    batch_tiles = triton.cdiv(batch, tiles.block_b)
    splits, rows_per_split = _row_splits(n_rows, batch_tiles, tiles, device)
    partials = torch.empty(splits, batch, dim, device=device, dtype=torch.float32)
    _grad_features_kernel[(batch_tiles, splits)](
        weight, col_scale2, features, shift_t, row_scale, partials,
        n_rows, batch, dim, rows_per_split, weight.stride(0), features.stride(0), BLOCK_N=tiles.block_n, **consts)
    # the kernel summed p * w2 in base-2 units: d logit / d f = w / (|w| T) = w2 / log2(e)
    grad_features = partials.sum(0).mul_(1.0 / math.log2(math.e))
    return grad_features, grad_weight
