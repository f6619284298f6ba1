"""The engines' state on disk: everything that knows where DeepSpeed keeps weights and optimizer
state (its checkpoint files, ZeRO's flat fp32 partitions, the optimizer wrapped inside its optimizer).

``ifc_ds.checkpoint`` owns the folder protocol and calls ``save_engines`` / ``load_engines`` (through
``Engines.save_state`` / ``load_state``); evaluation and export read weights through
``fp32_encoder_state``; tests read the saved working weights through ``saved_module_state``::

    <checkpoint>/engine/backbone/...          DeepSpeed's save_checkpoint of the backbone engine
    <checkpoint>/classifier/rows_<s>_<e>.pt   this module's: each shard's rows + optimizer state

No DeepSpeed tool re-shards a row-sharded parameter by global row, so the classifier rows are saved
by hand (any world size can load them); the backbone uses DeepSpeed's own checkpoints, re-partitioned
by ``zero_elastic`` when the data-parallel size changed under ZeRO-1/2.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ifc_ds.checkpoint import CheckpointError
from ifc_ds.collectives import size
from ifc_ds.dist import is_main
from ifc_ds.engine.zero_elastic import restore_zero_partitions

log = logging.getLogger(__name__)

_TAG = "backbone"


def save_engines(engines, folder: Path) -> None:
    """Collective: both engines' weights and optimizer states into ``folder`` (which exists)."""
    engines.backbone.save_checkpoint(str(folder / "engine"), tag=_TAG, save_latest=False)
    (folder / "classifier").mkdir(exist_ok=True)  # every rank: exist_ok makes the race harmless
    save_classifier_rows(engines.classifier, folder / "classifier")


def load_engines(engines, folder: Path, same_world: bool) -> None:
    """Collective: both engines from ``folder``; the backbone's ZeRO-1/2 partitions and the classifier
    rows are re-sharded when the checkpoint was written by another number of ranks."""
    backbone = engines.backbone
    if same_world or backbone.zero_optimization_stage() == 0:
        backbone.load_checkpoint(str(folder / "engine"), tag=_TAG, load_optimizer_states=True,
                                 load_lr_scheduler_states=True)
    else:
        # DeepSpeed refuses ZeRO-1/2 optimizer partitions saved by another data-parallel size: load the
        # module, then re-partition the fp32 weights and optimizer state by parameter name ourselves
        backbone.load_checkpoint(str(folder / "engine"), tag=_TAG, load_module_only=True)
        saved_dp = restore_zero_partitions(backbone, folder / "engine" / _TAG)
        if is_main():
            log.info("elastic resume under ZeRO-%d: backbone optimizer state re-partitioned from %d to %d ranks",
                     backbone.zero_optimization_stage(), saved_dp, size())
    load_classifier_rows(engines.classifier, folder / "classifier")


def _backbone_states(checkpoint: Path) -> dict:
    """DeepSpeed's model-states file of the backbone engine (module weights as the engine held them)."""
    return torch.load(Path(checkpoint) / "engine" / _TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)


def saved_module_state(checkpoint: Path) -> dict:
    """The backbone engine's module weights as saved: the working copy (16-bit in a bf16/fp16 run)."""
    return _backbone_states(checkpoint)["module"]


def saved_engine_counters(checkpoint: Path) -> tuple[int, int]:
    """(optimizer steps, samples) the backbone engine had counted when the checkpoint was saved."""
    states = _backbone_states(checkpoint)
    return states["global_steps"], states["global_samples"]


# --------------------------------------------------------------------------- classifier rows and optimizer state
def _classifier_opt_views(engine):
    """Named views ``[n, D]`` of the classifier engine's fp32 weight copy and optimizer state,
    wherever ZeRO keeps them (the module's param for stage 0; the flat, possibly CPU-offloaded,
    partition for stages 1/2; the engine's data-parallel world is 1, so the partition is the whole
    parameter)."""
    weight = engine.module.weight
    shape, numel = weight.shape, weight.numel()
    zero = getattr(engine.optimizer, "single_partition_of_fp32_groups", None)
    if zero is not None:
        master = zero[0]
        inner = engine.optimizer.optimizer
        state = inner.state.get(master, {})
        views = {"master": master[:numel].view(shape)}
    else:
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        state = inner.state.get(weight, {})
        views = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.numel() >= numel and value.dim() >= 1:
            views[f"state.{key}"] = value.view(-1)[:numel].view(shape)
        elif torch.is_tensor(value) or isinstance(value, (int, float)):
            views[f"scalar.{key}"] = value
    return views, inner, (master if zero is not None else weight)


def save_classifier_rows(engine, folder: Path) -> None:
    clf = engine.module
    views, _, _ = _classifier_opt_views(engine)
    payload = {"row_start": clf.row_start, "row_end": clf.row_end, "num_instances": clf.num_instances,
               "dim": clf.dim, "weight": clf.weight.detach().cpu().clone(),
               "tensors": {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in views.items()
                           if k != "master"}}
    torch.save(payload, folder / f"rows_{clf.row_start:012d}_{clf.row_end:012d}.pt")


def load_classifier_rows(engine, folder: Path) -> None:
    """Fills this rank's rows (and their optimizer state) from whichever saved shards overlap them."""
    clf = engine.module
    start, end = clf.row_start, clf.row_end
    files = sorted(folder.glob("rows_*.pt"))
    covered = 0
    weight = torch.empty(end - start, clf.dim)
    tensors: dict = {}
    for path in files:
        s, e = (int(x) for x in path.stem.split("_")[1:3])
        if e <= start or s >= end:
            continue
        part = torch.load(path, map_location="cpu", weights_only=False)
        if part["num_instances"] != clf.num_instances or part["dim"] != clf.dim:
            raise CheckpointError(f"classifier shape mismatch: checkpoint N={part['num_instances']} D={part['dim']}, "
                                  f"run N={clf.num_instances} D={clf.dim}")
        lo, hi = max(s, start), min(e, end)
        weight[lo - start:hi - start] = part["weight"][lo - s:hi - s]
        for key, value in part["tensors"].items():
            if key.startswith("state."):
                tensors.setdefault(key, torch.zeros(end - start, clf.dim, dtype=value.dtype))
                tensors[key][lo - start:hi - start] = value[lo - s:hi - s]
            else:
                tensors[key] = value
        covered += hi - lo
    if covered != end - start:
        raise CheckpointError(f"classifier rows [{start}, {end}) only {covered} found in {folder}")
    views, inner, key_param = _classifier_opt_views(engine)
    with torch.no_grad():
        clf.weight.copy_(weight.to(clf.weight.device, clf.weight.dtype))
        if "master" in views:
            views["master"].copy_(weight.to(views["master"].device))
        if not any(k.startswith("state.") for k in views) and any(k.startswith("state.") for k in tensors):
            # the optimizer has not stepped yet in this process: create its state in place
            state = inner.state.setdefault(key_param, {})
            for key, value in tensors.items():
                name = key.split(".", 1)[1]
                if key.startswith("state."):
                    flat = torch.zeros_like(key_param)
                    flat.view(-1)[:value.numel()].copy_(value.view(-1).to(flat.device))
                    state[name] = flat
                else:
                    state[name] = value
            return
        for key, view in views.items():
            if key.startswith("state.") and key in tensors:
                view.copy_(tensors[key].to(view.device, view.dtype))



# --------------------------------------------------------------------------- fp32 weights for evaluation and export
def fp32_encoder_state(path: Path, encoder: torch.nn.Module) -> dict:
    """The encoder's state dict from checkpoint ``path`` with its fp32 *master* weights, not the 16-bit
    working copy that a bf16/fp16 run keeps in the module (``encoder`` gives the parameter order).

    ZeRO-1/2: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` reassembles the fp32 partitions.
    ZeRO-0 with bf16/fp16: DeepSpeed's optimizer saves its fp32 copies per parameter group, in the
    order of ``engine.param_groups``, which that tool does not read. ZeRO-0 fp32: the module itself."""
    from ifc_ds.engine import param_groups

    engine_dir = Path(path) / "engine"
    states = _backbone_states(path)
    module = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    optimizer = states.get("optimizer") or {}
    if list((engine_dir / _TAG).glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        fp32 = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=_TAG)
        module.update({k: v.float() if v.is_floating_point() else v for k, v in fp32.items()})
    elif isinstance(optimizer, dict) and "fp32_groups" in optimizer:
        names = {id(p): n for n, p in encoder.named_parameters()}
        for group, masters in zip(param_groups(encoder, 0.0), optimizer["fp32_groups"]):
            for param, master in zip(group["params"], masters):
                if master.shape != module[names[id(param)]].shape:
                    raise CheckpointError(f"{path}: fp32 master of {names[id(param)]} has shape {tuple(master.shape)}")
                module[names[id(param)]] = master.float()
    return module
