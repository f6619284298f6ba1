"""torch's fused SGD step shown every tensor as the run of memory it is.

torch's fused SGD kernel (``SGD(fused=True)``) is one pass over each parameter, its gradient and its
momentum buffer; on a tensor that is not contiguous, such as a channels-last convolution weight,
its CPU kernel is slower than on a contiguous one (ResNet-18 + head, 47 MB, 1 thread: 25.8 ms
channels-last against 14.3 ms contiguous, ``benchmarks/step_parts.py``). The update is elementwise,
so where a parameter, its gradient and its buffer share one dense layout, the kernel may as well see
the three as 1-D views of their memory: ``DenseFusedSGD`` hands them over so and keeps each buffer in
its parameter's shape and layout, so the optimizer's state and checkpoints are torch's SGD's. Results
are bitwise torch's per-tensor SGD's (``tests/test_engine.py``). A gradient or buffer laid out unlike
its weight is copied into the weight's layout first: torch's fused CPU kernel walks the three tensors'
memory in step, so on mixed layouts it adds to the wrong elements (torch 2.14).
"""

from __future__ import annotations

import torch
from torch.optim.sgd import sgd


def _dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s elements fill its memory without gaps or overlaps (contiguous or channels-last)."""
    return tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last))


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two dense tensors of one shape keep their elements in the same memory order (the strides
    of size-1 dims do not count: a 1x1 convolution's weight is contiguous and channels-last at once)."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _run(tensor: torch.Tensor) -> torch.Tensor:
    """A dense tensor as the 1-D view of its memory, in memory order."""
    return tensor.as_strided((tensor.numel(),), (1,))


class DenseFusedSGD(torch.optim.SGD):
    """``torch.optim.SGD(fused=True)`` whose kernel sees each parameter, gradient and momentum buffer
    as 1-D runs of memory wherever the parameters are dense (otherwise torch's fused step as it is). A
    gradient laid out unlike its parameter is copied into the parameter's layout for the step; a
    buffer so (a checkpoint of contiguous buffers for channels-last weights) is laid out anew once."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **{**kwargs, "fused": True})
        self.shared_step = None  # a SharedSGDStep: the ranks of a CPU node step slices of shared weights

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.shared_step is not None:
            self.shared_step.step()
            return loss
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            sparse = self._init_group(group, params, grads, buffers)
            with_momentum = group["momentum"] != 0
            runs = (not sparse and all(_dense(p) for p in params)
                    and (not with_momentum or len({b is None for b in buffers}) <= 1))
            if runs:  # the kernel walks a weight, its gradient and its buffer in step: all in the weight's layout
                grads = [_laid_out_like(p, g) for p, g in zip(params, grads)]
                if with_momentum:
                    buffers = [self._buffer_like(p, b) for p, b in zip(params, buffers)]
            view = _run if runs else (lambda t: t)  # (otherwise torch's SGD(fused=True) as it is)
            kernel_buffers = [None if b is None else view(b) for b in buffers]
            sgd([view(p) for p in params], [view(g) for g in grads], kernel_buffers,
                weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
                has_sparse_grad=sparse, foreach=None, fused=True, grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None))
            if with_momentum:
                for p, buffer, kernel_buffer in zip(params, buffers, kernel_buffers):
                    if buffer is None:  # made by the kernel at the first step: 1-D when it saw runs
                        buffer = kernel_buffer.as_strided(p.shape, p.stride()) if runs else kernel_buffer
                    self.state[p]["momentum_buffer"] = buffer
        return loss

    def _buffer_like(self, param: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor | None:
        """The momentum buffer in its weight's layout, laid out anew (and kept so) if it was not."""
        laid_out = None if buffer is None else _laid_out_like(param, buffer)
        if laid_out is not buffer:
            self.state[param]["momentum_buffer"] = laid_out
        return laid_out


def _laid_out_like(param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when it keeps its elements in ``param``'s memory order, else a copy that does."""
    if _dense(tensor) and _same_layout(param, tensor):
        return tensor
    return torch.empty_like(param).copy_(tensor)  # (empty_like keeps a dense parameter's strides)
