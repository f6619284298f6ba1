"""Samples and batches: the map-style ``InstanceDataset``, ``collate``, batches cut from decoded
memory, and the DataLoaders (workers from ``ifc_ds.workers``)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import default_collate

from ifc_ds.data.loading import LoadedDataset
from ifc_ds.data.sampling import InstanceBatchSampler
from ifc_ds.dist import usable_cores

log = logging.getLogger(__name__)


class InstanceDataset(torch.utils.data.Dataset):
    """Map-style view: index i -> ``(uint8 crop [3, S, S], instance id, replaced flag[, label])``.

    ``prepare(cell, row)`` decodes and crops one image (``ifc_ds.crops.SampleCrop``). An undecodable
    image is replaced by the next decodable row (whose own id is returned, so no classifier row is
    trained on another image) and flagged, so the trainer can count it.
    """

    def __init__(self, loaded: LoadedDataset, prepare, with_labels: bool = False, max_tries: int = 16):
        if loaded.table is None:
            raise ValueError("InstanceDataset needs a map-style dataset (streaming=False)")
        self.table, self.column, self.prepare = loaded.table, loaded.image_column, prepare
        self.label_column = loaded.label_column if with_labels else None
        if with_labels and self.label_column is None:
            raise loaded.spec.error("has no label column (pass :label_column=...)")
        self.max_tries = max_tries

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int):
        for attempt in range(self.max_tries):
            row = (index + attempt) % len(self.table)
            try:
                image = self.prepare(self.table[row][self.column], row)
            except Exception as exc:  # PIL raises many types for corrupt data
                log.debug("row %d undecodable: %s", row, exc)
                continue
            sample = (image, row, attempt > 0)
            return sample + (int(self.table[row][self.label_column]),) if self.label_column else sample
        raise RuntimeError(f"{self.max_tries} consecutive undecodable images from row {index}")


def collate(samples):
    """-> dict(images uint8 [B, 3, S, S], ids [B] int64, replaced [] int64[, labels [B]][, jpeg]).

    A sample left as JPEG bytes for the device (``SampleCrop(raw_jpeg=True)``) leaves zeros in
    ``images`` and goes to ``jpeg``: its batch positions, byte tensors and crop boxes."""
    from ifc_ds.crops import RawJpeg

    raw = [i for i, s in enumerate(samples) if isinstance(s[0], RawJpeg)]
    images = [s[0] for s in samples]
    if raw:
        shape = next((im.shape for im in images if not isinstance(im, RawJpeg)), None)
        size = samples[raw[0]][0].size
        blank = torch.zeros(shape or (3, size, size), dtype=torch.uint8)
        images = [blank if isinstance(im, RawJpeg) else im for im in images]
    # torch's default_collate takes the plain fields; the images are ours to stack, because a raw
    # JPEG left for the device has no tensor yet (a blank holds its place, ``jpeg`` says where)
    fields = default_collate([s[1:] for s in samples])  # ids [B], replaced flags [B][, labels [B]]
    out = {"images": torch.stack(images), "ids": fields[0].to(torch.int64),
           "replaced": fields[1].to(torch.int64).sum()}
    if len(fields) > 2:
        out["labels"] = fields[2].to(torch.int64)
    if raw:
        out["jpeg"] = {"index": torch.tensor(raw), "data": [samples[i][0].data for i in raw],
                       "boxes": torch.stack([samples[i][0].box for i in raw])}
    return out


def memory_batches(decoded, id_batches, crop, labels: np.ndarray | None = None):
    """Batches of a dataset decoded in memory (``ifc_ds.decoded``): for each list of row ids, the whole
    uint8 images ``[B, 3, H, W]`` and their crop ``boxes [B, 4]`` (cropped on the device), with the same
    ids / replaced / labels fields as ``collate``. Nothing is decoded."""
    for ids in id_batches:
        wanted = np.asarray(ids, dtype=np.int64)
        rows = decoded.source_row[wanted]  # an undecodable row trains as the next decodable one
        boxes = crop.boxes(rows, [decoded.height] * len(rows), [decoded.width] * len(rows))
        batch = {"images": decoded.images[torch.from_numpy(rows)], "boxes": torch.from_numpy(boxes).float(),
                 "ids": torch.from_numpy(rows), "replaced": torch.tensor(int((rows != wanted).sum()))}
        if labels is not None:
            batch["labels"] = torch.from_numpy(labels[rows])
        yield batch



def default_num_workers(local_world_size: int) -> int:
    """Spare cores per rank, at most 8; 0 (decode in the main process) when there are none."""
    return max(0, min(8, usable_cores() // max(local_world_size, 1) - 1))


def make_loader(dataset, batch_sampler=None, batch_size: int | None = None, num_workers: int = 0,
                pin_memory: bool = False, seed: int = 0, timeout: float = 0, drop_last: bool = False):
    """A DataLoader of ``collate`` batches, its workers started by ``ifc_ds.workers``; ``timeout``
    (seconds, with workers) turns a stuck worker into an error instead of a hang."""
    from ifc_ds.workers import worker_context

    gen = torch.Generator().manual_seed(seed)
    batching = ({"batch_sampler": batch_sampler} if batch_sampler is not None
                else {"batch_size": batch_size, "drop_last": drop_last})
    return torch.utils.data.DataLoader(
        dataset, **batching, num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate, generator=gen,
        prefetch_factor=4 if num_workers else None, timeout=timeout if num_workers else 0,
        multiprocessing_context=worker_context(num_workers))


def ordered_batches(loaded: LoadedDataset, crop, batch_size: int, num_workers: int = 0, with_labels: bool = False,
                    pin_memory: bool = False, decoded=None, group=None):
    """This rank's share of a map-style dataset in order (no shuffle), split over the ranks of ``group``:
    the same number of batches on every rank (collective-safe), from memory when ``decoded`` is given,
    else decoded by workers."""
    from ifc_ds.collectives import rank_in, size

    world = size(group)
    sampler = InstanceBatchSampler(loaded.num_instances, batch_size * world, rank_in(group), world, shuffle=False)
    if decoded is not None:
        return memory_batches(decoded, sampler, crop, loaded.labels() if with_labels else None)
    dataset = InstanceDataset(loaded, crop, with_labels=with_labels)
    return make_loader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory)


