"""The pretraining loop, in the shape of torchtitan's ``Trainer``: built from a ``Config`` in sections
(runtime, data, model and engines, hooks and monitor), then ``train()`` reads in one screen.

``train.py`` only parses the command line and calls ``run(cfg)``.
"""

from __future__ import annotations

import enum
import json
import logging
from pathlib import Path

import torch

from ifc_ds import engine
from ifc_ds.augment import DeviceViews, eval_crop, train_crop
from ifc_ds.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, seed_everything
from ifc_ds.classifier import ShardedInstanceClassifier
from ifc_ds.collectives import Groups, all_reduce_sum, rank_in, size
from ifc_ds.config import Config, save_config
from ifc_ds.crops import batch_crops
from ifc_ds.data import InstanceBatchSampler, MapEpochs, default_num_workers, load_dataset
from ifc_ds.decoded import decode_as_configured
from ifc_ds.dist import device, init_distributed, is_main, local_world_size
from ifc_ds.engine import accumulation_steps, build_engines, current_classifier_lr, current_lr
from ifc_ds.features import raw_init_feature_pass
from ifc_ds.hooks import TrainState, build_hooks, hook_names
from ifc_ds.knn_monitor import KnnMonitor
from ifc_ds.lifecycle import EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, StopSignal
from ifc_ds.model import InstanceEncoder, data_config
from ifc_ds.observe import Observer, plot_curves, setup_logging
from ifc_ds.progress import Progress
from ifc_ds.streaming import StreamEpochs

log = logging.getLogger("ifc_ds")


class StepResult(enum.Enum):
    APPLIED = "applied"
    SKIPPED = "skipped"  # the loss was not finite (on every rank alike): nothing was applied
    STOP = "stop"  # a stop signal, or too many non-finite losses in a row: ``Trainer.stop_code`` says which


class Trainer:
    """One pretraining run: ``Trainer(cfg).train()`` returns the process exit code (``lifecycle``)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._init_runtime()
        self._init_data()
        self._init_model()
        self._init_hooks_and_monitor()
        self.progress = Progress()
        self.state = TrainState(engines=self.engines, classifier=self.classifier, num_instances=self.n,
                                steps_per_epoch=self.steps_per_epoch, progress=self.progress)
        self.stop_signal = StopSignal()
        self.stop_code = EXIT_OK
        self.nonfinite = 0  # consecutive non-finite losses
        self.out = Path(cfg.output_dir)

    # ------------------------------------------------------------------ building, in sections
    def _init_runtime(self) -> None:
        init_distributed(self.cfg.dist.timeout_s)
        setup_logging()
        seed_everything(self.cfg.seed + rank_in())
        self.dev, self.world = device(), size()
        self.groups = Groups()  # the world for both: DeepSpeed's backbone engine is data-parallel over it
        if self.dev.type != "cpu":
            from deepspeed.accelerator import get_accelerator

            get_accelerator().set_device(self.dev.index or 0)
        workers = self.cfg.data.num_workers
        self.num_workers = workers if workers >= 0 else default_num_workers(local_world_size())

    def _init_data(self) -> None:
        """The dataset, the CPU half of a view (decode + crop to uint8) and the epochs of batches."""
        cfg, dev = self.cfg, self.dev
        self.loaded = load_dataset(cfg.data.train, limit=cfg.data.limit, streaming=cfg.data.streaming,
                                   num_instances=cfg.data.num_instances)
        self.n = self.loaded.num_instances
        self.micro_batches = accumulation_steps(cfg)  # per optimizer step: one step = one sampler batch
        self.global_batch = cfg.train.batch_size * self.world * self.micro_batches
        self.crop = train_crop(cfg.augment, cfg.data.image_size, cfg.seed,
                               raw_jpeg=cfg.data.decode_on_device and dev.type != "cpu")
        self.decoded = decode_as_configured(self.loaded, cfg.data, self.num_workers)
        timeout = cfg.dist.timeout_s  # a stuck DataLoader worker becomes an error, not a hang
        if self.loaded.stream is not None:
            self.epochs = StreamEpochs(self.loaded, self.crop, self.global_batch, rank_in(), self.world, cfg.seed,
                                       self.num_workers, dev, timeout)
        else:
            sampler = InstanceBatchSampler(self.n, self.global_batch, rank_in(), self.world, cfg.seed,
                                           min_per_rank=2 * self.micro_batches)
            self.epochs = MapEpochs(self.loaded, sampler, self.crop, self.num_workers, dev.type == "cuda",
                                    self.decoded, timeout)
        self.steps_per_epoch = self.epochs.steps_per_epoch

    def _init_model(self) -> None:
        """Encoder, sharded classifier, their two engines and the device half of a view."""
        cfg = self.cfg
        self.encoder = InstanceEncoder(cfg.model, cfg.data.image_size)
        self.classifier = ShardedInstanceClassifier(self.n, cfg.model.dim, cfg.classifier.temperature,
                                                    group=self.groups.classifier, chunk_size=cfg.classifier.chunk_size,
                                                    fused=cfg.classifier.fused).to(self.dev)
        self.engines = build_engines(cfg, self.encoder, self.classifier, self.steps_per_epoch, self.world)
        mean, std = data_config(cfg.model.name)
        self.views = DeviceViews(cfg.augment, cfg.data.image_size, mean, std, cfg.seed, self.engines.dtype(),
                                 cfg.model.channels_last)

    def _init_hooks_and_monitor(self) -> None:
        feature_pass = raw_init_feature_pass(self.engines.encoder, self.loaded,
                                             eval_crop(self.cfg.augment, self.cfg.data.image_size), self.views,
                                             self.dev, self.num_workers, self.decoded)
        self.hooks = build_hooks(self.cfg, feature_pass)
        self.monitor = (KnnMonitor(self.cfg, self.views, self.num_workers, self.groups.data)
                        if self.cfg.eval.train else None)

    # ------------------------------------------------------------------ the run
    def train(self) -> int:
        """Resume, plan, train epoch after epoch, finish; returns the exit code."""
        self.resume()
        self.last_step = self.plan_schedule()
        self.observer = Observer(self.cfg.output_dir, self.last_step, self.progress.step, self.cfg.log.progress,
                                 self.cfg.log.tensorboard)
        self.evaluate_untrained()
        for hook in self.hooks:
            hook.on_train_start(self.state)
        try:
            while self.stop_code == EXIT_OK and not self.done():
                self.train_epoch()
            if self.stop_code == EXIT_PREEMPTED:
                self.checkpoint()
            elif self.stop_code == EXIT_OK:
                self.finish_run()
        finally:
            self.observer.close()
        return self.stop_code

    def done(self) -> bool:
        return self.progress.step >= self.last_step or self.progress.epoch >= self.cfg.train.epochs

    def train_epoch(self) -> None:
        """The rest of this epoch (all of it, or from a resumed position), then ``end_epoch``."""
        p = self.progress
        if p.offset == 0:
            for hook in self.hooks:
                hook.on_epoch_start(self.state)
        bad, completed = 0, True
        for start, end, batch in self.epochs.batches(p.epoch, p.offset):
            result = self.train_step(batch, start, end)
            if result is StepResult.STOP:
                return
            if result is StepResult.SKIPPED:
                continue
            bad += int(batch["replaced"])
            if self.progress.step >= self.last_step:
                completed = False  # the final checkpoint follows
                break
            if self.cfg.checkpoint.every_steps and p.step % self.cfg.checkpoint.every_steps == 0:
                self.checkpoint()
        self.end_epoch(bad, completed or p.offset >= self.n)

    def train_step(self, batch: dict, start: int, end: int) -> StepResult:
        """One optimizer step on the batch of epoch-order rows ``[start, end)`` (this rank's share)."""
        p = self.progress
        log_now = (p.step + 1) % self.cfg.train.log_every == 0 or p.step + 1 == self.last_step
        self.classifier.track_accuracy = log_now
        ids = batch["ids"].to(self.dev, non_blocking=True)
        images = self.views.train(batch_crops(batch, self.cfg.data.image_size, self.dev), batch["ids"], p.epoch)
        loss = engine.train_step(self.engines, images, ids, self.state.smoothing_k, self.state.smoothing_eps,
                          self._on_features, step_batch=end - start)
        if loss is None:
            return self._skip_nonfinite()
        self.nonfinite = 0
        for hook in self.hooks:
            hook.before_step(self.state)
        engine.optimizer_step(self.engines)
        p.step, p.offset = p.step + 1, end
        self.observer.count_images(end - start)
        self.observer.step(self._metrics(loss) if log_now else None)
        if self.stop_signal.any_rank(self.dev):
            log.warning("stop signal received: checkpointing at step %d and exiting", p.step)
            self.stop_code = EXIT_PREEMPTED
            return StepResult.STOP
        return StepResult.APPLIED

    def end_epoch(self, bad_images: int, completed: bool) -> None:
        """Collective: counts the epoch's replaced images; a completed epoch may evaluate and checkpoint."""
        p = self.progress
        bad_images = int(all_reduce_sum(torch.tensor([bad_images], device=self.dev), self.groups.data).item())
        p.bad_images += bad_images
        if bad_images:
            log.warning("epoch %d: %d undecodable images were replaced by the next valid row", p.epoch, bad_images)
        if not completed:
            return
        p.epoch, p.offset = p.epoch + 1, 0
        if self.cfg.eval.every_epochs and p.epoch % self.cfg.eval.every_epochs == 0 and p.step < self.last_step:
            self.evaluate()
        if self.cfg.checkpoint.every_epochs and p.epoch % self.cfg.checkpoint.every_epochs == 0 and not self.done():
            self.checkpoint()  # (the final one follows the loop)

    def finish_run(self) -> None:
        self.evaluate()
        self.checkpoint()
        if is_main():
            plot_curves(self.cfg.output_dir, self.progress.evals)
        if self.progress.bad_images:
            log.warning("run finished: %d undecodable images were replaced in total", self.progress.bad_images)

    # ------------------------------------------------------------------ pieces
    def _on_features(self, features: torch.Tensor, ids: torch.Tensor) -> None:
        for hook in self.hooks:
            hook.on_features(self.state, features, ids)

    def _skip_nonfinite(self) -> StepResult:
        self.nonfinite += 1
        step = self.progress.step + 1
        log.warning("non-finite loss at step %d (%d in a row): step skipped", step, self.nonfinite)
        if self.nonfinite < self.cfg.train.nonfinite_patience:
            return StepResult.SKIPPED
        log.error("%d consecutive non-finite losses: stopping; the last checkpoint is intact", self.nonfinite)
        self.stop_code = EXIT_NONFINITE
        return StepResult.STOP

    def _metrics(self, loss: torch.Tensor) -> dict:
        p = self.progress
        return {"step": p.step, "epoch": p.epoch + p.offset / max(1, self.n), "loss": loss.item(),
                "lr": current_lr(self.engines), "classifier_lr": current_classifier_lr(self.engines),
                "images_per_sec": self.observer.images_per_sec(),
                "instance_acc": self.classifier.last_accuracy.item(), "smoothing_eps": self.state.smoothing_eps}

    def resume(self) -> None:
        """Writes config.yaml; restores engines, RNGs, progress, data position and hooks from the
        checkpoint that ``resume`` names, if any."""
        if is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.yaml")
        path = find_checkpoint(self.cfg.output_dir, self.cfg.resume)
        if path is not None:
            saved = load_checkpoint(path, self.engines, self.cfg, self.n)
            self.progress.load_state_dict(saved)
            self.epochs.load_state_dict(saved.get("data", {}))
            for hook, hook_state in zip(self.hooks, saved["hooks"]):
                hook.load_state_dict(hook_state)
            log.info("resumed from %s at step %d (epoch %d, position %d)", path, self.progress.step,
                     self.progress.epoch, self.progress.offset)
        log.info("N=%d instances, %d ranks, global batch %d, %d steps/epoch, lr %.4g, hooks: %s", self.n, self.world,
                 self.global_batch, self.steps_per_epoch, self.engines.base_lr,
                 ", ".join(hook_names(self.hooks)) or "none")

    def plan_schedule(self) -> int:
        """The budget is epochs: what remains of this one plus the rest (a resume on another global
        batch has other step boundaries); the LR schedule spans exactly these steps. Returns the last
        step, ``train.max_steps`` included."""
        p, epochs = self.progress, self.cfg.train.epochs
        remaining = self.epochs.remaining_steps(p.epoch, p.offset) if p.offset else 0
        remaining += (epochs - p.epoch - (1 if p.offset else 0)) * self.steps_per_epoch
        total_steps = p.step + max(0, remaining)
        self.engines.set_total_steps(total_steps)
        self.engines.set_schedule_step(p.step)  # base LRs from this config and global batch, also after a resume
        return min(total_steps, self.cfg.train.max_steps or total_steps)

    def checkpoint(self) -> None:
        """Collective: an atomic checkpoint of engines, progress, data position and hooks."""
        state = {**self.progress.state_dict(), "hooks": [h.state_dict() for h in self.hooks],
                 "data": self.epochs.state_dict()}
        save_checkpoint(self.cfg.output_dir, self.progress.step, self.engines, state, self.cfg,
                        self.cfg.checkpoint.keep_last)

    def evaluate_untrained(self) -> None:
        """Collective: the kNN monitor on the network as initialised, once per run (the baseline)."""
        if self.monitor is None or self.progress.step > 0 or self.progress.untrained_knn is not None:
            return
        with torch.random.fork_rng(devices=[]):  # DataLoader seeds draw from it: training stays as without
            self.progress.untrained_knn = self.monitor(self.engines.encoder, self.dev)
        log.info("kNN top-1 %.2f%% before training (the untrained network)", 100 * self.progress.untrained_knn)

    def evaluate(self) -> None:
        """Collective: the kNN monitor, appended to the progress and written to eval.json."""
        if self.monitor is None:
            return
        p = self.progress
        top1 = self.monitor(self.engines.encoder, self.dev)
        p.evals.append({"step": p.step, "epoch": p.epoch, "knn_top1": top1})
        log.info("kNN top-1 %.2f%% at step %d (untrained: %.2f%%)", 100 * top1, p.step, 100 * (p.untrained_knn or 0))
        if is_main():
            (self.out / "eval.json").write_text(json.dumps(
                {"knn_top1": top1, "knn_top1_untrained": p.untrained_knn, "k": self.cfg.eval.k,
                 "temperature": self.cfg.eval.temperature, "history": p.evals}, indent=1))


def run(cfg: Config) -> int:
    """Pretrains; returns the process exit code (``ifc_ds.lifecycle``)."""
    return Trainer(cfg).train()
