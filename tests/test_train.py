"""End to end: real ranks running train.py; resume (exact, elastic), faults, signals, the NaN guard."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ifc_ds.checkpoint import CheckpointError, check_compatible, find_checkpoint
from ifc_ds.config import load_config
from ifc_ds.engine import warmup_cosine
from ifc_ds.lifecycle import EXIT_FAILED, EXIT_NONFINITE, EXIT_PEER_LOST, EXIT_PREEMPTED
from tests._launch import REPO, RUN_TRAIN, TINY, logs, open_gate, run_ranks, start_ranks, wait_at_gate, wait_ranks


def rows(ckpt: Path) -> dict:
    """Assembled classifier weight and optimizer state [N, D] from a checkpoint's row files."""
    parts = [torch.load(p, weights_only=False) for p in sorted((ckpt / "classifier").glob("rows_*.pt"))]
    out = {"weight": torch.cat([p["weight"] for p in parts])}
    for key in parts[0]["tensors"]:
        if key.startswith("state."):
            out[key] = torch.cat([p["tensors"][key] for p in parts])
    return out


def backbone(ckpt: Path) -> dict:
    from ifc_ds.engine.state import saved_module_state

    return saved_module_state(ckpt)


def assert_same_state(a: Path, b: Path):
    ra, rb = rows(a), rows(b)
    assert ra.keys() == rb.keys()
    for key in ra:
        assert torch.equal(ra[key], rb[key]), key
    ba, bb = backbone(a), backbone(b)
    assert ba.keys() == bb.keys()
    for key in ba:
        assert torch.equal(ba[key], bb[key]), key


def metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_sec"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def ok(codes, log_dir):
    assert codes == [0] * len(codes), logs(log_dir)


def assert_lr(row: dict, base: float, total: int, warmup: int):
    """The LRs logged after optimizer step ``row["step"]``: ``base`` (train.lr x global batch / 256) on
    the schedule of ``total`` steps, and the classifier's at classifier_lr_scale (10) times that."""
    expected = base * warmup_cosine(row["step"], total, warmup, 0.0)
    assert row["lr"] == pytest.approx(expected, rel=1e-9), (row, expected)
    assert row["classifier_lr"] == pytest.approx(10 * expected, rel=1e-9), row


def saves(log_dir: Path) -> list[str]:
    """The checkpoints rank 0 published, in order."""
    lines = (log_dir / "rank0.log").read_text().splitlines()
    return [line.split("checkpoint ")[1].split()[0] for line in lines if "ifc_ds.checkpoint: checkpoint " in line]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank run of 9 steps (3 epochs) with checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("ref")
    args = [f"output_dir={out}", "train.epochs=3", "checkpoint.every_steps=2", "checkpoint.keep_last=10"]
    ok(run_ranks(2, args, out / "logs"), out / "logs")
    return out


def test_two_rank_run_outputs_and_falling_loss(tmp_path):
    out = tmp_path / "run"
    ok(run_ranks(2, [f"output_dir={out}", "train.epochs=4", "eval.train=sklearn:digits", "eval.limit_train=120",
                     "eval.k=10", "eval.every_epochs=2"], tmp_path / "logs"), tmp_path / "logs")
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "training.png", "checkpoints/latest"):
        assert (out / name).exists(), name
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, 13))
    assert set(m[0]) >= {"step", "epoch", "loss", "lr", "instance_acc"}
    first, last = sum(r["loss"] for r in m[:3]) / 3, sum(r["loss"] for r in m[-3:]) / 3
    assert last < first - 0.05, (first, last)
    ev = json.loads((out / "eval.json").read_text())
    assert 0.0 <= ev["knn_top1"] <= 1.0 and len(ev["history"]) == 2  # after epoch 2, and at the end
    assert 0.0 <= ev["knn_top1_untrained"] <= 1.0  # the baseline: the same network before its first step
    # one checkpoint per epoch end, the last one written once, after the final evaluation
    assert saves(tmp_path / "logs") == ["step_00000003", "step_00000006", "step_00000009", "step_00000012"]
    assert len(torch.load(out / "checkpoints" / "step_00000012" / "trainer" / "state.pt",
                          weights_only=False)["evals"]) == 2
    assert load_config(out / "config.yaml").train.epochs == 4


def test_exact_resume_mid_epoch_is_bitwise(tmp_path, reference):
    out = tmp_path / "run"
    common = [f"output_dir={out}", "train.epochs=3", "checkpoint.every_steps=2"]
    ok(run_ranks(2, common + ["train.max_steps=4"], tmp_path / "a"), tmp_path / "a")  # step 4 = mid epoch 2
    ok(run_ranks(2, common, tmp_path / "b"), tmp_path / "b")  # resume=auto, to the end (step 9)
    assert_same_state(find_checkpoint(str(out), "auto"), find_checkpoint(str(reference), "auto"))
    assert metrics(out) == metrics(reference)


@pytest.mark.parametrize("new_world", [1, 3])
def test_elastic_resume_from_two_ranks(tmp_path, reference, new_world):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints" / "step_00000004", out / "checkpoints" / "step_00000004")
    before = rows(out / "checkpoints" / "step_00000004")
    # resume on new_world ranks without a step: the re-sharded rows are written back unchanged
    ok(run_ranks(new_world, [f"output_dir={out}", "train.epochs=3", "train.max_steps=4"], tmp_path / "a"),
       tmp_path / "a")
    latest = find_checkpoint(str(out), "auto")
    assert json.loads((latest / "meta.json").read_text())["world_size"] == new_world
    after = rows(latest)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert torch.load(latest / "trainer" / "state.pt", weights_only=False)["offset"] == 16  # mid-epoch position
    ok(run_ranks(new_world, [f"output_dir={out}", "train.epochs=3"], tmp_path / "b"), tmp_path / "b")
    final = torch.load(find_checkpoint(str(out), "auto") / "trainer" / "state.pt", weights_only=False)
    assert (final["epoch"], final["offset"]) == (3, 0)  # the 3 epochs completed, on another global batch
    assert metrics(out)[-1]["epoch"] == 3.0
    # both LRs follow the new global batch (8 images per rank) on the re-planned schedule: the rest of
    # epoch 2 (positions 16..48) plus epoch 3, the warm-up half an epoch of the new length
    total, warmup = {1: (4 + 4 + 6, 3), 3: (4 + 1 + 2, 1)}[new_world]
    for row in metrics(out):
        assert_lr(row, 0.05 * 8 * new_world / 256, total, warmup)


def test_elastic_resume_zero2_two_to_one(tmp_path):
    """ZeRO-2 partitions the backbone's optimizer state per rank; train.py re-partitions it onto one rank
    (exactness of that is tests/test_zero_elastic.py) and trains on."""
    out = tmp_path / "run"
    zero2 = ["train.ds_config=ds_configs/zero2_fp32.json"]
    ok(run_ranks(2, [f"output_dir={out}", "train.max_steps=2", *zero2], tmp_path / "a"), tmp_path / "a")
    before = rows(find_checkpoint(str(out), "auto"))
    ok(run_ranks(1, [f"output_dir={out}", "train.batch_size=16", "train.max_steps=3", *zero2], tmp_path / "b"),
       tmp_path / "b")
    log = (tmp_path / "b" / "rank0.log").read_text()
    assert "elastic resume: 2 -> 1 ranks" in log and "optimizer state re-partitioned from 2 to 1 ranks" in log
    latest = find_checkpoint(str(out), "auto")
    assert latest.name == "step_00000003" and torch.isfinite(rows(latest)["weight"]).all()
    assert not torch.equal(rows(latest)["weight"], before["weight"])  # it trained on
    # the backbone (fresh ZeRO scheduler) and the classifier (restored one) both follow the new global
    # batch of 16 on the re-planned schedule (1 step left in epoch 1, then epoch 2 of 3 steps)
    assert_lr(metrics(out)[-1], 0.05 * 16 / 256, 2 + 1 + 3, 2)


def test_elastic_resume_one_to_two(tmp_path):
    out = tmp_path / "run"
    ok(run_ranks(1, [f"output_dir={out}", "train.batch_size=16", "train.max_steps=2"], tmp_path / "a"), tmp_path / "a")
    before = rows(find_checkpoint(str(out), "auto"))
    ok(run_ranks(2, [f"output_dir={out}", "train.max_steps=2"], tmp_path / "b"), tmp_path / "b")
    after = rows(find_checkpoint(str(out), "auto"))
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_kill_minus_nine_then_resume(tmp_path, reference):
    out = tmp_path / "run"
    args = [f"output_dir={out}", "train.epochs=3", "checkpoint.every_steps=2", "dist.timeout_s=20"]
    procs = start_ranks(2, args, tmp_path / "a", gate_after_step=5)
    wait_at_gate(procs, tmp_path / "a")  # (the checkpoint of step 4 is complete)
    assert (out / "checkpoints" / "step_00000004" / "meta.json").exists()
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait(timeout=30)
    open_gate(tmp_path / "a")  # rank 0 goes on into step 6, whose collectives find its peer gone
    t0 = time.time()
    code = procs[0].wait(timeout=120)
    assert code == EXIT_PEER_LOST and time.time() - t0 < 60, logs(tmp_path / "a")
    assert "a peer rank died or a collective timed out" in (tmp_path / "a" / "rank0.log").read_text()
    ok(run_ranks(2, args, tmp_path / "b"), tmp_path / "b")  # resume=auto
    assert_same_state(find_checkpoint(str(out), "auto"), find_checkpoint(str(reference), "auto"))


def test_sigterm_checkpoints_and_exits_distinctly(tmp_path, reference):
    out = tmp_path / "run"
    args = [f"output_dir={out}", "train.epochs=3", "checkpoint.every_steps=2"]
    procs = start_ranks(2, args, tmp_path / "a", gate_after_step=3, until_signalled=True)
    wait_at_gate(procs, tmp_path / "a")
    for p in procs:
        p.send_signal(signal.SIGTERM)
    open_gate(tmp_path / "a")
    assert wait_ranks(procs, 120) == [EXIT_PREEMPTED] * 2, logs(tmp_path / "a")
    stopped = find_checkpoint(str(out), "auto")  # the ranks agree on the signal after their next step
    assert stopped is not None and stopped.name == "step_00000004", stopped
    ok(run_ranks(2, args, tmp_path / "b"), tmp_path / "b")
    assert_same_state(find_checkpoint(str(out), "auto"), find_checkpoint(str(reference), "auto"))


def test_partial_checkpoints_are_ignored(tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints" / "step_00000004", out / "checkpoints" / "step_00000004")
    (out / "checkpoints" / "latest").write_text("step_00000004")
    (out / "checkpoints" / ".tmp-step_00000006").mkdir()  # interrupted before the rename
    partial = out / "checkpoints" / "step_00000008"  # renamed by hand, never completed
    shutil.copytree(reference / "checkpoints" / "step_00000004" / "engine", partial / "engine")
    assert find_checkpoint(str(out), "auto").name == "step_00000004"
    (out / "checkpoints" / "latest").write_text("step_00000008")  # a pointer to an incomplete folder
    assert find_checkpoint(str(out), "auto").name == "step_00000004"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        find_checkpoint(str(out), str(partial))
    assert find_checkpoint(str(out), "none") is None


def test_mismatched_config_is_refused(reference):
    ckpt = find_checkpoint(str(reference), "auto")
    meta = json.loads((ckpt / "meta.json").read_text())
    base = TINY + [f"output_dir={reference}", "train.epochs=3"]
    same = base + ["checkpoint.keep_last=10", "checkpoint.every_steps=2"]
    assert check_compatible(meta, load_config(None, same), 48) == []
    changes = check_compatible(meta, load_config(None, base + ["train.lr=0.5"]), 48)
    assert any(c.startswith("train.lr") for c in changes)
    with pytest.raises(CheckpointError, match="N=48"):
        check_compatible(meta, load_config(None, base), 50)
    with pytest.raises(CheckpointError, match="model.dim"):
        check_compatible(meta, load_config(None, base + ["model.dim=8"]), 48)
    # every structural key, each changed alone: a resume with any of them changed is refused by name
    for change in ("model.name=resnet18", "model.small_images=true", "model.head_hidden=64",
                   "model.kwargs={drop_rate: 0.1}"):
        key = change.split("=")[0]
        with pytest.raises(CheckpointError, match=rf"trained with {re.escape(key)}="):
            check_compatible(meta, load_config(None, base + [change]), 48)
    with pytest.raises(CheckpointError, match="checkpoint format 1 != supported"):  # before timm's param groups
        check_compatible({**meta, "format_version": 1}, load_config(None, same), 48)


NAN_SCRIPT = """
import sys, torch
from ifc_ds import classifier
real = classifier.ShardedInstanceClassifier.forward
calls = [0]
def forward(self, *a, **k):
    calls[0] += 1
    loss = real(self, *a, **k)
    return loss * float("nan") if calls[0] > 3 else loss
classifier.ShardedInstanceClassifier.forward = forward
sys.argv = ["train.py"] + sys.argv[1:]
import train
sys.exit(train.main())
"""


def test_nonfinite_loss_guard(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", NAN_SCRIPT, *TINY, f"output_dir={out}", "train.batch_size=16",
                           "train.nonfinite_patience=2"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == EXIT_NONFINITE, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "non-finite loss" in proc.stderr + proc.stdout
    good = find_checkpoint(str(out), "auto")
    assert good.name == "step_00000003"  # the end of epoch 1, before the bad steps
    assert torch.isfinite(rows(good)["weight"]).all()


def test_lazy_raw_init_no_smoothing_tensorboard(tmp_path):
    out = tmp_path / "run"
    ok(run_ranks(2, [f"output_dir={out}", "hooks.raw_init.mode=lazy", "hooks.smoothing.enabled=false",
                     "log.tensorboard=true", "train.epochs=1"], tmp_path / "logs"), tmp_path / "logs")
    assert list((out / "tensorboard").glob("events.*"))
    state = torch.load(find_checkpoint(str(out), "auto") / "trainer" / "state.pt", weights_only=False)
    assert state["hooks"][0]["seen"].all()  # after one epoch every row was initialised on first sight
    assert all(m["smoothing_eps"] == 0.0 for m in metrics(out))


def test_hooks_disabled(tmp_path):
    out = tmp_path / "run"
    ok(run_ranks(1, [f"output_dir={out}", "hooks.raw_init.enabled=false", "hooks.smoothing.enabled=false",
                     "train.batch_size=16", "train.max_steps=2"], tmp_path / "logs"), tmp_path / "logs")
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert "hooks: none" in log and "raw-feature init" not in log


def test_streaming_pretraining(tmp_path):
    import datasets

    from ifc_ds.data import load_dataset

    digits = load_dataset("sklearn:digits", limit=48).table
    digits.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "d.parquet"))
    out = tmp_path / "run"
    ok(run_ranks(2, [f"output_dir={out}", f"data.train=parquet:{tmp_path}/d.parquet", "data.streaming=true",
                     "data.limit=null", "data.num_instances=48"], tmp_path / "logs"), tmp_path / "logs")
    m = metrics(out)
    assert m[-1]["epoch"] == 2.0 and len(m) == 6  # 48 // 16 = 3 steps per epoch
    assert torch.isfinite(rows(find_checkpoint(str(out), "auto"))["weight"]).all()


def test_resume_with_a_new_learning_rate(tmp_path):
    """A changed train.lr on resume takes effect for both engines: the resumed steps log the LRs of a
    run that had the new value from the start (the checkpoint's LambdaLR base LRs are not kept)."""
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    ok(run_ranks(2, [f"output_dir={out}", "train.max_steps=2"], tmp_path / "a"), tmp_path / "a")
    ok(run_ranks(2, [f"output_dir={out}", "train.max_steps=4", "train.lr=0.5"], tmp_path / "b"), tmp_path / "b")
    assert "train.lr: 0.05 -> 0.5" in (tmp_path / "b" / "rank0.log").read_text()
    ok(run_ranks(2, [f"output_dir={fresh}", "train.max_steps=4", "train.lr=0.5"], tmp_path / "c"), tmp_path / "c")
    resumed, reference = metrics(out)[2:], metrics(fresh)[2:]
    assert [r["step"] for r in resumed] == [3, 4]
    for row, ref in zip(resumed, reference):
        assert (row["lr"], row["classifier_lr"]) == (ref["lr"], ref["classifier_lr"])
        assert_lr(row, 0.5 * 16 / 256, 6, 2)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    """gradient_accumulation_steps=2 with 4 images per micro-batch: a step is 2 micro-batches (a global
    batch of 16 on 2 ranks), so the schedule, the checkpoints, DeepSpeed's own step count and the
    sampler all count optimizer steps, exactly as with 8 images per rank and no accumulation."""
    ds_config = tmp_path / "gas2.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 0}, "gradient_accumulation_steps": 2}))
    out, plain = tmp_path / "run", tmp_path / "plain"
    ok(run_ranks(2, [f"output_dir={out}", "train.batch_size=4", f"train.ds_config={ds_config}"], tmp_path / "a"),
       tmp_path / "a")
    ok(run_ranks(2, [f"output_dir={plain}"], tmp_path / "b"), tmp_path / "b")
    m, ref = metrics(out), metrics(plain)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6] and m[-1]["epoch"] == 2.0
    assert [(r["lr"], r["classifier_lr"], r["smoothing_eps"]) for r in m] == \
        [(r["lr"], r["classifier_lr"], r["smoothing_eps"]) for r in ref]
    assert saves(tmp_path / "a") == ["step_00000003", "step_00000006"]
    from ifc_ds.engine.state import saved_engine_counters

    assert saved_engine_counters(out / "checkpoints" / "step_00000006") == (6, 6 * 16)


CRASH_SCRIPT = """
import os, signal, sys
from pathlib import Path
from ifc_ds import checkpoint
point = sys.argv[2]
checkpoint._crash_point = lambda name: os.kill(os.getpid(), signal.SIGKILL) if name == point else None
root = Path(sys.argv[1])
checkpoint.publish(root, root / ".tmp-step_00000004", "step_00000004", keep_last=2)
"""


@pytest.mark.parametrize("point", ["renamed", "pointed", "never"])
def test_replacing_a_checkpoint_is_atomic(tmp_path, point):
    """Re-saving a step (SIGKILL at each point between the operations): resume=auto always finds a
    complete checkpoint of that step, old or new, and a finished re-save leaves only the new one."""
    root = tmp_path / "checkpoints"
    for name, content in (("step_00000004", "old"), (".tmp-step_00000004", "new")):
        (root / name).mkdir(parents=True)
        (root / name / "meta.json").write_text(json.dumps({"step": 4, "content": content}))
    (root / "latest").write_text("step_00000004")
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(root), point], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == (-signal.SIGKILL if point != "never" else 0), proc.stderr
    found = find_checkpoint(str(tmp_path), "auto")
    content = json.loads((found / "meta.json").read_text())["content"]
    assert json.loads((found / "meta.json").read_text())["step"] == 4
    assert content == ("old" if point == "renamed" and found.name == "step_00000004" else "new")
    if point == "never":
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004.1"]


# A training script with a fault injected. A file, not `python -c`: DataLoader workers start from a
# forkserver that imports the launching script (ifc_ds.workers), so the patch reaches the workers
# too; the mode comes from the environment, which the forkserver inherits (its argv is its own).
FAILURE_SCRIPT = """
import os, sys, torch
from ifc_ds import data, engine
MODE = os.environ["IFC_DS_TEST_FAULT"]
if MODE in ("worker", "hang"):
    real = data.InstanceDataset.__getitem__
    def crash(self, index):
        import time
        if torch.utils.data.get_worker_info() is not None:
            if MODE == "hang":
                time.sleep(600)  # a worker stuck on a file system or a decoder
            os._exit(3)  # a worker dies (OOM killer, segfault in a decoder)
        return real(self, index)
    data.InstanceDataset.__getitem__ = crash
else:
    def step(*args, **kwargs):
        raise RuntimeError("NCCL-free failure: the step timed out on something of its own")
    engine.train_step = step
    import ifc_ds.trainer
    ifc_ds.trainer.train_step = step
""" + RUN_TRAIN


@pytest.mark.parametrize("failure", ["worker", "hang", "step"])
def test_own_failures_keep_their_traceback_and_do_not_claim_a_lost_peer(tmp_path, failure):
    """A crashed DataLoader worker, a stuck one (the loader's timeout, dist.timeout_s, turns it into an
    error), and a RuntimeError of the step whose text says "timed out" are this rank's failures."""
    script = tmp_path / "failing_train.py"
    script.write_text(FAILURE_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", IFC_DS_TEST_FAULT=failure)
    proc = subprocess.run([sys.executable, str(script), *TINY, f"output_dir={tmp_path / 'run'}",
                           "train.batch_size=16", "data.num_workers=1", "data.in_memory=never",
                           "hooks.raw_init.enabled=false", "dist.timeout_s=10"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_FAILED and proc.returncode != EXIT_PEER_LOST, output[-3000:]
    assert "Traceback (most recent call last)" in output and "a peer rank died" not in output
    expected = {"worker": "exited unexpectedly", "hang": "DataLoader timed out after 10.0 seconds",
                "step": "on something of its own"}[failure]
    assert expected in output


@pytest.mark.parametrize("override,line", [
    ("data.train=parquet:/nonexistent/*.parquet",
     "DatasetSpecError: dataset 'parquet:/nonexistent/*.parquet': no file matches"),
    ("train.no_such_key=1", "ConfigError: unknown config key 'train.no_such_key'"),  # raised by load_config
    # raised once the model is built (were timm's RuntimeError / TypeError, and a Triton RuntimeError at the
    # first forward: tracebacks and exit 1)
    ("model.name=resnet999", "ConfigError: model.name='resnet999' is not a timm model"),
    ("model.kwargs={drop_rat: 0.1}", "ConfigError: model.kwargs={'drop_rat': 0.1}: test_resnet does not take it"),
    ("classifier.fused=always", "ConfigError: classifier.fused=always on CPU runs the Triton kernels in the "
                                "interpreter only")])
def test_bad_input_is_one_line_and_exit_2(tmp_path, override, line):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "train.py", *TINY, f"output_dir={tmp_path}", override], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert line in proc.stderr
    assert "Traceback" not in proc.stderr


def test_in_memory_and_on_the_fly_train_identically(tmp_path, reference):
    """Decoding every sample in DataLoader workers gives bitwise the run that decoding once into memory
    gives: the same crops, the same device views, the same steps."""
    out = tmp_path / "run"
    ok(run_ranks(2, [f"output_dir={out}", "train.epochs=3", "checkpoint.every_steps=2", "data.in_memory=never",
                     "data.num_workers=1"], tmp_path / "a"), tmp_path / "a")
    assert "decoded into memory" in (reference / "logs" / "rank0.log").read_text()
    assert "decoded into memory" not in (tmp_path / "a" / "rank0.log").read_text()
    assert_same_state(find_checkpoint(str(out), "auto"), find_checkpoint(str(reference), "auto"))
