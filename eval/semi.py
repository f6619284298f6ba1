"""Semi-supervised protocol: fine-tune backbone + a linear head end to end on a class-balanced
fraction (1%, 10%) of the training labels, then top-1 on the test split."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from ifc_ds.augment import train_transform
from ifc_ds.config import AugmentConfig
from ifc_ds.data import InstanceDataset, make_loader
from ifc_ds.knn import topk_accuracy


def balanced_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Row indices: ``round(fraction * count_c)`` (at least 1) rows of every class c, chosen with
    ``seed``; sorted. The same (labels, fraction, seed) always gives the same subset."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        take = max(1, int(round(fraction * len(rows))))
        picked.append(rng.choice(rows, size=take, replace=False))
    return np.sort(np.concatenate(picked))


def finetune(backbone: torch.nn.Module, num_features: int, train, test_batches, num_classes: int, fraction: float,
             image_size: int, mean, std, device, epochs: int = 20, lr: float = 0.01, batch_size: int = 64,
             seed: int = 0) -> float:
    """Returns the test top-1 of backbone + linear head fine-tuned on the labelled subset of ``train``
    (a LoadedDataset). ``test_batches``: a callable returning an iterator of (images, labels)."""
    from dataclasses import replace

    rows = balanced_subset(train.labels(), fraction, seed)
    subset = replace(train, table=train.table.select(rows.tolist()), num_instances=len(rows))
    model = torch.nn.Sequential(copy.deepcopy(backbone), torch.nn.Linear(num_features, num_classes)).to(device)
    torch.manual_seed(seed)
    dataset = InstanceDataset(subset, train_transform(AugmentConfig(), image_size, mean, std), with_labels=True)
    loader = make_loader(dataset, batch_size=min(batch_size, len(rows)), seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * len(loader)))
    model.train()
    for _ in range(epochs):
        for batch in loader:
            if len(batch["labels"]) < 2:
                continue  # batch norm needs two samples
            loss = F.cross_entropy(model(batch["images"].to(device)), batch["labels"].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    scores, targets = [], []
    with torch.no_grad():
        for images, labels in test_batches():
            scores.append(model(images.to(device)).float().cpu())
            targets.append(labels)
    return topk_accuracy(torch.cat(scores), torch.cat(targets), ks=(1,))[1]
