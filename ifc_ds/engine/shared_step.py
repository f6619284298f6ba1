"""The backbone's SGD step split over the ranks of a CPU node: weights and momentum in node-shared
memory, each rank updating its slice.

Where every rank of the world runs on one CPU node and averages the backbone's gradients in
``NodeBuffers``, every rank would otherwise run the same optimizer step over all the weights: the
world's cores each reading and writing every weight and momentum buffer, for one result. Here the
weights (the parameters' ``.data``) and SGD's momentum buffers are views of two node-shared mappings
(one each, so a checkpoint saves them as it saved the tensors before: a view is saved with its whole
mapping), and rank r updates only slice r (``NodeBuffers.bounds``) from the mean row, then waits for
the other ranks' slices at a step barrier before its next forward reads them. The update is the same
fused kernel on 1-D runs of memory as ``DenseFusedSGD``'s (elementwise), so the weights are bitwise
the unshared step's; the optimizer's state and checkpoints stay torch's SGD's (its momentum buffers
are the views). DeepSpeed's ZeRO-1 partitions optimizer state like this, but through collectives that
copy every gradient and weight: on a CPU node over gloo they cost more than the whole step
(``benchmarks/README.md``). Written by hand for that reason.
"""

from __future__ import annotations

import logging

import torch
from torch.optim.sgd import sgd

from ifc_ds import collectives
from ifc_ds.engine.fused_sgd import _dense
from ifc_ds.engine.node_buffers import map_node_shared

log = logging.getLogger(__name__)


class SharedSGDStep:
    """``optimizer``'s step (a ``DenseFusedSGD`` with momentum over ``flat_grads``' parameters) on
    node-shared weights and momentum, each rank stepping its slice. Build with ``create``;
    ``DenseFusedSGD.step`` calls ``step`` when it has one."""

    def __init__(self, flat_grads, optimizer: torch.optim.Optimizer, weights: torch.Tensor, momentum: torch.Tensor):
        from ifc_ds.engine import _flat_offsets, _views_of  # (the package imports this module)

        self.flat_grads, self.optimizer = flat_grads, optimizer
        self.params = [param for param, _ in flat_grads.views]
        self.weights, self.momentum = weights, momentum  # [n] each, node-shared
        self.weight_views = _views_of(weights, self.params)  # (each with its parameter's strides)
        self.momentum_views = dict(_views_of(momentum, self.params))
        node = flat_grads.node
        lo, hi = node.bounds[node.rank], node.bounds[node.rank + 1]
        # the part of each parameter in this rank's slice: (param, its offset, start, end) in the flat order
        self.parts = [(p, offset, max(lo, offset), min(hi, offset + p.numel()))
                      for p, offset in zip(self.params, _flat_offsets(self.params)[0])
                      if max(lo, offset) < min(hi, offset + p.numel())]
        group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        # this rank's slice as runs of the flat order, per parameter group (adjacent runs merged)
        self.runs: list[list[tuple[int, int]]] = [[] for _ in optimizer.param_groups]
        for param, _, start, end in self.parts:
            runs = self.runs[group_of[id(param)]]
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((start, end))
        self._share_weights()
        self._adopt_momentum()

    @classmethod
    def create(cls, flat_grads, optimizer: torch.optim.Optimizer) -> SharedSGDStep | None:
        """Collective over the world. None on every rank where it does not apply: no node-shared mean
        row that every rank reads, an SGD option the kernel call below does not pass on, parameters
        the optimizer does not hold, or no room in ``/dev/shm``."""
        if flat_grads is None or flat_grads.mean_views is None:
            return None
        params = {id(param) for param, _ in flat_grads.views}
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        plain = all(group["momentum"] != 0 and group["dampening"] == 0 and not group["maximize"]
                    and not group["nesterov"] for group in optimizer.param_groups)
        dense = all(_dense(param) for param, _ in flat_grads.views)
        if params != held or not plain or not dense:
            return None
        numel = flat_grads.flat.numel()
        weights = map_node_shared(1, numel, flat_grads.flat.dtype, "weights")
        momentum = map_node_shared(1, numel, flat_grads.flat.dtype, "momentum") if weights is not None else None
        if momentum is None:
            return None
        log.info("backbone optimizer step: weights and momentum node-shared, each of %d ranks steps its slice",
                 collectives.size())
        return cls(flat_grads, optimizer, weights[0], momentum[0])

    def _share_weights(self) -> None:
        """Every rank holds the same weights (DeepSpeed broadcast them): each copies its slice into the
        shared row, and once all have, every parameter's data becomes its view of the row."""
        for param, offset, start, end in self.parts:  # the parameter's memory in order, as its view's
            memory = param.data.as_strided((param.numel(),), (1,))
            self.weights[start:end].copy_(memory[start - offset:end - offset])
        collectives.barrier()
        for param, view in self.weight_views:
            param.data = view

    def _adopt_momentum(self) -> None:
        """The momentum buffers as views of the shared row. Torch's ``load_state_dict`` (a checkpoint)
        replaces them with tensors of its own: their values are copied in (the same on every rank) and
        the views put back."""
        for param in self.params:
            view, state = self.momentum_views[param], self.optimizer.state[param]
            buffer = state.get("momentum_buffer")
            if buffer is not None and buffer.data_ptr() == view.data_ptr():
                continue
            if buffer is None:
                view.zero_()  # before the first step: 0.9 * 0 + g is g, torch's first-step buffer
            else:
                view.copy_(buffer)
            state["momentum_buffer"] = view

    @torch.no_grad()
    def step(self) -> None:
        """Collective: this rank's slice of every weight and momentum buffer updated from the averaged
        gradients; returns once every rank's slice is."""
        self._adopt_momentum()
        collectives.step_barrier()  # no rank updates a slice another may still be copying a loaded state into
        flat = self.flat_grads
        grads = flat.node.mean if flat.mode == flat.NODE_BUFFERS else flat.flat  # (averaged in place there)
        for group, runs in zip(self.optimizer.param_groups, self.runs):
            if not runs:
                continue
            sgd([self.weights[s:e] for s, e in runs], [grads[s:e] for s, e in runs],
                [self.momentum[s:e] for s, e in runs],
                weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"], dampening=0.0,
                nesterov=False, maximize=False, has_sparse_grad=False, foreach=None, fused=True,
                grad_scale=None, found_inf=None)
        collectives.step_barrier()  # every slice is updated before any rank's next forward reads it
