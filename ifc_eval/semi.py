"""Semi-supervised protocol: fine-tune backbone + a linear head end to end on a class-balanced
fraction (1%, 10%) of the training labels (data-parallel over the ranks), then top-1 on the whole
test split."""

from __future__ import annotations

import copy
import logging
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from ifc_ds.augment import DeviceViews, train_crop
from ifc_ds.collectives import all_reduce_sum, broadcast_, rank_in, size
from ifc_ds.config import AugmentConfig
from ifc_ds.crops import batch_crops
from ifc_ds.data import InstanceBatchSampler, InstanceDataset, make_loader
from ifc_ds.dist import is_main

log = logging.getLogger("ifc_ds.eval")


def balanced_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Row indices: ``round(fraction * count_c)`` (at least 1) rows of every class c, chosen with
    ``seed``; sorted. The same (labels, fraction, seed) always gives the same subset.

    Kept by hand rather than scikit-learn's stratified ``train_test_split``: that one rounds the
    subset size over the whole set and then shares it out, so a class smaller than ``1 / fraction``
    rows can get none, and per-class counts are not ``round(fraction * count_c)``."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        take = max(1, int(round(fraction * len(rows))))
        picked.append(rng.choice(rows, size=take, replace=False))
    return np.sort(np.concatenate(picked))


def finetune(backbone: torch.nn.Module, num_features: int, train, num_classes: int, fraction: float,
             image_size: int, mean, std, device, epochs: int = 20, lr: float = 0.01, batch_size: int = 64,
             seed: int = 0) -> torch.nn.Module:
    """Backbone + linear head fine-tuned end to end on the class-balanced labelled ``fraction`` of
    ``train`` (a LoadedDataset); returns the model ``[B, 3, H, W] -> [B, num_classes]``.

    Data-parallel when a process group is up: each global batch of ``batch_size`` is split over
    the ranks and DDP averages the gradients, so every rank ends with the same weights and the
    result does not depend on the number of ranks beyond per-rank batch-norm statistics."""
    rows = balanced_subset(train.labels(), fraction, seed)
    subset = replace(train, table=train.table.select(rows.tolist()), num_instances=len(rows))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(copy.deepcopy(backbone), torch.nn.Linear(num_features, num_classes)).to(device)
    trained = model
    if size() > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's weights
    # the training data path: uint8 random crops on the CPU, the rest of the view batched on the device
    crop = train_crop(AugmentConfig(), image_size, seed)
    views = DeviceViews(AugmentConfig(), image_size, mean, std, seed)
    dataset = InstanceDataset(subset, crop, with_labels=True)
    # a seeded reshuffle per epoch; every labelled row once per epoch; >= 2 rows per rank (batch norm)
    sampler = InstanceBatchSampler(len(rows), min(batch_size, len(rows)), rank_in(), size(), seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * len(sampler)))
    model.train()
    for epoch in range(epochs):
        sampler.set_position(epoch)
        crop.epoch = epoch
        loss = None
        for batch in make_loader(dataset, batch_sampler=sampler, seed=seed + epoch):
            images = views.train(batch_crops(batch, image_size, device), batch["ids"], epoch)
            loss = F.cross_entropy(trained(images), batch["labels"].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if loss is None:
            raise ValueError(f"semi-supervised {fraction:.0%}: no labelled batch to fine-tune on ({len(rows)} "
                             f"labelled rows over {size()} ranks)")
        if is_main():
            log.info("semi %g%%: epoch %d/%d, last loss %.3f", 100 * fraction, epoch + 1, epochs, loss.item())
    if size() > 1:  # each rank's last forward updated its own batch-norm statistics: keep rank 0's
        for buffer in model.buffers():
            broadcast_(buffer, src=0)
    return model.eval()


@torch.no_grad()
def evaluate(model: torch.nn.Module, test_batches, device) -> tuple[float, int]:
    """(top-1, rows counted) over the whole test split. ``test_batches()``: this rank's share as
    (images, labels); the counts are summed over ranks (a collective when a process group is up)."""
    counts = torch.zeros(2, dtype=torch.float64)
    for images, labels in test_batches():
        predicted = model(images.to(device)).float().cpu().argmax(dim=1)  # ties: the lowest class
        counts += torch.tensor([(predicted == labels).sum().item(), len(labels)], dtype=torch.float64)
    all_reduce_sum(counts)
    return (counts[0] / counts[1]).item(), int(counts[1])
