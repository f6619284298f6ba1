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


# Patches the trainer so that its ranks, after the optimizer step that makes step IFC_DS_TEST_GATE_STEP, each
# touch IFC_DS_TEST_GATE.at.<rank> and wait for the file IFC_DS_TEST_GATE (at most 240 s): a test signals or kills
# ranks at a known step. Polling for a step instead raced the tiny recipe, which runs several steps a second.
# With IFC_DS_TEST_GATE_SIGNAL set, a rank also waits there until its stop signal (SIGTERM / SIGUSR1) has come.
GATE_PATCH = """
import os, time
import torch.distributed as dist
from ifc_ds import trainer
_GATE, _AT = os.environ["IFC_DS_TEST_GATE"], int(os.environ["IFC_DS_TEST_GATE_STEP"])
_SIGNAL = bool(os.environ.get("IFC_DS_TEST_GATE_SIGNAL"))
_real_train_step = trainer.Trainer.train_step
def _gated_train_step(self, *args, **kwargs):
    result = _real_train_step(self, *args, **kwargs)
    if self.progress.step == _AT:
        open(f"{_GATE}.at.{dist.get_rank()}", "w").close()
        deadline = time.monotonic() + 240
        while not (os.path.exists(_GATE) and (not _SIGNAL or self.stop_signal.received is not None)) \\
                and time.monotonic() < deadline:
            time.sleep(0.05)
    return result
trainer.Trainer.train_step = _gated_train_step
"""
# the tail of a script that patches ifc_ds, then runs train.py's main with the script's arguments
RUN_TRAIN = """
import os, sys
if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # train.py (the script's own folder is sys.path[0])
    sys.argv = ["train.py"] + sys.argv[1:]
    import train
    sys.exit(train.main())
"""
GATED_TRAIN = GATE_PATCH + RUN_TRAIN


def gate_environment(gate_dir: Path, step: int, until_signalled: bool = False) -> dict:
    """The variables that arm ``GATE_PATCH`` (its files in ``gate_dir``)."""
    return dict(IFC_DS_TEST_GATE=str(gate_dir / "gate"), IFC_DS_TEST_GATE_STEP=str(step),
                **({"IFC_DS_TEST_GATE_SIGNAL": "1"} if until_signalled else {}))


def gate_site(folder: Path) -> Path:
    """A folder for PYTHONPATH whose sitecustomize applies ``GATE_PATCH`` in every Python started with
    ``gate_environment``'s variables (ranks that a launcher such as srun starts from train.py itself)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ifc_ds_test_gate.py").write_text(GATE_PATCH)
    # (train.py only: DeepSpeed starts other Pythons, py-cpuinfo's, which would import the trainer for nothing)
    (folder / "sitecustomize.py").write_text("import os, sys\nif os.environ.get('IFC_DS_TEST_GATE') and "
                                             "os.path.basename(sys.argv[0]) == 'train.py':\n"
                                             "    import ifc_ds_test_gate  # noqa: F401\n")
    return folder


def at_gate(gate_dir: Path, world: int) -> bool:
    return all((gate_dir / f"gate.at.{rank}").exists() for rank in range(world))


def start_ranks(world: int, overrides: list[str], log_dir: Path, gate_after_step: int | None = None,
                until_signalled: bool = False) -> list[subprocess.Popen]:
    """``world`` ranks of train.py on the tiny recipe; with ``gate_after_step``, of ``GATED_TRAIN`` (see
    ``wait_at_gate`` and ``open_gate``)."""
    port = free_port()
    procs = []
    log_dir.mkdir(parents=True, exist_ok=True)
    script = REPO / "train.py"
    gate = {}
    if gate_after_step is not None:
        script = log_dir / "gated_train.py"
        script.write_text(GATED_TRAIN)
        gate = gate_environment(log_dir, gate_after_step, until_signalled)
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), LOCAL_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **gate)
        log = open(log_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(script), *TINY, *overrides], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_at_gate(procs, log_dir: Path, timeout: float = 240) -> None:
    """Until every rank of ``start_ranks(..., gate_after_step=...)`` waits at the gate; a rank that exits
    first, or the timeout, fails the test with the logs (and kills the ranks)."""
    import time

    deadline = time.time() + timeout
    try:
        while not at_gate(log_dir, len(procs)):
            assert time.time() < deadline and all(p.poll() is None for p in procs), logs(log_dir)
            time.sleep(0.1)
    except BaseException:
        for p in procs:
            p.kill()
        raise


def open_gate(log_dir: Path) -> None:
    (log_dir / "gate").touch()


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
