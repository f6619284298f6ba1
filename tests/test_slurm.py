"""The sbatch scripts on a real one-node SLURM cluster (slurm/local_cluster.sh; root only)."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from ifc_ds.checkpoint import find_checkpoint
from tests._launch import REPO, TINY, at_gate, gate_environment, gate_site, open_gate, run_ranks
from tests.test_train import assert_same_state

pytestmark = pytest.mark.slurm
SLURM_DIR = "/tmp/ifc_ds_slurm_tests"


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root")
    env = dict(os.environ, IFC_DS_SLURM_DIR=SLURM_DIR)
    started = subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "start"], env=env,
                             capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        pytest.skip(f"SLURM could not start: {started.stderr.strip()[-500:]}")
    env.update(SLURM_CONF=f"{SLURM_DIR}/slurm.conf", IFC_DS_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    yield env
    subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "stop"], env=env, timeout=60)


def job_state(env, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\S+)", out)
    return match.group(1) if match else "UNKNOWN"


def wait_job(env, job: str, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(env, job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    raise AssertionError(f"job {job} did not finish in {timeout}s (state {job_state(env, job)})")


def job_log(name: str, job: str) -> str:
    path = REPO / "logs" / f"{name}-{job}.out"
    return path.read_text()[-4000:] if path.exists() else "(no log)"


def test_submit_pretrain_then_dependent_eval(slurm, tmp_path):
    out = tmp_path / "run"
    eval_cfg = tmp_path / "eval.yaml"
    eval_cfg.write_text("datasets:\n  digits:\n    train: sklearn:digits:limit=200\n"
                        "    test: sklearn:digits:start=1700\nprotocols: [knn, linear]\nknn: {ks: [5, 20]}\n"
                        "linear: {weight_decays: [0.0, 0.001], max_iter: 50}\n")
    proc = subprocess.run(["bash", str(REPO / "slurm" / "submit.sh"), "--tasks-per-node", "2", "--cpus-per-task", "1",
                           "--output-dir", str(out), "--eval-config", str(eval_cfg), "--", *TINY],
                          env=slurm, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    pretrain = re.search(r"pretrain job: (\d+)", proc.stdout).group(1)
    evaluation = re.search(r"eval job: (\d+)", proc.stdout).group(1)
    assert wait_job(slurm, pretrain) == "COMPLETED", job_log("ifc_ds-pretrain", pretrain)
    assert wait_job(slurm, evaluation) == "COMPLETED", job_log("ifc_ds-eval", evaluation)
    assert find_checkpoint(str(out), "auto") is not None
    results = json.loads((out / "eval" / "results.json").read_text())
    assert 0 < results["digits"]["knn_top1"] <= 1 and "linear_top1" in results["digits"]
    assert "2 tasks" in job_log("ifc_ds-pretrain", pretrain)


def test_usr1_checkpoints_requeues_and_matches_uninterrupted(slurm, tmp_path):
    args = [*TINY, "train.epochs=3", "checkpoint.every_steps=2"]
    reference = tmp_path / "reference"
    assert run_ranks(2, [*args, f"output_dir={reference}"], tmp_path / "ref_logs") == [0, 0]

    out = tmp_path / "run"
    (REPO / "logs").mkdir(exist_ok=True)
    # the ranks wait after step 3 until the signal has come (polling for step 3 left ~3 steps, under a second,
    # for the signal to arrive through slurmctld and slurmd before the run's end)
    gated = dict(slurm, **gate_environment(tmp_path, 3, until_signalled=True),
                 PYTHONPATH=os.pathsep.join(filter(None, [str(gate_site(tmp_path / "site")),
                                                          slurm.get("PYTHONPATH")])))
    submit = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", f"--chdir={REPO}",
                             str(REPO / "slurm" / "pretrain.sbatch"), *args, f"output_dir={out}"],
                            env=gated, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip()
    deadline = time.time() + 300
    while not at_gate(tmp_path, 2):
        assert time.time() < deadline and job_state(slurm, job) in ("PENDING", "CONFIGURING", "RUNNING"), \
            job_log("ifc_ds-pretrain", job)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    open_gate(tmp_path)  # (each rank goes on once the signal has come through slurmctld and slurmd)
    assert wait_job(slurm, job, timeout=600) == "COMPLETED", job_log("ifc_ds-pretrain", job)
    log = job_log("ifc_ds-pretrain", job)
    assert "requeueing" in log and "restart 1" in log, log
    assert_same_state(find_checkpoint(str(out), "auto"), find_checkpoint(str(reference), "auto"))
