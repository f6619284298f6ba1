"""Evaluation suite: linear probe, class-balanced subsets, export to timm, the CLI end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ifc_eval.linear import linear_probe
from ifc_eval.semi import balanced_subset, evaluate, finetune
from tests._dist import run_ranks as spawn_ranks
from tests._launch import run_ranks


def test_linear_probe_separable_features_reach_100():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 32, generator=gen) * 4
    y = torch.randint(0, 4, (400,), generator=gen)
    x = centers[y] + torch.randn(400, 32, generator=gen) * 0.3
    out = linear_probe(x[:300], y[:300], x[300:], y[300:], 4, weight_decays=(0.0, 1e-3), max_iter=100)
    assert out["linear_top1"] == 1.0 and out["linear_top5"] == 1.0
    assert set(out["linear_val_sweep"]) == {"0.0", "0.001"}


def _probe_data():
    gen = torch.Generator().manual_seed(1)
    centers = torch.randn(3, 16, generator=gen)
    y = torch.randint(0, 3, (300,), generator=gen)
    return centers[y] + torch.randn(300, 16, generator=gen), y


def _linear_probe_split(rank, world_size, expected):
    import ifc_eval.linear as linear

    calls = []
    real = linear._fit
    linear._fit = lambda x, *a: calls.append(len(x)) or real(x, *a)
    x, y = _probe_data()
    out = linear.linear_probe(x[:200], y[:200], x[200:], y[200:], 3, weight_decays=(0.0, 1e-3, 1e-2), max_iter=30)
    assert out == expected  # the same result on every rank as in one process
    # the sweep is split (3 candidates: 2 + 1 fits on 180 rows), the final fit (200 rows) on rank 0 only
    assert calls == ([180, 180, 200] if rank == 0 else [180])


def test_linear_probe_splits_its_sweep_over_ranks():
    x, y = _probe_data()
    expected = linear_probe(x[:200], y[:200], x[200:], y[200:], 3, weight_decays=(0.0, 1e-3, 1e-2), max_iter=30)
    spawn_ranks(_linear_probe_split, 2, expected)


def test_finetune_on_an_empty_loader_is_a_clear_error(monkeypatch):
    import ifc_eval.semi as semi
    from ifc_ds.config import load_config
    from ifc_ds.data import load_dataset
    from ifc_ds.model import InstanceEncoder

    monkeypatch.setattr(semi, "make_loader", lambda *a, **k: [])
    encoder = InstanceEncoder(load_config(None, ["model.name=test_resnet"]).model, 16)
    with pytest.raises(ValueError, match="no labelled batch"):
        finetune(encoder.backbone, encoder.backbone.num_features, load_dataset("sklearn:digits:limit=100"), 10, 0.2,
                 16, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), epochs=1)


def test_balanced_subsets_are_balanced_and_reproducible():
    labels = np.repeat(np.arange(10), 500)
    for fraction in (0.01, 0.1):
        rows = balanced_subset(labels, fraction, seed=3)
        counts = np.bincount(labels[rows], minlength=10)
        assert (counts == round(500 * fraction)).all()
        assert np.array_equal(rows, balanced_subset(labels, fraction, seed=3))
        assert not np.array_equal(rows, balanced_subset(labels, fraction, seed=4))


def _semi_data_parallel(rank, world_size):
    import torch.distributed as dist

    from ifc_ds.augment import DeviceViews
    from ifc_ds.config import AugmentConfig, load_config
    from ifc_ds.crops import SampleCrop
    from ifc_ds.data import InstanceDataset, load_dataset, make_loader, ordered_batches
    from ifc_ds.model import InstanceEncoder

    train, test = load_dataset("sklearn:digits:limit=400"), load_dataset("sklearn:digits:start=1600")
    torch.manual_seed(rank)  # different start per rank: DDP must broadcast rank 0's weights
    encoder = InstanceEncoder(load_config(None, ["model.name=test_resnet"]).model, 16)
    mean, std, cpu = (0.5,) * 3, (0.25,) * 3, torch.device("cpu")
    model = finetune(encoder.backbone, encoder.backbone.num_features, train, 10, 0.2, 16, mean, std, cpu,
                     epochs=2, batch_size=16)
    flat = torch.cat([t.detach().float().flatten() for t in model.state_dict().values()])  # buffers too
    copies = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(copies, flat)
    assert torch.equal(copies[0], copies[1])  # the ranks fine-tuned one model together

    crop, views = SampleCrop(16, train=False), DeviceViews(AugmentConfig(), 16, mean, std)

    def my_share():
        for batch in ordered_batches(test, crop, 32, with_labels=True):
            yield views.eval(batch["images"]), batch["labels"]

    top1, rows = evaluate(model, my_share, cpu)
    # reference: the whole test split in one process, no collective
    correct = 0
    with torch.no_grad():
        for batch in make_loader(InstanceDataset(test, crop, with_labels=True), batch_size=64):
            correct += (model(views.eval(batch["images"])).argmax(1) == batch["labels"]).sum().item()
    assert rows == test.num_instances == 197 and top1 == pytest.approx(correct / rows, abs=1e-12)


def test_semi_supervised_is_data_parallel_and_scores_the_whole_test_split():
    spawn_ranks(_semi_data_parallel, 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    assert run_ranks(1, [f"output_dir={out}", "train.batch_size=16", "train.epochs=1"], out / "logs") == [0]
    return out


def test_suite_cli_and_export(trained, tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("datasets:\n  digits:\n    train: sklearn:digits:limit=300\n    test: sklearn:digits:start=1600\n"
                   "protocols: [knn, linear, semi]\nbaselines: [random, 'timm:test_vit']\nknn: {ks: [5, 20]}\n"
                   "linear: {weight_decays: [0.0, 0.001], max_iter: 50}\n"
                   "semi: {fractions: [0.1], epochs: 1, batch_size: 16}\n")
    out = tmp_path / "results"
    proc = subprocess.run([_script("ifc-eval"), "--checkpoint", str(trained), "--config", str(cfg),
                           f"output_dir={out}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    row = results["digits"]
    assert {"knn_top1", "knn_top1_k5", "knn_top1_k20", "linear_top1", "linear_top5", "semi_10pct_top1"} <= set(row)
    assert row["knn_top1"] == row["knn_top1_k20"]
    assert set(results["_baselines"]) == {"random", "timm:test_vit"}
    assert (out / "results.md").read_text().count("| digits |") == 3 and (out / "results.png").stat().st_size > 0
    assert list((out / "features").glob("*.pt"))  # cached for the next protocol / run


def _script(name: str) -> str:
    """An entry point installed beside this interpreter (pyproject's [project.scripts])."""
    from pathlib import Path

    return str(Path(sys.executable).parent / name)


# a process that knows timm and nothing of ifc_ds: what a user of the exported folder has
_TIMM_ALONE = """
import sys, timm, torch
assert not any(m.startswith("ifc") for m in sys.modules)
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True, num_classes=0).eval()
x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
torch.save({"features": model(x), "mean": model.pretrained_cfg["mean"], "std": model.pretrained_cfg["std"],
            "input_size": model.pretrained_cfg["input_size"], "num_features": model.num_features}, sys.argv[2])
"""


def test_export_folder_loads_with_timm_alone(trained, tmp_path):
    """``ifc-export`` writes timm's Hub layout: ``timm.create_model("local-dir:...")`` rebuilds the backbone
    with the run's weights and preprocessing, in a process that never imports ifc_ds."""
    from ifc_ds.model import data_config
    from ifc_eval.export import load_run_encoder
    from ifc_eval.suite import _from_export, load_suite_config

    folder = tmp_path / "exported"
    proc = subprocess.run([_script("ifc-export"), "--checkpoint", str(trained), "--out", str(folder)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors"}
    # nothing of the weights timm would download for the architecture (test_resnet's: r160_in1k, apache-2.0)
    pretrained_cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    assert not {"tag", "license", "hf_hub_id", "paper_ids"} & set(pretrained_cfg), pretrained_cfg
    proc = subprocess.run([sys.executable, "-c", _TIMM_ALONE, str(folder), str(tmp_path / "timm.pt")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = torch.load(tmp_path / "timm.pt")
    encoder = load_run_encoder(str(trained))[0].eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded["features"], encoder.backbone_features(x))
    assert (tuple(loaded["mean"]), tuple(loaded["std"])) == data_config("test_resnet")
    assert tuple(loaded["input_size"]) == (3, 16, 16) and loaded["num_features"] == encoder.backbone.num_features
    # the suite evaluates the folder as it is
    exported = _from_export(str(folder), load_suite_config(None, []))
    torch.testing.assert_close(exported.encoder.backbone.eval()(x), encoder.backbone_features(x))


def test_suite_defaults_to_the_runs_monitor_pair(trained, tmp_path):
    from ifc_ds.checkpoint import read_checkpoint
    from ifc_ds.config import ConfigError
    from ifc_eval.suite import default_datasets, load_suite_config

    cfg = load_suite_config(None, [])
    assert read_checkpoint(str(trained))[1]["config"]["eval"]["train"] is None  # the reason for the error
    with pytest.raises(ConfigError, match="no datasets configured"):
        default_datasets(cfg, str(trained))  # the tiny recipe has no kNN monitor: nothing to fall back on
    run = tmp_path / "run"  # a run's output_dir (not a checkpoint folder) with a monitor pair
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / "checkpoints" / "step_00000001" / "meta.json").write_text(json.dumps(
        {"config": {"eval": {"train": "sklearn:digits", "test": "x/y", "limit_train": 5, "limit_test": None}}}))
    default_datasets(cfg, str(run))
    assert cfg.datasets.pop("monitor").limit_train == 5
    fake = tmp_path / "ckpt"
    fake.mkdir()
    (fake / "meta.json").write_text(json.dumps({"config": {"eval": {"train": "sklearn:digits", "test": "x/y",
                                                                     "limit_train": 7, "limit_test": None}}}))
    default_datasets(cfg, str(fake))
    entry = cfg.datasets["monitor"]
    assert (entry.train, entry.test, entry.limit_train) == ("sklearn:digits", "x/y", 7)


@pytest.mark.parametrize("zero,small_images", [(0, True), (2, False)])
def test_export_takes_the_fp32_master_weights_of_a_bf16_run(tmp_path, zero, small_images):
    """A bf16 run keeps bf16 working weights in the module and fp32 masters in the optimizer (ZeRO-0:
    per parameter group; ZeRO-2: flat partitions): the export must carry the masters. A small-image
    stem comes back from the exported folder alone (``load_exported``)."""
    ds_config = tmp_path / "bf16.json"
    ds_config.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": zero}}))
    out = tmp_path / "run"
    # 32 px: at the tiny recipe's 16 px the test ResNet's layer4 sees 1x1 maps, whose batch norm can send bf16
    # gradients to inf, and DeepSpeed skips such steps (tests/test_zero_elastic.py)
    assert run_ranks(1, [f"output_dir={out}", "train.batch_size=16", "train.max_steps=3", "data.image_size=32",
                         f"train.ds_config={ds_config}"] + (["model.name=resnet18", "model.small_images=true"]
                                                           if small_images else []),
                     tmp_path / "logs") == [0]
    exported = tmp_path / ("backbone" if small_images else "backbone.safetensors")  # a folder, or weights alone
    proc = subprocess.run([_script("ifc-export"), "--checkpoint", str(out), "--out", str(exported)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    from ifc_ds.checkpoint import find_checkpoint

    weights = load_file(exported / "model.safetensors" if small_images else exported)
    umask = os.umask(0)
    os.umask(umask)
    assert (exported / ("model.safetensors" if small_images else "")).stat().st_mode & 0o777 == 0o666 & ~umask
    if small_images:
        from ifc_ds.model import load_exported

        backbone = load_exported(str(exported))
        assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
        assert isinstance(backbone.maxpool, torch.nn.Identity)
        assert all(torch.equal(v, weights[k]) for k, v in backbone.state_dict().items())
    from ifc_ds.engine.state import saved_module_state

    working = saved_module_state(find_checkpoint(str(out), "auto"))
    params = [name for name in weights if "running" not in name and "num_batches" not in name]
    assert params and all(working[f"backbone.{n}"].dtype == torch.bfloat16 for n in params)
    for name in params:
        master = weights[name]
        assert master.dtype == torch.float32
        assert torch.equal(master.bfloat16(), working[f"backbone.{name}"]), name  # its bf16 copy is the module's
    # ... and it is not that copy: trained weights carry bits below bf16's resolution
    assert sum(not torch.equal(weights[n], weights[n].bfloat16().float()) for n in params) > len(params) // 2


def test_feature_cache_follows_the_checkpoints_content(trained, tmp_path):
    """A checkpoint rewritten at the same path (a re-run into the same output_dir) must not be served
    the previous features from the cache."""
    import shutil

    from ifc_ds.checkpoint import find_checkpoint
    from ifc_eval.suite import _cached_features, _from_checkpoint, load_suite_config

    ckpt = tmp_path / "ckpt"
    shutil.copytree(find_checkpoint(str(trained), "auto"), ckpt)
    cfg = load_suite_config(None, [f"output_dir={tmp_path / 'eval'}", "batch_size=64"])
    cpu = torch.device("cpu")
    first = _cached_features(_from_checkpoint(str(ckpt), cfg), "sklearn:digits:limit=64", None, cfg, cpu, "train")[0]
    for states_file in (ckpt / "engine").rglob("*.pt"):  # new weights, same path and meta.json (a re-run)
        states = torch.load(states_file, weights_only=False)
        if "module" in states:
            states["module"] = {k: v * 0.5 if v.is_floating_point() and "running" not in k else v
                                for k, v in states["module"].items()}
            torch.save(states, states_file)
    again = _cached_features(_from_checkpoint(str(ckpt), cfg), "sklearn:digits:limit=64", None, cfg, cpu, "train")[0]
    assert not torch.equal(first, again)
    cached = _cached_features(_from_checkpoint(str(ckpt), cfg), "sklearn:digits:limit=64", None, cfg, cpu, "train")[0]
    assert torch.equal(cached, again)  # an unchanged checkpoint still hits the cache


def test_bare_weights_of_another_architecture_are_a_clear_error(tmp_path):
    """A .safetensors file names no architecture; weights of another one (here the small-image stem's
    3x3 conv1 against `model`'s 7x7) are the one-line CheckpointError (was torch's RuntimeError)."""
    from safetensors.torch import save_file

    from ifc_ds.checkpoint import CheckpointError
    from ifc_ds.config import ModelConfig
    from ifc_ds.model import InstanceEncoder
    from ifc_eval.suite import _from_export, load_suite_config

    weights = tmp_path / "w.safetensors"
    save_file(InstanceEncoder(ModelConfig(name="resnet18", small_images=True), 32).backbone.state_dict(), weights)
    with pytest.raises(CheckpointError, match=r"do not fit model.name=resnet18, model.small_images=False \(size "
                                              r"mismatch for conv1.weight"):
        _from_export(str(weights), load_suite_config(None, ["model.name=resnet18", "image_size=32"]))
    bare = _from_export(str(weights), load_suite_config(None, ["model.name=resnet18", "model.small_images=true"]))
    assert bare.image_size == 224  # nothing names the input size: timm's for resnet18


def test_input_size_where_nothing_gives_one_is_timms_for_the_architecture():
    from ifc_ds.config import ModelConfig
    from ifc_eval.suite import _default_size

    names = ("resnet18", "test_resnet", "vit_small_patch16_384")
    sizes = {name: _default_size(ModelConfig(name=name)) for name in names}
    assert sizes == {"resnet18": 224, "test_resnet": 160, "vit_small_patch16_384": 384}


def test_a_run_and_its_checkpoint_folder_read_alike_and_anything_else_is_a_clear_error(trained, tmp_path):
    """Export and the suite find a run's checkpoint through ``read_checkpoint`` (once two copies)."""
    import json

    from ifc_ds.checkpoint import CheckpointError, find_checkpoint, read_checkpoint
    from ifc_ds.config import ConfigError
    from ifc_eval.suite import default_datasets, load_suite_config

    newest = find_checkpoint(str(trained), "auto")
    for path in (trained, newest):
        assert read_checkpoint(str(path)) == (newest, json.loads((newest / "meta.json").read_text()))
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        read_checkpoint(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint found"):
        read_checkpoint(str(tmp_path))
    with pytest.raises(ConfigError, match="no datasets configured"):  # random weights: no run to fall back on
        default_datasets(load_suite_config(None, []), "random")


@pytest.mark.parametrize("command, message", [
    # random weights and no datasets: no run to fall back on (this ran nothing and wrote an empty report)
    (["ifc-eval", "--checkpoint", "random", "model.name=test_resnet"], "ConfigError: no datasets configured"),
    # a path that is no run: the checkpoint's error, not 'the run has no eval.train' (it was read as no run)
    (["ifc-eval", "--checkpoint", "{tmp}/missing"], "CheckpointError: {tmp}/missing: not a run's output_dir"),
    (["ifc-eval", "--checkpoint", "random", "no_such_key=1"], "ConfigError: unknown config key 'no_such_key'"),
    (["ifc-eval", "--checkpoint", "random", "--config", "{tmp}/none.yaml"],
     "ConfigError: config file {tmp}/none.yaml does not exist"),  # was FileNotFoundError
    # refused before anything is evaluated (was: after the checkpoint's whole evaluation)
    (["ifc-eval", "--checkpoint", "random", "model.name=test_resnet", "datasets.d.train=sklearn:digits",
      "datasets.d.test=sklearn:digits", "baselines=[imagenet]"], "ConfigError: baselines: unknown 'imagenet'"),
    (["ifc-export", "--checkpoint", "{tmp}/missing", "--out", "{tmp}/x"], "CheckpointError: {tmp}/missing: not a run"),
    (["ifc-preview", "--data", "nope:1", "--out", "{tmp}/v.png"], "DatasetSpecError: dataset 'nope:1': unknown kind"),
])
def test_the_commands_answer_bad_input_in_one_line_and_exit_2(tmp_path, command, message):
    """Like train.py (tests/test_train.py): exit 2 (lifecycle.EXIT_USAGE) and the error's one line, no traceback."""
    argv = [_script(command[0])] + [arg.format(tmp=tmp_path) for arg in command[1:]]
    proc = subprocess.run(argv + ([f"output_dir={tmp_path}"] if command[0] == "ifc-eval" else []),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message.format(tmp=tmp_path) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "features").exists()  # nothing evaluated


def test_the_suite_tears_its_process_group_down(tmp_path):
    """ifc-eval ends as train.py does (lifecycle.finish: a barrier, then the group destroyed). It used to
    return with the group up: under srun a rank that left first made gloo abort its peer ("terminate
    called without an active exception"), and the SLURM eval job failed after its results were written."""
    script = ("import sys, torch.distributed as dist\nfrom ifc_eval.suite import main\n"
              "code = main(sys.argv[1:])\nprint('group left up' if dist.is_initialized() else 'group torn down')\n"
              "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", script, "--checkpoint", "random", "model.name=test_resnet",
                           "image_size=16", "datasets.d.train=sklearn:digits:limit=60",
                           "datasets.d.test=sklearn:digits:start=1700", "protocols=[knn]", f"output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("group torn down"), proc.stdout[-500:]
