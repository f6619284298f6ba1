"""Transfer evaluation: kNN, linear probe and semi-supervised fine-tuning on any labelled datasets.

    ifc-eval --checkpoint out/cifar10 --config ifc_eval/configs/cifar10.yaml [key=value ...]
    deepspeed --num_gpus 2 --module ifc_eval.suite --checkpoint out/cifar10 --config ...   # data-parallel

``--checkpoint`` takes a run's output_dir (its newest checkpoint), a checkpoint folder, a folder
written by ``ifc-export``, an exported ``.safetensors`` file (with ``model.name=...``), or ``random``
(an untrained ``model``).
Baselines (``baselines: [random, timm:<name>]``) are evaluated side by side. Writes ``results.json``,
``results.md`` and ``results.png`` in ``output_dir``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch

from ifc_ds.augment import DeviceViews, eval_crop
from ifc_ds.checkpoint import CheckpointError, content_key, read_checkpoint
from ifc_ds.collectives import rank_in, size
from ifc_ds.config import AugmentConfig, ConfigError, ModelConfig, apply_mapping, parse_overrides, read_yaml_mapping
from ifc_ds.crops import batch_crops
from ifc_ds.data import (
    load_dataset,
    ordered_batches,
)
from ifc_ds.dist import device, init_distributed, is_main
from ifc_ds.features import extract_features
from ifc_ds.knn import knn_predict, topk_accuracy
from ifc_ds.lifecycle import bad_input_exits, finish
from ifc_ds.model import InstanceEncoder, data_config, read_export
from ifc_eval.export import load_run_encoder

log = logging.getLogger("ifc_ds.eval")


# --------------------------------------------------------------------------- config
@dataclass
class DatasetEntry:
    train: str = ""
    test: str = ""
    limit_train: int | None = None
    limit_test: int | None = None


@dataclass
class KnnSettings:
    ks: list = field(default_factory=lambda: [20, 200])
    temperature: float = 0.07


@dataclass
class LinearSettings:
    weight_decays: list = field(default_factory=lambda: [0.0, 1e-5, 1e-4, 1e-3, 1e-2])
    val_fraction: float = 0.1
    max_iter: int = 200


@dataclass
class SemiSettings:
    fractions: list = field(default_factory=lambda: [0.01, 0.1])
    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 64


@dataclass
class EvalSuiteConfig:
    output_dir: str = "out/eval"
    datasets: dict = field(default_factory=dict)  # name -> {train, test, limit_train, limit_test}
    protocols: list = field(default_factory=lambda: ["knn", "linear"])  # knn | linear | semi
    baselines: list = field(default_factory=list)  # random | timm:<name>
    features: str = "backbone"  # backbone (pooled) | head (projection head output)
    image_size: int | None = None  # None: the run's data.image_size, the export's; else timm's for `model`
    batch_size: int = 256
    num_workers: int = 0
    cache: bool = True
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)  # for exported files and baselines
    knn: KnnSettings = field(default_factory=KnnSettings)
    linear: LinearSettings = field(default_factory=LinearSettings)
    semi: SemiSettings = field(default_factory=SemiSettings)


def load_suite_config(path: str | None, overrides: list[str]) -> EvalSuiteConfig:
    cfg = EvalSuiteConfig()
    if path:
        apply_mapping(cfg, read_yaml_mapping(path))
    apply_mapping(cfg, parse_overrides(overrides))
    for name, entry in list(cfg.datasets.items()):
        if not isinstance(entry, dict):
            raise ConfigError(f"datasets.{name}: expected a mapping with train/test specs")
        apply_mapping(ds := DatasetEntry(), entry, f"datasets.{name}.")
        if not ds.train or not ds.test:
            raise ConfigError(f"datasets.{name}: needs both train and test specs")
        cfg.datasets[name] = ds
    unknown = set(cfg.protocols) - {"knn", "linear", "semi"}
    if unknown:
        raise ConfigError(f"protocols: unknown {sorted(unknown)}; choose from knn, linear, semi")
    for spec in cfg.baselines:  # checked here, not after the checkpoint's whole evaluation
        if spec != "random" and not (spec.startswith("timm:") and timm.is_model(spec[len("timm:"):])):
            raise ConfigError(f"baselines: unknown '{spec}'; use random or timm:<model name> (a name in "
                              "timm.list_models())")
    return cfg


def default_datasets(cfg: EvalSuiteConfig, checkpoint: str) -> None:
    """No datasets configured: use the run's own kNN-monitor pair (eval.train / eval.test)."""
    if cfg.datasets:
        return
    meta = {}  # random weights, an export or a weights file: no run config to fall back on
    if checkpoint != "random" and not _is_export(checkpoint):
        _, meta = read_checkpoint(checkpoint)  # (a path that holds no checkpoint says so, here)
    run_eval = meta.get("config", {}).get("eval", {})
    if run_eval.get("train") and run_eval.get("test"):
        cfg.datasets["monitor"] = DatasetEntry(run_eval["train"], run_eval["test"], run_eval.get("limit_train"),
                                               run_eval.get("limit_test"))
        return
    raise ConfigError("no datasets configured (datasets: {name: {train: ..., test: ...}}) and the run has no "
                      "eval.train / eval.test pair to fall back on")


# --------------------------------------------------------------------------- models
@dataclass
class Candidate:
    """One row of the results: a backbone (and its head, for features=head) under a name."""

    name: str
    encoder: InstanceEncoder
    model_cfg: ModelConfig
    key: str  # cache key: changes whenever the weights do
    image_size: int

    def mean_std(self):
        return data_config(self.model_cfg.name)

    def views(self) -> tuple:
        """The evaluation data path: (uint8 centre crop on the CPU, normalisation on the device)."""
        mean, std = self.mean_std()
        return (eval_crop(AugmentConfig(), self.image_size),
                DeviceViews(AugmentConfig(), self.image_size, mean, std, channels_last=self.model_cfg.channels_last))


def _is_export(path: str) -> bool:
    """An ``ifc-export`` folder or a bare .safetensors file, rather than a run or one of its checkpoints."""
    return path.endswith(".safetensors") or (Path(path) / "config.json").is_file()


def _from_checkpoint(path: str, cfg: EvalSuiteConfig) -> Candidate:
    encoder, run_cfg, ckpt = load_run_encoder(path, cfg.image_size)
    size = cfg.image_size or run_cfg.data.image_size
    return Candidate("checkpoint", encoder, run_cfg.model, f"{ckpt.resolve()}:{content_key(ckpt)}", size)


def _from_export(path: str, cfg: EvalSuiteConfig) -> Candidate:
    """An ``ifc-export`` folder (architecture and stem from its config.json) or a bare .safetensors
    file (architecture from ``model``)."""
    from safetensors.torch import load_file

    if Path(path).is_dir():
        export = read_export(path)
        model_cfg, size, weights = export.model_config(cfg.model), cfg.image_size or export.input_size, export.weights
    else:
        model_cfg, size, weights = cfg.model, cfg.image_size or _default_size(cfg.model), Path(path)
    encoder = InstanceEncoder(model_cfg, size)
    try:
        encoder.backbone.load_state_dict(load_file(weights))
    except RuntimeError as exc:  # a bare weights file names no architecture: `model` must say it
        raise CheckpointError(f"{weights}: the weights do not fit model.name={model_cfg.name}, model.small_images="
                              f"{model_cfg.small_images} ({str(exc).splitlines()[-1].strip()}): set model.* to "
                              "the architecture they were exported from") from None
    return Candidate("exported", encoder, model_cfg, f"{weights.resolve()}:{weights.stat().st_mtime_ns}", size)


def _default_size(model_cfg: ModelConfig) -> int:
    """The input size where nothing else gives one (random weights, a bare weights file): timm's for the
    architecture (its pretrained_cfg's: 224 for a ResNet, 384 for a *_384 ViT), said in the log, since
    the data's own size (32 for the digits) may be what the user meant."""
    pretrained = timm.get_pretrained_cfg(model_cfg.name)
    size = pretrained.input_size[-1] if pretrained is not None and pretrained.input_size else 224
    log.info("image_size=%d, timm's input size for %s (set image_size= to evaluate at another)", size,
             model_cfg.name)
    return size


def _baseline(spec: str, reference: Candidate, cfg: EvalSuiteConfig) -> Candidate:
    """``random``: the reference architecture with fresh weights; ``timm:<name>``: any timm model
    (random weights: nothing is downloaded). ``load_suite_config`` has checked ``spec``."""
    torch.manual_seed(cfg.seed)
    model_cfg = reference.model_cfg if spec == "random" else ModelConfig(name=spec.removeprefix("timm:"))
    encoder = InstanceEncoder(model_cfg, reference.image_size)
    return Candidate(spec, encoder, model_cfg, f"{spec}:{cfg.seed}:{model_cfg}", reference.image_size)


# --------------------------------------------------------------------------- features
def _cached_features(cand: Candidate, spec: str, limit, cfg: EvalSuiteConfig, dev, split: str):
    """Backbone (or head) features of this rank's share of a dataset, cached per (model, dataset)."""
    loaded = load_dataset(spec, limit=limit)
    mean, std = cand.mean_std()
    key = hashlib.sha1(f"{cand.key}|{spec}|{limit}|{cand.image_size}|{cfg.features}".encode()).hexdigest()[:16]
    cache = Path(cfg.output_dir) / "features" / f"{key}.{split}.rank{rank_in()}of{size()}.pt"
    if cfg.cache and cache.is_file():
        saved = torch.load(cache, weights_only=False)
        if "ids" in saved:  # caches written before ids were kept are recomputed
            return saved["features"].to(dev), saved["labels"].to(dev), saved["ids"].to(dev), loaded
    crop, views = cand.views()
    enc = cand.encoder.to(dev).eval()
    forward = enc.backbone_features if cfg.features == "backbone" else enc
    feats, labels, ids = extract_features(forward, loaded, crop, views, cfg.batch_size, dev,
                                          num_workers=cfg.num_workers)
    if cfg.cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"features": feats.cpu(), "labels": labels.cpu(), "ids": ids.cpu()}, cache)
    return feats, labels, ids, loaded


# --------------------------------------------------------------------------- protocols
def _progress(cand: Candidate, protocol: str, top1: float) -> None:
    if is_main():
        log.info("%s: %s top-1 %.2f%%", cand.name, protocol, 100 * top1)


def evaluate(cand: Candidate, entry: DatasetEntry, cfg: EvalSuiteConfig, dev) -> dict:
    from ifc_ds.collectives import gather_uneven

    bank, bank_y, bank_ids, train_loaded = _cached_features(cand, entry.train, entry.limit_train, cfg, dev, "train")
    test_shard, test_shard_y, _, test_loaded = _cached_features(cand, entry.test, entry.limit_test, cfg, dev, "test")
    queries, query_y = gather_uneven(test_shard), gather_uneven(test_shard_y)
    num_classes = train_loaded.num_classes or int(max(train_loaded.labels().max(), test_loaded.labels().max())) + 1
    out: dict = {}
    if "knn" in cfg.protocols:
        for k in cfg.knn.ks:
            scores = knn_predict(bank, bank_y, queries, num_classes, k=k, temperature=cfg.knn.temperature,
                                 bank_ids=bank_ids)
            out[f"knn_top1_k{k}"] = topk_accuracy(scores.cpu(), query_y.cpu(), ks=(1,))[1]
        out["knn_top1"] = out[f"knn_top1_k{max(cfg.knn.ks)}"]  # the headline number: the largest k
        _progress(cand, "knn", out["knn_top1"])
    if "linear" in cfg.protocols or "semi" in cfg.protocols:
        all_bank, all_bank_y = gather_uneven(bank).cpu(), gather_uneven(bank_y).cpu()
    if "linear" in cfg.protocols:
        from ifc_eval.linear import linear_probe

        out.update(linear_probe(all_bank, all_bank_y, queries.cpu(), query_y.cpu(), num_classes,
                                tuple(cfg.linear.weight_decays), cfg.linear.val_fraction, cfg.linear.max_iter,
                                cfg.seed))
        _progress(cand, "linear", out["linear_top1"])
    if "semi" in cfg.protocols:
        from ifc_eval.semi import evaluate, finetune

        mean, std = cand.mean_std()
        crop, views = cand.views()

        def test_batches():
            for batch in ordered_batches(test_loaded, crop, cfg.batch_size, cfg.num_workers, with_labels=True):
                yield views.eval(batch_crops(batch, crop.size, dev)), batch["labels"]

        for fraction in cfg.semi.fractions:
            model = finetune(cand.encoder.backbone, cand.encoder.backbone.num_features, train_loaded, num_classes,
                             fraction, cand.image_size, mean, std, dev, cfg.semi.epochs, cfg.semi.lr,
                             cfg.semi.batch_size, cfg.seed)
            out[f"semi_{round(fraction * 100):g}pct_top1"] = evaluate(model, test_batches, dev)[0]
            _progress(cand, f"semi {fraction:.0%}", out[f"semi_{round(fraction * 100):g}pct_top1"])
    return out


# --------------------------------------------------------------------------- report
def write_report(results: dict, output_dir: str) -> None:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    rows = [("checkpoint", results)] + list(results.get("_baselines", {}).items())
    metrics = sorted({m for _, res in rows for ds, v in res.items() if not ds.startswith("_")
                      for m, x in v.items() if isinstance(x, float) and "top" in m})  # accuracies only
    lines = ["| dataset | model | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for model, res in rows:
        for ds, values in res.items():
            if ds.startswith("_"):
                continue
            cells = [f"{100 * values[m]:.2f}" if m in values else "" for m in metrics]
            lines.append(f"| {ds} | {model} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = [], []
    for model, res in rows:
        for ds, vals in res.items():
            if not ds.startswith("_"):
                for m in ("knn_top1", "linear_top1"):
                    if m in vals:
                        labels.append(f"{ds}\n{model}\n{m}")
                        values.append(100 * vals[m])
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(values)), 3.5))
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylabel("top-1 (%)")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=100)
    plt.close(fig)


@bad_input_exits
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--config", default=None)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = load_suite_config(args.config, args.overrides)
    default_datasets(cfg, args.checkpoint)  # random weights too: no run, so datasets must be configured
    init_distributed(timeout_s=600)
    dev = device()
    if args.checkpoint == "random":  # an untrained `model` (e.g. the random-init reference row)
        torch.manual_seed(cfg.seed)
        size = cfg.image_size or _default_size(cfg.model)
        main_cand = Candidate("random", InstanceEncoder(cfg.model, size), cfg.model, f"random:{cfg.seed}:{cfg.model}",
                              size)
    else:
        main_cand = (_from_export if _is_export(args.checkpoint) else _from_checkpoint)(args.checkpoint, cfg)
    results: dict = {}
    for name, entry in cfg.datasets.items():
        results[name] = evaluate(main_cand, entry, cfg, dev)
        if is_main():
            log.info("%s / %s: %s", name, main_cand.name, results[name])
    for spec in cfg.baselines:
        cand = _baseline(spec, main_cand, cfg)
        results.setdefault("_baselines", {})[spec] = {name: evaluate(cand, entry, cfg, dev)
                                                      for name, entry in cfg.datasets.items()}
        if is_main():
            log.info("baseline %s: %s", spec, results["_baselines"][spec])
    if is_main():
        write_report(results, cfg.output_dir)
        print((Path(cfg.output_dir) / "results.md").read_text())
    return finish(0)  # a rank that leaves while a peer still uses the group makes gloo abort the peer


if __name__ == "__main__":
    sys.exit(main())
