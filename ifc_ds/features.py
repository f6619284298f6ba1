"""Batched passes over a dataset, split over ranks: feature extraction for kNN / evaluation and the
raw-feature-init pass. Every rank runs the same number of batches (collective-safe)."""

from __future__ import annotations

import torch

from ifc_ds.data import InstanceBatchSampler, InstanceDataset, LoadedDataset, make_loader
from ifc_ds.dist import gather_uneven, rank, world_size


def shard_batches(loaded: LoadedDataset, transform, batch_size: int, num_workers: int = 0, with_labels: bool = False,
                  pin_memory: bool = False):
    """This rank's share of the dataset in order (no shuffle), as collated batches."""
    world = world_size()
    sampler = InstanceBatchSampler(loaded.num_instances, batch_size * world, rank(), world, shuffle=False)
    dataset = InstanceDataset(loaded, transform, with_labels=with_labels)
    return make_loader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory)


@torch.no_grad()
def extract_features(forward, loaded: LoadedDataset, transform, batch_size: int, device: torch.device,
                     dtype: torch.dtype = torch.float32, num_workers: int = 0, gather: bool = False):
    """``forward(images) -> [b, F]`` over this rank's share. Returns (features [n, F] fp32, labels [n],
    ids [n]) on ``device``; with ``gather=True`` every rank gets all rows (in rank order)."""
    feats, labels, ids = [], [], []
    for batch in shard_batches(loaded, transform, batch_size, num_workers, with_labels=True,
                               pin_memory=device.type == "cuda"):
        out = forward(batch["images"].to(device, dtype, non_blocking=True))
        feats.append(out.float())
        labels.append(batch["labels"].to(device))
        ids.append(batch["ids"].to(device))
    feats, labels, ids = torch.cat(feats), torch.cat(labels), torch.cat(ids)
    if gather:  # on the device: NCCL gathers device tensors only
        feats, labels, ids = gather_uneven(feats), gather_uneven(labels), gather_uneven(ids)
    return feats, labels, ids
