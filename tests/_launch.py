"""Runs ``train.py`` as real ranks (one process each, gloo on CPU), as a launcher would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ifc_ds.dist import free_port  # noqa: F401 (tests import it from here)

REPO = Path(__file__).resolve().parent.parent

# a tiny, fast recipe: timm's test_resnet on 16x16 digits, 8 images per rank per step
TINY = ["model.name=test_resnet", "model.head_hidden=32", "model.dim=16", "data.image_size=16", "data.limit=48",
        "data.num_workers=0", "train.batch_size=8", "train.epochs=2", "train.log_every=1", "train.warmup_epochs=0.5",
        "hooks.smoothing.k=2", "hooks.smoothing.start_epoch=0.5", "hooks.smoothing.ramp_epochs=0",
        "hooks.raw_init.batch_size=16", "eval.train=null", "log.progress=false", "dist.timeout_s=120",
        "checkpoint.every_epochs=1"]


def start_ranks(world: int, overrides: list[str], log_dir: Path) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    log_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), LOCAL_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        log = open(log_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY, *overrides], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_ranks(procs, timeout: float = 300) -> list[int]:
    """The ranks' exit codes; on a timeout (or the test's own, or Ctrl-C) every rank is killed first."""
    try:
        return [p.wait(timeout=timeout) for p in procs]
    except BaseException:
        for q in procs:
            q.kill()
        raise


def run_ranks(world: int, overrides: list[str], log_dir: Path, timeout: float = 300) -> list[int]:
    return wait_ranks(start_ranks(world, overrides, log_dir), timeout)


def logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("rank*.log")))
