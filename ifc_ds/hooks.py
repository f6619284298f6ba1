"""Training hooks: a small interface and the two the method needs.

A hook sees a ``TrainState`` (engines, classifier, step/epoch) at these points::

    on_train_start   once, before the first step (after a resume: with the restored state)
    on_epoch_start   before each epoch
    on_features      between the backbone forward and the classifier loss (features [B, D])
    before_step      after backward, before the optimizer steps

Hooks are kept in a registry keyed by config section, so the trainer builds them without if-chains.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ifc_ds.config import Config
from ifc_ds.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What hooks may read and write. ``smoothing_k`` / ``smoothing_eps`` are the loss settings
    the next forward uses; ``step`` / ``epoch`` are the run's ``Progress``."""

    engines: object
    classifier: object  # ShardedInstanceClassifier (the engine's module)
    num_instances: int
    steps_per_epoch: int
    progress: Progress = field(default_factory=Progress)
    smoothing_k: int = 0
    smoothing_eps: float = 0.0

    @property
    def step(self) -> int:  # optimizer steps done
        return self.progress.step

    @property
    def epoch(self) -> int:
        return self.progress.epoch


class Hook:
    def on_train_start(self, state: TrainState) -> None: ...
    def on_epoch_start(self, state: TrainState) -> None: ...
    def on_features(self, state: TrainState, features: torch.Tensor, ids: torch.Tensor) -> None: ...
    def before_step(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class RawFeatureInit(Hook):
    """Classifier rows start as the normalised features of their own images, computed by the initial
    network with batch norm in train mode and no gradient (a contrastive prior: without it the rows
    are random and nothing is learned for the first epochs).

    ``full``: one pass over the training set before step 1, all N rows. ``lazy``: a row is written
    the first time its instance appears in a batch, from that batch's features.
    """

    def __init__(self, mode: str, batch_size: int, feature_pass=None):
        self.mode, self.batch_size = mode, batch_size
        self.feature_pass = feature_pass  # callable(batch_size) -> iterator of (features [b, D], ids [b])
        self.done = False
        self.seen: torch.Tensor | None = None  # lazy mode: [N] bool, replicated on every rank

    def on_train_start(self, state: TrainState) -> None:
        if self.mode == "lazy":
            if self.seen is None:
                self.seen = torch.zeros(state.num_instances, dtype=torch.bool)
            return
        if self.done:
            return  # resumed run: rows already initialised
        engine = state.engines.backbone
        module = engine.module
        was_training = module.training
        module.train()  # BN in train mode: the statistics of the data, not of the random init
        rows = 0
        with torch.no_grad():
            for features, ids in self.feature_pass(self.batch_size):
                state.classifier.assign_rows(ids, features)
                rows += len(ids)
        module.train(was_training)
        self.done = True
        log.info("raw-feature init: wrote %d rows from this rank's share", rows)

    def on_features(self, state: TrainState, features: torch.Tensor, ids: torch.Tensor) -> None:
        if self.mode != "lazy":
            return
        fresh = ~self.seen[ids.cpu()]
        ids_all = state.classifier.assign_rows(ids[fresh.to(ids.device)], features[fresh.to(features.device)])
        self.seen[ids_all.cpu()] = True

    def state_dict(self) -> dict:
        return {"done": self.done, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.done = state.get("done", False)
        self.seen = state.get("seen")


class HardLabelSmoothing(Hook):
    """The K highest-scoring negatives of each sample share target mass eps (the positive keeps
    1 - eps), so near-duplicate instances are not pushed apart. Off before ``start_epoch``, then eps
    ramps linearly over ``ramp_epochs`` (smoothing from step 0 hurts while the rows are still raw)."""

    def __init__(self, k: int, eps: float, start_epoch: float, ramp_epochs: float):
        self.k, self.eps, self.start_epoch, self.ramp_epochs = k, eps, start_epoch, ramp_epochs

    def eps_at(self, epoch_progress: float) -> float:
        if epoch_progress < self.start_epoch or self.k == 0:
            return 0.0
        if self.ramp_epochs <= 0:
            return self.eps
        return self.eps * min(1.0, (epoch_progress - self.start_epoch) / self.ramp_epochs)

    def _apply(self, state: TrainState, steps_done: int) -> None:
        eps = self.eps_at(steps_done / max(1, state.steps_per_epoch))
        state.smoothing_k, state.smoothing_eps = (self.k, eps) if eps > 0 else (0, 0.0)

    def on_train_start(self, state: TrainState) -> None:
        self._apply(state, state.step)  # also after a resume: the schedule is a function of the step

    def before_step(self, state: TrainState) -> None:
        self._apply(state, state.step + 1)  # K and eps for the next forward, once this step is done


def build_hooks(cfg: Config, feature_pass) -> list[Hook]:
    """The hooks the config enables, in a fixed order (raw init before smoothing)."""
    registry = {
        "raw_init": (cfg.hooks.raw_init.enabled,
                     lambda: RawFeatureInit(cfg.hooks.raw_init.mode, cfg.hooks.raw_init.batch_size, feature_pass)),
        "smoothing": (cfg.hooks.smoothing.enabled,
                      lambda: HardLabelSmoothing(cfg.hooks.smoothing.k, cfg.hooks.smoothing.eps,
                                                 cfg.hooks.smoothing.start_epoch, cfg.hooks.smoothing.ramp_epochs)),
    }
    return [factory() for enabled, factory in registry.values() if enabled]


def hook_names(hooks: list[Hook]) -> list[str]:
    return [type(h).__name__ for h in hooks]
