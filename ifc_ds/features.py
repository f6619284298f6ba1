"""Batched passes over a dataset, split over ranks: feature extraction for kNN / evaluation and the
raw-feature-init pass. Every rank runs the same number of batches (collective-safe).

They use the training data path: the CPU (or memory) gives uint8 centre crops, and the device
normalises them (``ifc_ds.augment.DeviceViews.eval``)."""

from __future__ import annotations

import torch

from ifc_ds.collectives import gather_uneven
from ifc_ds.crops import batch_crops
from ifc_ds.data import LoadedDataset, ordered_batches


@torch.no_grad()
def extract_features(forward, loaded: LoadedDataset, crop, views, batch_size: int, device: torch.device,
                     num_workers: int = 0, gather: bool = False, decoded=None, group=None):
    """``forward(images) -> [b, F]`` over this rank's share. ``crop``: the CPU half (an evaluation
    ``SampleCrop``), ``views``: the device half (``DeviceViews``); ``decoded``: the dataset decoded in
    memory, if it is. Returns (features [n, F] fp32, labels [n], ids [n]) on ``device``; with
    ``gather=True`` every rank of ``group`` gets all rows (in rank order)."""
    feats, labels, ids = [], [], []
    for batch in ordered_batches(loaded, crop, batch_size, num_workers, with_labels=True,
                                 pin_memory=device.type == "cuda", decoded=decoded, group=group):
        out = forward(views.eval(batch_crops(batch, crop.size, device)))
        feats.append(out.float())
        labels.append(batch["labels"].to(device))
        ids.append(batch["ids"].to(device))
    feats, labels, ids = torch.cat(feats), torch.cat(labels), torch.cat(ids)
    if gather:  # on the device: NCCL gathers device tensors only
        feats, labels, ids = (gather_uneven(t, group) for t in (feats, labels, ids))
    return feats, labels, ids


def raw_init_feature_pass(encoder, loaded: LoadedDataset, crop, views, device: torch.device, num_workers: int,
                          decoded=None):
    """For raw-feature init (``hooks.RawFeatureInit``): ``run(batch_size)`` yields (features [b, D] of
    the whole encoder as it is, ids [b]) over this rank's share, the same number of batches on every
    rank (a streaming shard that ends early yields empty ones)."""
    from ifc_ds.collectives import lockstep, rank_in, size
    from ifc_ds.data import make_loader
    from ifc_ds.streaming import StreamShard

    def run(batch_size: int):
        if loaded.stream is not None:
            shard = StreamShard(loaded.stream, crop, rank_in(), size(), shuffle=False)
            batches = lockstep(iter(make_loader(shard, batch_size=batch_size)), device, until="all")
        else:
            batches = ordered_batches(loaded, crop, batch_size, num_workers, decoded=decoded)
        for batch in batches:
            if batch is None:
                yield torch.zeros(0, encoder.head[-1].out_features, device=device), \
                    torch.zeros(0, dtype=torch.int64, device=device)
                continue
            yield encoder(views.eval(batch_crops(batch, crop.size, device))).float(), batch["ids"].to(device)
    return run
