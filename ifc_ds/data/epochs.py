"""Epochs over a map-style dataset for the trainer (``MapEpochs``; streams: ``ifc_ds.streaming``)."""

from __future__ import annotations

from ifc_ds.data.batches import InstanceDataset, make_loader, memory_batches
from ifc_ds.data.loading import LoadedDataset
from ifc_ds.data.sampling import InstanceBatchSampler


class MapEpochs:
    """Epochs over a map-style dataset: ``batches(epoch, offset)`` yields ``(start, end, batch)``, the
    positions ``[start, end)`` of the epoch order that the global step covers, and this rank's batch:
    cut from memory when the dataset was decoded once (``decoded``), else decoded and cropped by
    DataLoader workers. ``crop`` (``SampleCrop``) draws the boxes from (seed, epoch, id) either way."""

    def __init__(self, loaded: LoadedDataset, sampler: InstanceBatchSampler, crop, num_workers: int,
                 pin_memory: bool, decoded=None, timeout: float = 0):
        self.loaded, self.sampler, self.crop, self.decoded = loaded, sampler, crop, decoded
        self.num_workers, self.pin_memory, self.timeout = num_workers, pin_memory, timeout
        self.steps_per_epoch = len(sampler)

    def remaining_steps(self, epoch: int, offset: int) -> int:
        self.sampler.set_position(epoch, offset)
        return len(self.sampler.bounds())

    def batches(self, epoch: int, offset: int):
        self.sampler.set_position(epoch, offset)
        self.crop.epoch = epoch
        bounds = self.sampler.bounds()
        if self.decoded is not None:
            source = memory_batches(self.decoded, self.sampler, self.crop)
        else:
            source = make_loader(InstanceDataset(self.loaded, self.crop), batch_sampler=self.sampler,
                                 num_workers=self.num_workers, pin_memory=self.pin_memory, timeout=self.timeout)
        for (start, end), batch in zip(bounds, source):
            yield start, end, batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: the epoch order is a function of (seed, epoch), the position is the offset."""
