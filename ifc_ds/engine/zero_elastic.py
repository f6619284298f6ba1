"""Re-partitions a ZeRO-1/2 engine's fp32 weights and optimizer state saved by P data-parallel ranks
onto P' ranks.

Why by hand: DeepSpeed refuses ZeRO-1/2 partitions saved under another data-parallel size ("Automatic
adjustment of ZeRO's optimizer state partitioning ... is not currently supported"), and its universal
checkpoint converter (``ds_to_universal``) only carries Adam's ``exp_avg``/``exp_avg_sq``, so SGD's
momentum (our default) or LARS state would be dropped. This module reads the partition files
DeepSpeed wrote, reassembles each parameter's full fp32 value and every per-element optimizer
state by parameter name (the files' ``param_slice_mappings``), and writes them into the new
partitions through DeepSpeed's public ``safe_set_full_*`` API, which knows the new layout.

Usage (after ``engine.load_checkpoint(dir, tag, load_module_only=True)``)::

    restore_zero_partitions(engine, Path(dir) / tag)
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from deepspeed.checkpoint.constants import (
    BASE_OPTIMIZER_STATE,
    LOSS_SCALER,
    OPTIMIZER_STATE_DICT,
    PARAM_SLICE_MAPPINGS,
    SINGLE_PARTITION_OF_FP32_GROUPS,
)
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

from ifc_ds.checkpoint import CheckpointError

_PARTITION_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


class ZeroReshardError(CheckpointError):
    """The saved ZeRO partitions cannot be mapped onto this engine; the message says why (a checkpoint
    error: one line and exit 2 from the commands)."""


def _partition_files(folder: Path) -> list[Path]:
    """The saved partition files ordered by data-parallel rank; all ranks 0..P-1 must be present."""
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := _PARTITION_FILE.search(p.name))}
    if not found or sorted(found) != list(range(len(found))):
        raise ZeroReshardError(f"{folder}: ZeRO partition files for ranks {sorted(found)}, expected 0..P-1")
    return [found[r] for r in range(len(found))]


def _group_states(base_state, num_groups: int) -> list[dict]:
    """Per param group ``{key: flat tensor or scalar}``, from either layout DeepSpeed saves: a torch
    ``optimizer.state_dict()`` (one flat partition per group, so state index == group index) or, with
    ``elastic_checkpoint``, a list of per-group states."""
    if isinstance(base_state, dict):
        return [base_state["state"].get(i, {}) for i in range(num_groups)]
    return list(base_state)


def read_zero_partitions(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict], dict]:
    """Reads every rank's partition file in ``folder``.

    Returns ``(full, scalars, global_state)``: ``full[param_name]`` maps ``"fp32"`` and each
    per-element optimizer-state key (``momentum_buffer``, ``exp_avg`` ...) to the parameter's whole
    flat tensor ``[numel]``; ``scalars[group]`` holds the per-group scalar state (Adam's ``step``);
    ``global_state`` holds the loss scaler of fp16 runs and ``dp_size``, the number of ranks that wrote
    the files."""
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    scalars: list[dict] = []
    files = _partition_files(folder)
    global_state: dict = {"dp_size": len(files)}
    for path in files:  # rank order: a parameter's fragments concatenate in order
        sd = torch.load(path, map_location="cpu", weights_only=False)[OPTIMIZER_STATE_DICT]
        if PARAM_SLICE_MAPPINGS not in sd:
            raise ZeroReshardError(f"{path}: no {PARAM_SLICE_MAPPINGS} (written by a DeepSpeed too old to re-shard)")
        fp32_groups = sd[SINGLE_PARTITION_OF_FP32_GROUPS]
        states = _group_states(sd[BASE_OPTIMIZER_STATE], len(fp32_groups))
        global_state.setdefault(LOSS_SCALER, sd.get(LOSS_SCALER))
        for group, (fp32, state, mapping) in enumerate(zip(fp32_groups, states, sd[PARAM_SLICE_MAPPINGS])):
            per_element = {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() == 1
                           and v.numel() >= fp32.numel()}  # padded partitions may be longer than the lean fp32
            if len(scalars) <= group:
                scalars.append({k: v for k, v in state.items() if k not in per_element})
            for name, address in mapping.items():
                entry = pieces.setdefault(name, {})
                entry.setdefault("fp32", []).append(fp32.narrow(0, address.start, address.numel))
                for key, flat in per_element.items():
                    entry.setdefault(key, []).append(flat.narrow(0, address.start, address.numel))
    full = {name: {key: torch.cat(parts) for key, parts in entry.items()} for name, entry in pieces.items()}
    return full, scalars, global_state


def restore_zero_partitions(engine, folder: Path) -> int:
    """Writes the state saved in ``folder`` (by any data-parallel size) into ``engine``'s ZeRO-1/2
    partitions: fp32 master weights, per-element optimizer state, per-group scalars, the loss scaler.
    Not a collective. Returns the data-parallel size that wrote the files."""
    zero = engine.optimizer
    if not hasattr(zero, "single_partition_of_fp32_groups"):  # (was an AttributeError traceback)
        raise ZeroReshardError(f"{folder}: an elastic resume re-partitions the state of DeepSpeed's ZeRO-1/2 "
                               f"optimizer, not of its {type(zero).__name__} (bf16 with data_types.grad_accum_dtype="
                               f"fp32): resume on the {len(_partition_files(folder))} ranks that wrote it")
    full, scalars, global_state = read_zero_partitions(folder)
    inner = zero.optimizer
    named = dict(engine.module.named_parameters())
    missing = sorted(set(named) - set(full))
    unexpected = sorted(set(full) - set(named))
    if missing or unexpected:
        raise ZeroReshardError(f"{folder}: saved parameters do not match the model (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]})")
    if len(scalars) != len(zero.single_partition_of_fp32_groups):
        raise ZeroReshardError(f"{folder}: {len(scalars)} param groups saved, the engine has "
                               f"{len(zero.single_partition_of_fp32_groups)}")
    keys = sorted({k for entry in full.values() for k in entry} - {"fp32"})
    # Create the optimizer state in place (torch optimizers create it lazily at their first step)
    # and link each parameter's fragment to it, as DeepSpeed does after a step.
    for group, hp in enumerate(zero.single_partition_of_fp32_groups):
        state = inner.state[hp]
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(hp)
        state.update(scalars[group])
        lazy_init_hp_params_optimizer_state(zero.bit16_groups[group], hp, inner.state)
    for name, param in named.items():
        saved = full[name]
        if saved["fp32"].numel() != param.numel():
            raise ZeroReshardError(f"{folder}: {name} has {saved['fp32'].numel()} elements saved, "
                                   f"{param.numel()} in the model")
        safe_set_full_fp32_param(param, saved["fp32"].view_as(param))
        for key in keys:
            safe_set_full_optimizer_state(param, saved[key].view_as(param), key)
        with torch.no_grad():  # the working (possibly bf16/fp16) weight follows the fp32 master
            param.copy_(saved["fp32"].view_as(param).to(param.dtype))
    if global_state.get(LOSS_SCALER) is not None:
        zero.loss_scaler = global_state[LOSS_SCALER]
    return global_state["dp_size"]
