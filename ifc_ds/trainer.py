"""The pretraining loop: build everything from a Config, resume, train, monitor, checkpoint.

``train.py`` only parses the command line and calls ``run(cfg)``.
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from ifc_ds.augment import DeviceViews, eval_crop, train_crop
from ifc_ds.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, seed_everything
from ifc_ds.classifier import ShardedInstanceClassifier
from ifc_ds.config import Config, save_config
from ifc_ds.crops import batch_crops
from ifc_ds.data import InstanceBatchSampler, MapEpochs, default_num_workers, load_dataset, make_loader, ordered_batches
from ifc_ds.decoded import decide, decode_into_memory
from ifc_ds.dist import (  # EXIT_PEER_LOST (69) lives there: engine.py's watchdog exits with it too
    EXIT_PEER_LOST,  # noqa: F401 (re-exported with the other exit codes)
    all_reduce_sum,
    device,
    init_distributed,
    is_main,
    local_world_size,
    lockstep,
    rank,
    world_size,
)
from ifc_ds.engine import (
    accumulation_steps,
    build_engines,
    current_classifier_lr,
    current_lr,
    optimizer_step,
    train_step,
)
from ifc_ds.features import extract_features
from ifc_ds.hooks import TrainState, build_hooks, hook_names
from ifc_ds.knn import knn_predict, topk_accuracy
from ifc_ds.model import InstanceEncoder, data_config
from ifc_ds.observe import Observer, plot_curves, setup_logging
from ifc_ds.streaming import StreamEpochs, StreamShard

log = logging.getLogger("ifc_ds")

EXIT_OK = 0
EXIT_PREEMPTED = 75  # checkpointed on SIGTERM/SIGUSR1: requeue and resume (EX_TEMPFAIL)
EXIT_NONFINITE = 65  # too many consecutive non-finite losses; the last good checkpoint is intact
EXIT_FAILED = 1  # this rank failed (its traceback is logged)
EXIT_USAGE = 2  # bad config, dataset spec or checkpoint: one line says what


def is_peer_failure(exc: BaseException) -> bool:
    """A collective failed because a peer is gone or did not answer in time, as opposed to a failure of
    this rank's own (a bug, a CUDA OOM surfaced through NCCL, a crashed DataLoader worker).

    torch.distributed raises typed errors for NCCL and the stores; gloo raises plain RuntimeErrors from
    its transport layer ("Connection reset by peer", "Timed out waiting ... for recv"), recognised by
    their source path."""
    text = str(exc)
    if "out of memory" in text.lower():
        return False
    typed = tuple(getattr(dist, name) for name in ("DistBackendError", "DistNetworkError", "DistStoreError")
                  if hasattr(dist, name))
    if isinstance(exc, typed):
        return True
    return isinstance(exc, RuntimeError) and "gloo/transport" in text


class StopSignal:
    """SIGTERM / SIGUSR1 (what SLURM sends before preemption or the time limit) set a flag that the
    loop checks at the next step boundary; the flag is OR-reduced over ranks so all stop together."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.received = signum

    def any_rank(self, dev) -> bool:
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=dev)
        return bool(all_reduce_sum(flag).item() > 0)


class KnnMonitor:
    """kNN top-1 of the backbone's pooled features on a labelled bank / query pair, through the
    training data path (decoded once into memory when they fit, normalised on the device)."""

    def __init__(self, cfg: Config, views: DeviceViews, num_workers: int):
        self.cfg, self.views, self.num_workers = cfg, views, num_workers
        self.crop = eval_crop(cfg.augment, cfg.data.image_size)
        bank = load_dataset(cfg.eval.train, limit=cfg.eval.limit_train)
        if cfg.eval.test:
            queries = load_dataset(cfg.eval.test, limit=cfg.eval.limit_test)
        else:  # hold out the last rows of the bank as queries
            n_query = max(1, int(bank.num_instances * cfg.eval.holdout))
            n_bank = bank.num_instances - n_query
            queries = _subset(bank, range(n_bank, bank.num_instances))
            bank = _subset(bank, range(n_bank))
        self.bank, self.queries = bank, queries
        self.num_classes = bank.num_classes or int(max(bank.labels().max(), queries.labels().max())) + 1
        self.bank_decoded = _decode_once(bank, cfg, num_workers)  # evaluated many times: decode once
        self.queries_decoded = _decode_once(queries, cfg, num_workers)

    @torch.no_grad()
    def __call__(self, encoder, dev) -> float:
        was_training = encoder.training
        encoder.eval()
        fwd, bs = encoder.backbone_features, self.cfg.eval.batch_size
        bank_f, bank_y, bank_ids = extract_features(fwd, self.bank, self.crop, self.views, bs, dev, self.num_workers,
                                                    decoded=self.bank_decoded)
        query_f, query_y, _ = extract_features(fwd, self.queries, self.crop, self.views, bs, dev, self.num_workers,
                                               gather=True, decoded=self.queries_decoded)
        scores = knn_predict(bank_f, bank_y, query_f, self.num_classes, self.cfg.eval.k, self.cfg.eval.temperature,
                             bank_ids=bank_ids)
        encoder.train(was_training)
        return topk_accuracy(scores, query_y, ks=(1,))[1]


def _subset(loaded, rows):
    from dataclasses import replace

    table = loaded.table.select(rows)
    return replace(loaded, table=table, num_instances=len(table))


def _decode_once(loaded, cfg: Config, num_workers: int):
    """The map-style dataset decoded into memory if ``data.in_memory`` says so (a collective), else None."""
    if loaded.table is None:
        return None
    size = decide(loaded, cfg.data.in_memory, cfg.data.memory_gb)
    return decode_into_memory(loaded, size, num_workers, cfg.data.in_memory) if size else None


def _feature_pass(engines, loaded, crop, views: DeviceViews, dev, num_workers, decoded):
    """For raw-feature init: (features [b, D] from the initial network, ids [b]) over this rank's share,
    the same number of batches on every rank (a streaming shard that ends early yields empty ones)."""

    def run(batch_size: int):
        if loaded.stream is not None:
            shard = StreamShard(loaded.stream, crop, rank(), world_size(), shuffle=False)
            batches = lockstep(iter(make_loader(shard, batch_size=batch_size)), dev, until="all")
        else:
            batches = ordered_batches(loaded, crop, batch_size, num_workers, decoded=decoded)
        for batch in batches:
            if batch is None:
                yield torch.zeros(0, engines.backbone.module.head[-1].out_features, device=dev), \
                    torch.zeros(0, dtype=torch.int64, device=dev)
                continue
            images = views.eval(batch_crops(batch, crop.size, dev))
            yield engines.backbone.module(images).float(), batch["ids"].to(dev)
    return run


def run(cfg: Config) -> int:
    """Pretrains; returns the process exit code (EXIT_*)."""
    init_distributed(cfg.dist.timeout_s)
    setup_logging()
    seed_everything(cfg.seed + rank())
    dev, world = device(), world_size()
    if dev.type != "cpu":
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_device(dev.index or 0)

    loaded = load_dataset(cfg.data.train, limit=cfg.data.limit, streaming=cfg.data.streaming,
                          num_instances=cfg.data.num_instances)
    n = loaded.num_instances
    mean, std = data_config(cfg.model.name)
    num_workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else default_num_workers(local_world_size())

    encoder = InstanceEncoder(cfg.model, cfg.data.image_size)
    classifier = ShardedInstanceClassifier(n, cfg.model.dim, cfg.classifier.temperature,
                                           chunk_size=cfg.classifier.chunk_size,
                                           fused=cfg.classifier.fused).to(dev)
    micro_batches = accumulation_steps(cfg)  # per optimizer step: one step = one sampler batch
    global_batch = cfg.train.batch_size * world * micro_batches
    # the CPU half of a view (decode + crop to uint8); the device half comes after the engines
    size = cfg.data.image_size
    crop = train_crop(cfg.augment, size, cfg.seed, raw_jpeg=cfg.data.decode_on_device and dev.type != "cpu")
    decoded = _decode_once(loaded, cfg, num_workers)
    timeout = cfg.dist.timeout_s  # a stuck DataLoader worker becomes an error, not a hang
    if loaded.stream is not None:
        epochs = StreamEpochs(loaded, crop, global_batch, rank(), world, cfg.seed, num_workers, dev, timeout)
    else:
        sampler = InstanceBatchSampler(n, global_batch, rank(), world, cfg.seed, min_per_rank=2 * micro_batches)
        epochs = MapEpochs(loaded, sampler, crop, num_workers, dev.type == "cuda", decoded, timeout)
    steps_per_epoch = epochs.steps_per_epoch
    engines = build_engines(cfg, encoder, classifier, steps_per_epoch, world)
    views = DeviceViews(cfg.augment, size, mean, std, cfg.seed, engines.dtype(), cfg.model.channels_last)
    hooks = build_hooks(cfg, _feature_pass(engines, loaded, eval_crop(cfg.augment, size), views, dev, num_workers,
                                           decoded))
    state = TrainState(engines=engines, classifier=classifier, num_instances=n, steps_per_epoch=steps_per_epoch)
    monitor = KnnMonitor(cfg, views, num_workers) if cfg.eval.train else None

    out = Path(cfg.output_dir)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    offset, evals, bad_images, nonfinite = 0, [], 0, 0
    resume_from = find_checkpoint(cfg.output_dir, cfg.resume)
    if resume_from is not None:
        saved = load_checkpoint(resume_from, engines, cfg, n)
        state.step, state.epoch, offset = saved["step"], saved["epoch"], saved["offset"]
        evals, bad_images = saved.get("evals", []), saved.get("bad_images", 0)
        epochs.load_state_dict(saved.get("data", {}))
        for hook, hook_state in zip(hooks, saved["hooks"]):
            hook.load_state_dict(hook_state)
        log.info("resumed from %s at step %d (epoch %d, position %d)", resume_from, state.step, state.epoch, offset)
    log.info("N=%d instances, %d ranks, global batch %d, %d steps/epoch, lr %.4g, hooks: %s", n, world, global_batch,
             steps_per_epoch, engines.base_lr, ", ".join(hook_names(hooks)) or "none")

    def trainer_state() -> dict:
        return {"step": state.step, "epoch": state.epoch, "offset": offset, "hooks": [h.state_dict() for h in hooks],
                "evals": evals, "bad_images": bad_images, "data": epochs.state_dict()}

    def checkpoint() -> None:
        save_checkpoint(cfg.output_dir, state.step, engines, trainer_state(), cfg, cfg.checkpoint.keep_last)

    def evaluate() -> None:
        if monitor is None:
            return
        top1 = monitor(engines.backbone.module, dev)
        evals.append({"step": state.step, "epoch": state.epoch, "knn_top1": top1})
        log.info("kNN top-1 %.2f%% at step %d", 100 * top1, state.step)
        if is_main():
            (out / "eval.json").write_text(json.dumps({"knn_top1": top1, "k": cfg.eval.k,
                                                        "temperature": cfg.eval.temperature, "history": evals},
                                                       indent=1))

    stop = StopSignal()
    # the budget is epochs: what remains of this one plus the rest (a resume on another global batch
    # has other step boundaries), then the LR schedule spans exactly these steps
    remaining = epochs.remaining_steps(state.epoch, offset) if offset else 0
    remaining += (cfg.train.epochs - state.epoch - (1 if offset else 0)) * steps_per_epoch
    total_steps = state.step + max(0, remaining)
    engines.schedule["total"] = max(1, total_steps)
    engines.set_schedule_step(state.step)  # base LRs from this config and global batch, also after a resume
    last_step = min(total_steps, cfg.train.max_steps or total_steps)
    observer = Observer(cfg.output_dir, last_step, state.step, cfg.log.progress, cfg.log.tensorboard)
    for hook in hooks:
        hook.on_train_start(state)
    exit_code = EXIT_OK
    try:
        while state.step < last_step and state.epoch < cfg.train.epochs and exit_code == EXIT_OK:
            if offset == 0:
                for hook in hooks:
                    hook.on_epoch_start(state)
            epoch_bad, epoch_done = 0, False
            for start, end, batch in epochs.batches(state.epoch, offset):
                state.batch = batch
                log_now = (state.step + 1) % cfg.train.log_every == 0 or state.step + 1 == last_step
                classifier.track_accuracy = log_now
                ids = batch["ids"].to(dev, non_blocking=True)
                images = views.train(batch_crops(batch, size, dev), batch["ids"], state.epoch)

                def features_hook(features, batch_ids):
                    for hook in hooks:
                        hook.on_features(state, features, batch_ids)

                # None: the loss was not finite (same on every rank) and nothing was applied
                loss = train_step(engines, images, ids, state.smoothing_k, state.smoothing_eps, features_hook,
                                  step_batch=end - start)
                if loss is None:
                    nonfinite += 1
                    log.warning("non-finite loss at step %d (%d in a row): step skipped", state.step + 1, nonfinite)
                    if nonfinite >= cfg.train.nonfinite_patience:
                        log.error("%d consecutive non-finite losses: stopping; the last checkpoint is intact",
                                  nonfinite)
                        exit_code = EXIT_NONFINITE
                        break
                    continue
                nonfinite = 0
                for hook in hooks:
                    hook.before_step(state)
                optimizer_step(engines)
                state.step += 1
                offset = end
                epoch_bad += int(batch["replaced"])
                observer.count_images(end - start)
                metrics = None
                if log_now:
                    metrics = {"step": state.step, "epoch": state.epoch + offset / max(1, n), "loss": loss.item(),
                               "lr": current_lr(engines), "classifier_lr": current_classifier_lr(engines),
                               "images_per_sec": observer.images_per_sec(),
                               "instance_acc": classifier.last_accuracy.item(),
                               "smoothing_eps": state.smoothing_eps}
                observer.step(metrics)
                if stop.any_rank(dev):
                    log.warning("stop signal received: checkpointing at step %d and exiting", state.step)
                    exit_code = EXIT_PREEMPTED
                    break
                if state.step >= last_step:
                    break  # the final checkpoint follows
                if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0:
                    checkpoint()
            else:
                epoch_done = True
            if exit_code != EXIT_OK:
                break
            epoch_bad = int(all_reduce_sum(torch.tensor([epoch_bad], device=dev)).item())
            bad_images += epoch_bad
            if epoch_bad:
                log.warning("epoch %d: %d undecodable images were replaced by the next valid row", state.epoch,
                            epoch_bad)
            if epoch_done or offset >= n:
                state.epoch, offset = state.epoch + 1, 0
                if cfg.eval.every_epochs and state.epoch % cfg.eval.every_epochs == 0 and state.step < last_step:
                    evaluate()
                finished = state.step >= last_step or state.epoch >= cfg.train.epochs  # the final one follows
                if cfg.checkpoint.every_epochs and state.epoch % cfg.checkpoint.every_epochs == 0 and not finished:
                    checkpoint()
        if exit_code == EXIT_PREEMPTED:
            checkpoint()
        elif exit_code == EXIT_OK:
            evaluate()
            checkpoint()
            if is_main():
                plot_curves(cfg.output_dir, evals)
            if bad_images:
                log.warning("run finished: %d undecodable images were replaced in total", bad_images)
    finally:
        observer.close()
    return exit_code


def finish(exit_code: int) -> int:
    if dist.is_initialized():
        dist.barrier()  # no rank tears down while a peer still uses the group (gloo then aborts the peer)
        dist.destroy_process_group()
    return exit_code
