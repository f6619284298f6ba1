"""Atomic, resumable checkpoints whose classifier part does not depend on the number of ranks.

Layout of ``<output_dir>/checkpoints/step_00001234/``::

    engine/backbone/...        the backbone engine's state  } written and read by ifc_ds.engine.state,
    classifier/rows_<start>_<end>.pt   each shard's rows    } the one module that knows DeepSpeed's
                                       + optimizer state,   } internals; rows keyed by global row id
    trainer/rank_<r>.pt        per-rank RNG states
    trainer/state.pt           step, sampler position, hook states, LR-schedule state, eval history
    meta.json                  format version, world size, N, D, model: written last

A checkpoint is written into ``.tmp-step_...``, fsynced, renamed, and only then named in ``latest``
(itself replaced atomically), so an interrupted write is never loaded and never harms the previous
checkpoint. Loading re-shards classifier rows by global id and the backbone's ZeRO-1/2 partitions by
parameter name (``ifc_ds.engine.zero_elastic``), so P ranks can resume P' ranks' work. This module
owns the directory protocol, RNG states and compatibility checks; the engines save and load themselves.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ifc_ds.collectives import barrier, rank_in, size
from ifc_ds.config import Config, config_to_dict
from ifc_ds.dist import is_main

log = logging.getLogger(__name__)

# 2: the backbone's optimizer groups are timm's (no-decay group first); a version-1 optimizer state
# would not map onto them
FORMAT_VERSION = 2
# config keys that change what a checkpoint means: a resume with other values is refused
STRUCTURAL_KEYS = ("model.name", "model.small_images", "model.head_hidden", "model.dim", "model.kwargs")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message names the mismatch."""


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and key != "kwargs":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(state["accelerator"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- save / find / load
def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str, step: int, engines, trainer_state: dict, cfg: Config, keep_last: int) -> Path:
    """Collective. Writes a complete checkpoint atomically; returns its final path (on rank 0)."""
    root = checkpoint_root(output_dir)
    name = f"step_{step:08d}"
    tmp = root / f".tmp-{name}"
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "trainer").mkdir(parents=True)
    barrier()
    engines.save_state(tmp)
    torch.save(rng_state(), tmp / "trainer" / f"rank_{rank_in()}.pt")
    if is_main():
        torch.save(trainer_state, tmp / "trainer" / "state.pt")
    barrier()
    final = root / name
    if is_main():
        meta = {"format_version": FORMAT_VERSION, "step": step, "world_size": size(),
                "num_instances": engines.num_instances, "dim": engines.dim,
                "config": config_to_dict(cfg)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        _fsync_tree(tmp)
        final = publish(root, tmp, name, keep_last)
        log.info("checkpoint %s saved", final.name)
    barrier()
    return final


def _crash_point(name: str) -> None:
    """A no-op between two steps of ``publish``; fault-injection tests replace it to kill the process there."""


def publish(root: Path, tmp: Path, name: str, keep_last: int) -> Path:
    """Makes the complete checkpoint folder ``tmp`` the newest checkpoint ``name``, then prunes.

    At every moment ``latest`` names a complete checkpoint: a step that already has one (a re-save,
    e.g. after a resume that trained nothing) gets a new version ``name.1``, ``name.2``... instead of
    the old folder being removed before the new one is in place; older versions go only after
    ``latest`` names the new one."""
    final = root / name
    if final.exists():
        versions = [_checkpoint_key(p)[1] for p in root.glob(f"{name}*") if _checkpoint_key(p) is not None]
        final = root / f"{name}.{max(versions, default=0) + 1}"
    os.replace(tmp, final)
    _fsync_dir(root)
    _crash_point("renamed")
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    with open(pointer) as f:
        os.fsync(f.fileno())
    os.replace(pointer, root / "latest")
    _fsync_dir(root)
    _crash_point("pointed")
    _prune(root, keep_last)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checkpoint_key(path: Path) -> tuple[int, int] | None:
    """``step_00000012`` -> (12, 0), ``step_00000012.3`` -> (12, 3); None for anything else."""
    stem, _, version = path.name.partition(".")
    if not stem.startswith("step_") or not stem[5:].isdigit() or (version and not version.isdigit()):
        return None
    return int(stem[5:]), int(version or 0)


def _complete(path: Path) -> bool:
    return (path.is_dir() and not path.name.startswith(".") and _checkpoint_key(path) is not None
            and (path / "meta.json").is_file())


def _complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (by step, then version)."""
    return sorted((p for p in root.glob("step_*") if _complete(p)), key=_checkpoint_key)


def _prune(root: Path, keep_last: int) -> None:
    done = _complete_checkpoints(root)
    newest_of_step = {_checkpoint_key(p)[0]: p for p in done}  # a re-saved step keeps its newest version
    superseded = [p for p in done if newest_of_step[_checkpoint_key(p)[0]] != p]
    kept = sorted(newest_of_step.values(), key=_checkpoint_key)
    for old in superseded + kept[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def find_checkpoint(output_dir: str, resume: str) -> Path | None:
    """``none`` -> None; ``auto`` -> the newest complete checkpoint (or None); else the given path,
    which must be complete."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if (path / "checkpoints").is_dir():
            return find_checkpoint(str(path), "auto")
        if not (path.is_dir() and (path / "meta.json").is_file()):
            raise CheckpointError(f"resume={resume}: not a complete checkpoint (no meta.json)")
        return path
    root = checkpoint_root(output_dir)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _complete(named):
            return named
    done = _complete_checkpoints(root)
    return done[-1] if done else None


def read_checkpoint(path: str) -> tuple[Path, dict]:
    """(folder, meta.json) of a run's output_dir (its newest complete checkpoint) or of one checkpoint
    folder; CheckpointError where there is none."""
    try:
        folder = find_checkpoint(path, resume=path)
    except CheckpointError:  # its message speaks of resume=, which the commands that read runs do not have
        raise CheckpointError(f"{path}: not a run's output_dir (no checkpoints/ folder) and not a complete "
                              "checkpoint (no meta.json)") from None
    if folder is None:
        raise CheckpointError(f"{path}: no complete checkpoint found")
    return folder, json.loads((folder / "meta.json").read_text())


def check_compatible(meta: dict, cfg: Config, num_instances: int) -> list[str]:
    """Raises CheckpointError on a structural mismatch; returns the compatible changes (for the log)."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format {meta.get('format_version')} != supported {FORMAT_VERSION} (written "
                              "by another ifc_ds version: its optimizer state would not map onto this one's)")
    if meta["num_instances"] != num_instances:
        raise CheckpointError(f"checkpoint has N={meta['num_instances']} instances, this run's data has "
                              f"{num_instances} (data.train / data.limit changed?)")
    old, new = _flatten(meta["config"]), _flatten(config_to_dict(cfg))
    for key in STRUCTURAL_KEYS:
        if old.get(key) != new.get(key):
            raise CheckpointError(f"checkpoint was trained with {key}={old.get(key)!r}, this run has {new.get(key)!r}")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new) if old.get(k) != new.get(k)
            and k not in ("resume",)]


def load_checkpoint(path: Path, engines, cfg: Config, num_instances: int) -> dict:
    """Collective. Restores both engines and the RNGs (same world size); returns the trainer state."""
    meta = json.loads((path / "meta.json").read_text())
    changes = check_compatible(meta, cfg, num_instances)
    if changes and is_main():
        log.info("resuming %s with config changes: %s", path, "; ".join(changes))
    same_world = meta["world_size"] == size()
    state = torch.load(path / "trainer" / "state.pt", map_location="cpu", weights_only=False)
    engines.load_state(path, same_world)  # the LR schedules: the trainer sets them
    rng_file = path / "trainer" / f"rank_{rank_in()}.pt"
    if same_world and rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    else:  # elastic resume: per-rank streams cannot carry over; derive fresh ones from the step
        seed_everything(cfg.seed + 7919 * state["step"] + rank_in())
        if is_main():
            log.info("elastic resume: %d -> %d ranks; classifier rows re-sharded by global id",
                     meta["world_size"], size())
    barrier()
    return state


# --------------------------------------------------------------------------- identity for caches
def content_key(path: Path) -> str:
    """Changes whenever the checkpoint at ``path`` is rewritten (a re-run into the same output_dir)."""
    import hashlib

    meta = Path(path) / "meta.json"
    files = [meta] + sorted(p for p in (Path(path) / "engine").rglob("*") if p.is_file())
    stamps = [f"{p.name}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in files]

    return hashlib.sha1((meta.read_text() + "|".join(stamps)).encode()).hexdigest()[:16]
