"""Row-sharded instance classifier with an exact distributed softmax cross-entropy.

Every training image ``i`` (``0 <= i < N``) is its own class.  The ``[N, D]`` weight is split by
rows over the ranks of a process group; each rank scores the *all-gathered* features of the global
batch against its own rows only, and the softmax normaliser, the positive logit and the top-K hard
negatives are combined with small collectives (``[B]`` and ``[B, K]`` tensors).  The full
``[B, N]`` logits matrix never exists on one rank.

No library ships this layer (Megatron's vocab-parallel cross-entropy assumes replicated inputs and
no cosine normalisation; Partial FC samples classes), so it is written by hand here, and nothing
else in ``ifc_ds`` does numerics by hand.

Example::

    clf = ShardedInstanceClassifier(num_instances=1_000_000, dim=128, temperature=0.1)
    loss = clf(features, instance_ids, smoothing_k=5, smoothing_eps=0.1)   # same on every rank
    loss.backward()   # features.grad = world_size x reference; clf.weight.grad = own rows

Numerics (all fp32, whatever the autocast dtype):
  ``z[b, i] = <f_b / |f_b|, w_i / |w_i|> / T`` for the gathered batch ``b`` and owned rows ``i``.
  Targets ``1 - eps`` on the own id and ``eps / K`` on the K highest-logit *other* ids (chosen
  globally, constants for autograd). ``loss = mean_b [logsumexp_i z[b, i] - sum_i t[b, i] z[b, i]]``.
  Because the logits are cosines, ``|z| <= 1/T``; for ``1/T <= 40`` the exponentials cannot
  overflow fp32 even summed over 4e9 classes, so no row maximum is needed (one pass and one
  collective saved). Smaller temperatures use the classic running row maximum.

Fused path (``fused=``, CUDA by default): the same loss by the Triton kernels of
``ifc_ds.fused_loss``, which never write the ``[N/P, B]`` logits; their GEMM operands follow the
autocast dtype (bf16: fp32 accumulation, results within bf16 rounding of the fp32 path).
"""

from __future__ import annotations

import importlib.util
import math
import os
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ifc_ds.collectives import all_gather_equal, all_gather_rows, all_reduce_, rank_in, size
from ifc_ds.config import ConfigError

# exp(1/T) * N must stay below fp32's max (3.4e38): 1/T <= 40 leaves room for N up to ~1e20.
_MAX_UNSHIFTED_INV_TEMPERATURE = 40.0
# Logits are produced in base-2 units (z * log2 e) so the exponential is exp2, twice as fast as exp
# on CPU; only [B]- and [k, B]-sized results are converted back.
_LOG2E = math.log2(math.e)


def shard_range(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, end)`` owned by ``rank`` when ``num_rows`` are split as evenly as possible."""
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass
class _BatchLayout:
    """Who sent which rows of the gathered batch; exchanged once per step (the one host sync)."""

    sizes: list[int]
    rank: int

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def own_slice(self) -> slice:
        start = sum(self.sizes[: self.rank])
        return slice(start, start + self.sizes[self.rank])


def _exchange_layout(batch: int, dim: int, bad_ids: torch.Tensor, expected_dim: int, group, rank: int,
                     device) -> _BatchLayout:
    """All-gathers ``(B_local, D_local, any bad id)`` so every rank raises the same error together
    instead of one rank raising while the others wait in a collective. As fp32 (small integers are
    exact there), so that the gather can go through the node sum (``ifc_ds.collectives``)."""
    info = torch.stack([torch.tensor(float(batch), device=device), torch.tensor(float(dim), device=device),
                        bad_ids.to(device=device, dtype=torch.float32)])
    table = [[int(value) for value in row] for row in all_gather_equal(info, group).tolist()]
    for r, (_, d, bad) in enumerate(table):
        if d != expected_dim:
            raise ValueError(f"features on rank {r} have dim {d}, the classifier expects {expected_dim}")
        if bad:
            raise ValueError(f"instance_ids on rank {r} are outside [0, num_instances)")
    return _BatchLayout(sizes=[row[0] for row in table], rank=rank)


_EXACT_FLOAT_IDS = 1 << 24  # every integer up to 2^24 is exact in fp32


def _gather_ids(ids: torch.Tensor, group, num_instances: int, sizes: list[int] | None = None) -> torch.Tensor:
    """Every rank's int64 ids in rank order: ``[B_r]`` rows concatenated (``sizes`` given, uneven), or
    ``[P, *S]`` (equal shapes). Up to 2^24 instances they travel as fp32 (exact there), so that the
    gather can go through the node sum instead of a gloo all-gather."""
    if num_instances <= _EXACT_FLOAT_IDS:
        ids = ids.float()
    every = all_gather_equal(ids, group) if sizes is None else all_gather_rows(ids, sizes, group)
    return every.long()


class _GatherFeatures(torch.autograd.Function):
    """All-gathers ``[B_local, D]`` -> ``[B_global, D]``.

    Backward: every rank holds only its shard's part of d(loss)/d(gathered features), so the parts are
    summed over the group and each rank keeps its own rows, times the world size: DeepSpeed then
    *averages* backbone gradients over ranks, which yields exactly the global-batch gradient.
    """

    @staticmethod
    def forward(ctx, features, layout: _BatchLayout, group, world_size: int):
        ctx.layout, ctx.group, ctx.world_size = layout, group, world_size
        return all_gather_rows(features, layout.sizes, group)

    @staticmethod
    def backward(ctx, grad_all):
        grad_all = all_reduce_(grad_all.contiguous(), dist.ReduceOp.SUM, ctx.group)
        return grad_all[ctx.layout.own_slice()] * ctx.world_size, None, None, None


# --------------------------------------------------------------------------- the sharded loss
@dataclass
class _LossSpec:
    temperature: float
    row_start: int
    smoothing_k: int
    smoothing_eps: float
    search_k: int  # top-K other classes to find: K for smoothing, or 1 to measure accuracy
    block: int  # classes scored per GEMM block
    keep_logits: bool  # True: keep exp(logits) for backward; False: recompute block by block
    group: object
    fused: bool = False  # the Triton kernels of ifc_ds.fused_loss instead of the block loops
    operand_dtype: torch.dtype = torch.float32  # fused only: GEMM operand dtype (fp32 accumulation)
    num_instances: int = 1 << 62  # N: the candidates' ids travel as fp32 up to 2^24 (_gather_ids)


def _block_size(batch: int, chunk_size: int | None, device: torch.device) -> int:
    """Classes per block. On CPU ~2 MB of fp32 logits, so each block's exp / sum / top-K run while the
    GEMM's output is still in cache (and ``chunk_size`` caps it in memory-lean mode). On an
    accelerator the whole shard, or ``chunk_size``: there, small blocks only add kernel launches."""
    if device.type != "cpu":
        return chunk_size or (1 << 62)
    cache_block = max(256, (1 << 19) // max(batch, 1))
    return min(chunk_size, cache_block) if chunk_size else cache_block


def _blocks(num_rows: int, block: int):
    for start in range(0, num_rows, block):
        yield start, min(start + block, num_rows)


def _merge_topk(best_vals, best_idx, vals, idx, k: int):
    """Keeps the ``k`` largest of two candidate sets ``[k', B]`` (values, global ids)."""
    vals, idx = torch.cat([best_vals, vals]), torch.cat([best_idx, idx])
    vals, pos = torch.topk(vals, min(k, vals.shape[0]), dim=0, sorted=False)
    return vals, torch.gather(idx, 0, pos)


class LogitsWorkspace:
    """Buffers kept across steps (``view``): a fresh ``[N/P, B]`` allocation every step costs more in
    first-touch page faults than the GEMM writing it.

    The kept exp-logits (``"logits"``) are *claimed* by the forward that writes them and *released*
    by its backward, or when that graph is dropped without a backward (a skipped non-finite step):
    the claim is a weak reference to the autograd context, so a dropped graph releases it by itself.
    While claimed, the next forward recomputes blocks instead of overwriting them."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}
        self._owner = None

    def view(self, name: str, shape: tuple[int, int], device) -> torch.Tensor:
        numel = shape[0] * shape[1]
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.device != device:
            buf = self.buffers[name] = torch.empty(numel, device=device)
        return buf[:numel].view(shape)

    def claim(self, ctx) -> None:
        self._owner = weakref.ref(ctx)

    def release(self) -> None:
        self._owner = None

    def kept_in_use(self) -> bool:
        """The kept logits belong to a graph that is still alive and has not run its backward yet."""
        return self._owner is not None and self._owner() is not None


def _scan_blocks(ctx, workspace: LogitsWorkspace, weight32, col_scale2, features_all, ids_all, local_ids, owned,
                 shift: bool, spec: _LossSpec):
    """The unfused forward over this shard, block by block of ``spec.block`` classes.

    Returns sum_exp ``[B]`` (this shard's, base-2 exponentials shifted by row_max), row_max ``[B]``
    (global, base-2; zeros unless ``shift``), the top-k candidates ``[k', B]`` (base-2 values, global
    ids) and the kept ``[n, B]`` exp-logits buffer (None unless ``spec.keep_logits``).
    """
    batch, n_rows, device = features_all.shape[0], weight32.shape[0], features_all.device
    features_t = features_all.T.contiguous()  # [D, B]
    batch_idx = torch.arange(batch, device=device)
    row_max = torch.zeros(batch, device=device)
    if shift:
        row_max.fill_(-math.inf)
        for c0, c1 in _blocks(n_rows, spec.block):
            logits2 = torch.mm(weight32[c0:c1] * col_scale2[c0:c1, None], features_t)
            row_max = torch.maximum(row_max, logits2.amax(0))
        all_reduce_(row_max, dist.ReduceOp.MAX, spec.group)  # base-2 units

    kept = workspace.view("logits", (n_rows, batch), device) if spec.keep_logits else None
    if kept is not None:
        workspace.claim(ctx)
    k = spec.search_k
    best_vals = features_all.new_empty((0, batch))
    best_idx = ids_all.new_empty((0, batch))
    sum_exp = torch.zeros(batch, device=device)
    for c0, c1 in _blocks(n_rows, spec.block):
        out = kept[c0:c1] if kept is not None else workspace.view("block", (c1 - c0, batch), device)
        logits2 = torch.mm(weight32[c0:c1] * col_scale2[c0:c1, None], features_t, out=out)  # [c, B]
        if k:
            own = owned & (local_ids >= c0) & (local_ids < c1)
            own_rows, own_cols = local_ids[own] - c0, batch_idx[own]
            saved = logits2[own_rows, own_cols]
            logits2[own_rows, own_cols] = -math.inf  # the positive is not a negative
            vals, idx = torch.topk(logits2, min(k, c1 - c0), dim=0, sorted=False)
            best_vals, best_idx = _merge_topk(best_vals, best_idx, vals, idx + (spec.row_start + c0), k)
            logits2[own_rows, own_cols] = saved
        if shift:
            logits2.sub_(row_max)
        sum_exp += logits2.exp2_().sum(0)
    return sum_exp, row_max, best_vals, best_idx, kept


def _fused_scan(weight32, col_scale2, features_all, local_ids, owned, shift: bool, spec: _LossSpec):
    """The fused forward over this shard (``ifc_ds.fused_loss.scan``); returns what ``_scan_blocks``
    does, without the kept buffer. Shifted, each row split of the kernel reports its own maximum
    and a sum relative to it; they are rescaled here to the global maximum (one pass instead of two)."""
    from ifc_ds import fused_loss  # imported on first use: triton is optional

    own_rows = torch.where(owned, local_ids, -1)  # excluded from the top-k
    res = fused_loss.scan(weight32, col_scale2, features_all.to(spec.operand_dtype), own_rows,
                          spec.search_k, shift)
    if shift:
        row_max = all_reduce_(res.maxes.amax(0), dist.ReduceOp.MAX, spec.group)
        sum_exp = (res.sums * torch.exp2(res.maxes - row_max)).sum(0)
    else:
        row_max = torch.zeros_like(res.sums[0])
        sum_exp = res.sums.sum(0)
    best_idx = torch.where(res.top_idx >= 0, res.top_idx + spec.row_start, -1)
    return sum_exp, row_max, res.top_vals, best_idx


def _fused_dense_backward(features_all, weight32, inv_norm, row_max, row_scale, shift: bool, spec: _LossSpec):
    """The dense softmax part of backward by ``ifc_ds.fused_loss.dense_backward``:
    (grad_features ``[B, D]``, grad_weight ``[n, D]`` already through the weight norm), fp32."""
    from ifc_ds import fused_loss

    col_scale2 = inv_norm / spec.temperature * _LOG2E  # as in forward: the scan's logits exactly
    return fused_loss.dense_backward(weight32, col_scale2, inv_norm, spec.temperature,
                                     features_all.to(spec.operand_dtype), row_max if shift else None, row_scale)


class _ShardedSoftmaxCrossEntropy(torch.autograd.Function):
    """Loss of the gathered batch against this rank's rows; see the module docstring.

    forward(features_all [B, D] unit fp32, weight [n, D], ids_all [B], spec, workspace)
        -> (loss [], instance accuracy [])

    Logits are laid out class-major, ``[n, B]``, so a block of classes is a contiguous slab: one
    GEMM writes it, and exp / sum / top-K consume it while it is hot in cache.
    """

    @staticmethod
    def forward(ctx, features_all, weight, ids_all, spec: _LossSpec, workspace: LogitsWorkspace):
        n_rows = weight.shape[0]
        weight32 = weight.detach().float()
        inv_norm = torch.linalg.vector_norm(weight32, dim=1).clamp_min(1e-12).reciprocal_()
        col_scale = inv_norm / spec.temperature  # logit = <f, w_i> * col_scale_i
        local_ids = ids_all - spec.row_start
        owned = (local_ids >= 0) & (local_ids < n_rows)  # exactly one rank owns each id
        local_ids = local_ids.clamp(0, n_rows - 1)

        positive = _global_positive_logits(features_all, weight32, col_scale, local_ids, owned, spec)
        shift = _needs_row_max(spec.temperature)
        sum_exp, row_max, cand_vals, cand_ids, kept = _scan_shard(ctx, workspace, weight32, col_scale * _LOG2E,
                                                                  features_all, ids_all, local_ids, owned, shift,
                                                                  spec)
        log_norm = _global_log_sum_exp(sum_exp, row_max, spec)
        neg_vals, neg_ids = _global_top_k(cand_vals / _LOG2E, cand_ids, spec)
        loss, accuracy = _assemble_loss(log_norm, positive, neg_vals, spec)
        ctx.mark_non_differentiable(accuracy)

        kk = spec.smoothing_k
        ctx.spec, ctx.workspace, ctx.kept = spec, workspace, kept
        ctx.save_for_backward(features_all, weight, ids_all, sum_exp, row_max, inv_norm,
                              neg_ids[:, :kk] if kk else None)
        return loss, accuracy

    @staticmethod
    def backward(ctx, grad_loss, _grad_accuracy):
        features_all, weight, ids_all, sum_exp, row_max, inv_norm, neg_ids = ctx.saved_tensors
        spec = ctx.spec
        batch = features_all.shape[0]
        weight32 = weight.detach().float()
        shift = _needs_row_max(spec.temperature)

        # d loss / d logit[i, b] = (softmax - target) * grad / B. The softmax is exp[i, b] * row_scale[b]:
        # the row scale goes onto the small [B, D] operands instead of a pass over the logits, and the
        # sparse targets are applied to the few rows they touch after the dense block loop.
        row_scale = (grad_loss / batch) / sum_exp
        if spec.fused:
            grad_features, grad_weight = _fused_dense_backward(features_all, weight32, inv_norm, row_max,
                                                               row_scale, shift, spec)
        else:
            grad_features, grad_weight = _dense_backward_blocks(ctx, features_all, weight32, inv_norm, row_max,
                                                                row_scale, shift)
        _subtract_sparse_targets(grad_features, grad_weight, features_all, weight32, inv_norm, ids_all, neg_ids,
                                 spec, grad_loss / batch)
        return grad_features, grad_weight.to(weight.dtype), None, None, None


# --------------------------------------------------------------------------- the loss, step by step
def _needs_row_max(temperature: float) -> bool:
    """Only for tiny T: cosine logits are bounded by 1/T, so exp() cannot overflow above 1/40."""
    return 1.0 / temperature > _MAX_UNSHIFTED_INV_TEMPERATURE


def _global_positive_logits(features_all, weight32, col_scale, local_ids, owned, spec: _LossSpec) -> torch.Tensor:
    """``[B]``: each sample's logit against its own row, from the rank that owns it, summed over ranks."""
    positive = (features_all * weight32[local_ids]).sum(1) * col_scale[local_ids]
    return all_reduce_(torch.where(owned, positive, 0.0), dist.ReduceOp.SUM, spec.group)


def _scan_shard(ctx, workspace, weight32, col_scale2, features_all, ids_all, local_ids, owned, shift: bool,
                spec: _LossSpec):
    """This shard's sum of exponentials, the global row max, and its top-k candidates: one fused
    kernel that never writes the ``[n, B]`` logits, or the block loop (which may keep them)."""
    if spec.fused:
        return (*_fused_scan(weight32, col_scale2, features_all, local_ids, owned, shift, spec), None)
    return _scan_blocks(ctx, workspace, weight32, col_scale2, features_all, ids_all, local_ids, owned, shift, spec)


def _global_log_sum_exp(sum_exp, row_max, spec: _LossSpec) -> torch.Tensor:
    """``[B]`` log of the softmax denominator over all shards (``sum_exp`` is summed in place)."""
    all_reduce_(sum_exp, dist.ReduceOp.SUM, spec.group)
    return sum_exp.log() + row_max / _LOG2E


def _global_top_k(cand_vals, cand_ids, spec: _LossSpec):
    """Every rank's candidates ``[k', B]`` merged to the best ``k`` negatives ``[B, k]`` (values, global
    ids); (None, None) when nothing is searched."""
    k = spec.search_k
    if not k:
        return None, None
    batch = cand_vals.shape[1]
    pad = k - cand_vals.shape[0]  # a shard with fewer than k rows pads with -inf
    cand_vals = F.pad(cand_vals, (0, 0, 0, pad), value=-math.inf)
    cand_ids = F.pad(cand_ids, (0, 0, 0, pad), value=-1)
    all_vals = all_gather_equal(cand_vals.T.contiguous(), spec.group)  # [P, B, k]
    all_ids = _gather_ids(cand_ids.T.contiguous(), spec.group, spec.num_instances)
    all_vals = all_vals.permute(1, 0, 2).reshape(batch, -1)
    all_ids = all_ids.permute(1, 0, 2).reshape(batch, -1)
    neg_vals, pos = torch.topk(all_vals, k, dim=1)
    return neg_vals, torch.gather(all_ids, 1, pos)


def _assemble_loss(log_norm, positive, neg_vals, spec: _LossSpec):
    """The mean smoothed cross-entropy (target 1 - eps on the own row, eps / K on each of the top K
    negatives) and the instance accuracy (the own id beats the best other class; 0 when nothing
    was searched)."""
    eps, kk = spec.smoothing_eps, spec.smoothing_k
    per_sample = log_norm - (1.0 - eps) * positive
    if kk:
        per_sample = per_sample - (eps / kk) * neg_vals[:, :kk].sum(1)
    loss = per_sample.mean()
    accuracy = (positive > neg_vals[:, 0]).float().mean() if spec.search_k else loss.new_zeros(())
    return loss, accuracy


def _subtract_sparse_targets(grad_features, grad_weight, features_all, weight32, inv_norm, ids_all, neg_ids,
                             spec: _LossSpec, scale) -> None:
    """In place: the ``- target`` half of ``softmax - target`` for the few (sample, row) pairs of this
    shard with a non-zero target, into both gradients (the weight's through the weight norm)."""
    rows, cols, values = _sparse_targets(ids_all, neg_ids, spec, weight32.shape[0], scale)
    scaled_rows = weight32[cols] * (inv_norm[cols] / spec.temperature)[:, None]
    grad_features.index_add_(0, rows, scaled_rows * -values[:, None])
    target_grad = features_all[rows] * -values[:, None]
    _through_weight_norm(target_grad, weight32[cols], inv_norm[cols], spec.temperature)
    grad_weight.index_add_(0, cols, target_grad)


def _dense_backward_blocks(ctx, features_all, weight32, inv_norm, row_max, row_scale, shift: bool):
    """The dense softmax part of backward, block by block, from the kept exp-logits or recomputed:
    (grad_features ``[B, D]``, grad_weight ``[n, D]`` through the weight norm), fp32."""
    spec, kept = ctx.spec, ctx.kept
    batch, n_rows, device = features_all.shape[0], weight32.shape[0], features_all.device
    col_scale2 = inv_norm * (_LOG2E / spec.temperature)
    features_t = features_all.T.contiguous()
    scaled_features = features_all * row_scale[:, None]
    grad_features = torch.zeros_like(features_all)
    grad_weight = torch.empty_like(weight32)
    for c0, c1 in _blocks(n_rows, spec.block):
        scaled_w2 = weight32[c0:c1] * col_scale2[c0:c1, None]
        if kept is not None:
            exp_logits = kept[c0:c1]
        else:  # memory-lean mode: recompute this block
            out = ctx.workspace.view("block", (c1 - c0, batch), device)
            exp_logits = torch.mm(scaled_w2, features_t, out=out)
            if shift:
                exp_logits.sub_(row_max)
            exp_logits.exp2_()
        grad_features.addmm_(exp_logits.T, scaled_w2)  # base-2 scale, undone below
        torch.mm(exp_logits, scaled_features, out=grad_weight[c0:c1])
        _through_weight_norm(grad_weight[c0:c1], weight32[c0:c1], inv_norm[c0:c1], spec.temperature)
    grad_features.mul_((row_scale / _LOG2E)[:, None])
    if kept is not None:  # the next step may write the kept buffer again
        ctx.kept = None
        ctx.workspace.release()
    return grad_features, grad_weight


def _through_weight_norm(grad: torch.Tensor, weight: torch.Tensor, inv_norm: torch.Tensor, temperature: float):
    """In place: d loss / d (w / (|w| T)) -> d loss / d w, i.e. ``(g - u <u, g>) / (|w| T)`` with
    ``u = w / |w|``, row by row (``grad``, ``weight`` [c, D], ``inv_norm`` [c])."""
    radial = torch.linalg.vecdot(grad, weight) * inv_norm.square()
    grad.sub_(weight * radial[:, None]).mul_((inv_norm / temperature)[:, None])


def _sparse_targets(ids_all, neg_ids, spec: _LossSpec, n_rows: int, scale):
    """Non-zero targets that fall in this shard as (batch row, local class, target * scale)."""
    batch = ids_all.shape[0]
    rows = torch.arange(batch, device=ids_all.device)
    eps, kk = spec.smoothing_eps, spec.smoothing_k
    rows_list, cols_list = [rows], [ids_all - spec.row_start]
    vals_list = [torch.full((batch,), 1.0 - eps, device=ids_all.device)]
    if neg_ids is not None:
        rows_list.append(rows.repeat_interleave(kk))
        cols_list.append(neg_ids.reshape(-1) - spec.row_start)
        vals_list.append(torch.full((batch * kk,), eps / kk, device=ids_all.device))
    rows, cols, vals = torch.cat(rows_list), torch.cat(cols_list), torch.cat(vals_list) * scale
    mine = (cols >= 0) & (cols < n_rows)
    return rows[mine], cols[mine], vals[mine]


# --------------------------------------------------------------------------- fused-path selection
FUSED_MODES = ("auto", "always", "never")
_FUSED_MAX_DIM = 512  # ifc_ds.fused_loss.MAX_DIM: the kernels hold the whole feature dim in one tile


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_fused(mode: str, device: torch.device, dim: int) -> bool:
    """Whether this forward runs the Triton kernels (see ``ShardedInstanceClassifier``'s ``fused``)."""
    if mode == "never":
        return False
    if mode == "auto":
        return device.type == "cuda" and dim <= _FUSED_MAX_DIM and _triton_available()
    # (ConfigError: classifier.fused=always where it cannot run is bad input, one line and exit 2)
    if not _triton_available():
        raise ConfigError("classifier.fused=always needs triton, which is not installed")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ConfigError("classifier.fused=always on CPU runs the Triton kernels in the interpreter only: set "
                          "TRITON_INTERPRET=1 before triton is imported (tests), or use fused=auto / never")
    return True


def _operand_dtype(features: torch.Tensor) -> torch.dtype:
    """GEMM operand dtype of the fused path: the autocast dtype if autocast is on, else the features'
    own dtype when it is 16-bit (a bf16 model without autocast), else fp32."""
    device_type = features.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else features.dtype
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


# --------------------------------------------------------------------------- the module
class ShardedInstanceClassifier(nn.Module):
    """Cosine-softmax classifier over ``num_instances`` classes, rows sharded over ``group``.

    Args:
        num_instances: N, the number of classes (= training images).
        dim: D, the feature dimension.
        temperature: T of the cosine logits.
        group: the process group the rows are sharded over (None: the default group; works without
            any initialised group as world size 1).
        chunk_size: None keeps this rank's ``[B_global, N/P]`` logits for backward; an int C scores
            C classes at a time and recomputes them in backward (peak extra memory O(B_global C)).
            Unfused path only.
        fused: "auto" runs the Triton kernels of ``ifc_ds.fused_loss`` (no ``[N/P, B]`` logits in
            memory: tiles of (rows x batch) on chip, recomputed in backward) on CUDA when triton is
            installed, and the block loops on CPU; "always" forces the kernels (on CPU only under
            ``TRITON_INTERPRET=1``: tests), "never" the block loops. Fused GEMM operands are the
            autocast dtype (else the features' dtype when 16-bit, else fp32) with fp32 accumulation.

    Attributes:
        row_start, row_end: this rank's global rows ``[row_start, row_end)``.
        weight: ``[row_end - row_start, D]`` this rank's rows only.
        last_accuracy: fraction of the global batch whose own id scored highest (a 0-dim tensor,
            no host sync), set by forward when ``track_accuracy`` or smoothing is on.
    """

    def __init__(self, num_instances: int, dim: int, temperature: float = 0.15, group=None,
                 chunk_size: int | None = None, fused: str = "auto"):
        super().__init__()
        world_size, rank = size(group), rank_in(group)
        if num_instances < world_size:
            raise ValueError(f"num_instances={num_instances} is smaller than the world size {world_size}: "
                             "every rank needs at least one classifier row")
        if dim <= 0 or temperature <= 0:
            raise ValueError(f"dim and temperature must be positive, got dim={dim}, temperature={temperature}")
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
        if fused not in FUSED_MODES:
            raise ValueError(f"fused must be one of {', '.join(FUSED_MODES)}, got {fused!r}")
        if fused == "always" and not _triton_available():
            raise ConfigError("classifier.fused=always needs triton, which is not installed: install it (it ships "
                              "with CUDA builds of torch) or use fused=auto / never")
        self.fused = fused
        self.num_instances, self.dim, self.temperature = num_instances, dim, float(temperature)
        self.group, self.world_size, self.rank = group, world_size, rank
        self.chunk_size = chunk_size
        self.row_start, self.row_end = shard_range(num_instances, world_size, rank)
        self.weight = nn.Parameter(torch.empty(self.row_end - self.row_start, dim))
        self.track_accuracy = False
        self.last_accuracy: torch.Tensor | None = None
        self.last_batch_size = 0  # B_global of the last forward (known on every rank: the layout exchange)
        self._workspace = LogitsWorkspace()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random unit rows that depend only on global row ids, so the world size does not matter."""
        with torch.no_grad():
            self.weight.copy_(_rows_from_seed(self.row_start, self.row_end, self.dim))

    def extra_repr(self) -> str:
        return (f"num_instances={self.num_instances}, dim={self.dim}, temperature={self.temperature}, "
                f"rows=[{self.row_start}, {self.row_end}), world_size={self.world_size}, "
                f"chunk_size={self.chunk_size}, fused={self.fused}")

    def forward(self, features: torch.Tensor, instance_ids: torch.Tensor, smoothing_k: int = 0,
                smoothing_eps: float = 0.0) -> torch.Tensor:
        """features ``[B_local, D]`` (any float dtype), instance_ids ``[B_local]`` int64 global ids
        -> loss, the mean over the global batch (identical on every rank). A collective."""
        if features.dim() != 2 or instance_ids.shape != features.shape[:1]:
            raise ValueError(f"expected features [B, D] and instance_ids [B], got {tuple(features.shape)} "
                             f"and {tuple(instance_ids.shape)}")
        if smoothing_k < 0 or not 0.0 <= smoothing_eps < 1.0:
            raise ValueError(f"need smoothing_k >= 0 and 0 <= smoothing_eps < 1, got {smoothing_k}, {smoothing_eps}")
        if smoothing_k > self.num_instances - 1:
            raise ValueError(f"smoothing_k={smoothing_k} exceeds the {self.num_instances - 1} other classes")
        instance_ids = instance_ids.to(device=features.device, dtype=torch.int64)
        bad = ((instance_ids < 0) | (instance_ids >= self.num_instances)).any()
        layout = _exchange_layout(features.shape[0], features.shape[1], bad, self.dim, self.group, self.rank,
                                  features.device)

        fused = _use_fused(self.fused, features.device, self.dim)
        operand_dtype = _operand_dtype(features) if fused else torch.float32
        with torch.autocast(device_type=features.device.type, enabled=False):
            unit = F.normalize(features.float(), dim=1)
            features_all = _GatherFeatures.apply(unit, layout, self.group, self.world_size)
            ids_all = _gather_ids(instance_ids, self.group, self.num_instances, layout.sizes)
            smoothing = smoothing_k if smoothing_eps > 0 else 0
            needs_backward = torch.is_grad_enabled() and (unit.requires_grad or self.weight.requires_grad)
            spec = _LossSpec(
                temperature=self.temperature, row_start=self.row_start, smoothing_k=smoothing,
                smoothing_eps=smoothing_eps if smoothing else 0.0, num_instances=self.num_instances,
                search_k=smoothing or (1 if self.track_accuracy else 0),
                block=_block_size(layout.total, self.chunk_size, features.device),
                keep_logits=(self.chunk_size is None and needs_backward and not fused
                             and not self._workspace.kept_in_use()),
                group=self.group, fused=fused, operand_dtype=operand_dtype)
            loss, accuracy = _ShardedSoftmaxCrossEntropy.apply(features_all, self.weight, ids_all, spec,
                                                               self._workspace)
        self.last_accuracy = accuracy if spec.search_k else None
        self.last_batch_size = layout.total
        return loss

    @torch.no_grad()
    def assign_rows(self, instance_ids: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Collective: every rank passes ``[B_local]`` ids and ``[B_local, D]`` vectors (B_local may
        be 0); each shard stores the L2-normalised vectors of the ids it owns (raw-feature
        initialisation). Returns the ids of all ranks, ``[B_global]``."""
        if vectors.dim() != 2 or instance_ids.shape != vectors.shape[:1]:
            raise ValueError(f"expected ids [B] and vectors [B, D], got {tuple(instance_ids.shape)}, "
                             f"{tuple(vectors.shape)}")
        device = self.weight.device
        instance_ids = instance_ids.to(device=device, dtype=torch.int64)
        bad = ((instance_ids < 0) | (instance_ids >= self.num_instances)).any()
        layout = _exchange_layout(vectors.shape[0], vectors.shape[1], bad, self.dim, self.group, self.rank, device)
        ids_all = all_gather_rows(instance_ids, layout.sizes, self.group)
        vecs_all = all_gather_rows(F.normalize(vectors.to(device).float(), dim=1), layout.sizes, self.group)
        mine = (ids_all >= self.row_start) & (ids_all < self.row_end)
        self.weight[ids_all[mine] - self.row_start] = vecs_all[mine].to(self.weight.dtype)
        return ids_all

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """Collective: the assembled ``[N, D]`` weight on every rank (tests, small N only)."""
        sizes = [shard_range(self.num_instances, self.world_size, r) for r in range(self.world_size)]
        return all_gather_rows(self.weight.detach(), [e - s for s, e in sizes], self.group)


def _rows_from_seed(start: int, end: int, dim: int, seed: int = 0x1FC, block: int = 65536) -> torch.Tensor:
    """Unit rows ``[end - start, D]``; blocks of ``block`` global rows share one generator seed."""
    out = torch.empty(end - start, dim)
    for b in range(start // block, -(-end // block)):
        rows = torch.randn(block, dim, generator=torch.Generator().manual_seed(seed + b))
        lo, hi = max(start, b * block), min(end, (b + 1) * block)
        out[lo - start: hi - start] = rows[lo - b * block: hi - b * block]
    return F.normalize(out, dim=1)
