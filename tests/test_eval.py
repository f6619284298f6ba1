"""Evaluation suite: linear probe, class-balanced subsets, export to timm, the CLI end to end."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from eval.linear import linear_probe
from eval.semi import balanced_subset, evaluate, finetune
from tests._dist import run_ranks as spawn_ranks
from tests._launch import REPO, run_ranks


def test_linear_probe_separable_features_reach_100():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 32, generator=gen) * 4
    y = torch.randint(0, 4, (400,), generator=gen)
    x = centers[y] + torch.randn(400, 32, generator=gen) * 0.3
    out = linear_probe(x[:300], y[:300], x[300:], y[300:], 4, weight_decays=(0.0, 1e-3), max_iter=100)
    assert out["linear_top1"] == 1.0 and out["linear_top5"] == 1.0
    assert set(out["linear_val_sweep"]) == {"0.0", "0.001"}


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

    from ifc_ds.augment import eval_transform
    from ifc_ds.config import load_config
    from ifc_ds.data import InstanceDataset, load_dataset, make_loader
    from ifc_ds.features import shard_batches
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

    transform = eval_transform(16, mean, std, 1.0)

    def my_share():
        for batch in shard_batches(test, transform, 32, with_labels=True):
            yield batch["images"], batch["labels"]

    top1, rows = evaluate(model, my_share, cpu)
    # reference: the whole test split in one process, no collective
    correct = 0
    with torch.no_grad():
        for batch in make_loader(InstanceDataset(test, transform, with_labels=True), batch_size=64):
            correct += (model(batch["images"]).argmax(1) == batch["labels"]).sum().item()
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
    proc = subprocess.run([sys.executable, "eval/suite.py", "--checkpoint", str(trained), "--config", str(cfg),
                           f"output_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    row = results["digits"]
    assert {"knn_top1", "knn_top1_k5", "knn_top1_k20", "linear_top1", "linear_top5", "semi_10pct_top1"} <= set(row)
    assert row["knn_top1"] == row["knn_top1_k20"]
    assert set(results["_baselines"]) == {"random", "timm:test_vit"}
    assert (out / "results.md").read_text().count("| digits |") == 3 and (out / "results.png").stat().st_size > 0
    assert list((out / "features").glob("*.pt"))  # cached for the next protocol / run

    exported = tmp_path / "backbone.safetensors"
    proc = subprocess.run([sys.executable, "eval/suite.py", "export", "--checkpoint", str(trained), "--out",
                           str(exported)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import timm

    from ifc_ds.config import load_config
    from ifc_ds.model import InstanceEncoder

    model = timm.create_model("test_resnet", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(exported)))
    encoder = InstanceEncoder(load_config(trained / "config.yaml").model, 16)
    states = torch.load(next((trained / "checkpoints").glob("step_*")) / "engine" / "backbone" /
                        "mp_rank_00_model_states.pt", weights_only=False)["module"]
    encoder.load_state_dict(states)
    model.eval(), encoder.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x), encoder.backbone_features(x))


def test_suite_defaults_to_the_runs_monitor_pair(trained, tmp_path):
    from eval.suite import default_datasets, load_suite_config

    cfg = load_suite_config(None, [])
    with pytest.raises(Exception, match="no datasets configured"):
        default_datasets(cfg, str(trained))  # the tiny recipe has no kNN monitor: nothing to fall back on
    fake = tmp_path / "ckpt"
    fake.mkdir()
    (fake / "meta.json").write_text(json.dumps({"config": {"eval": {"train": "sklearn:digits", "test": "x/y",
                                                                     "limit_train": 7, "limit_test": None}}}))
    default_datasets(cfg, str(fake))
    entry = cfg.datasets["monitor"]
    assert (entry.train, entry.test, entry.limit_train) == ("sklearn:digits", "x/y", 7)
