"""Streaming datasets whose instance id is a property of the row, not of the iteration.

A stream is read from a *row source* that knows how many rows each of its units holds without
reading them: the row groups of parquet files (their footers), or chunks of a memory-mapped table
(``disk:``, ``arrow:``, ``sklearn:``). The instance id of a row is its global row number (files in
sorted order, rows in file order, minus ``start``), exactly the id the same row gets from the
map-style loader, so ids survive shuffling, the split over ranks, DataLoader workers, epochs, resumes
and changes of world size.

Each epoch the units are shuffled (seeded by seed and epoch) and cut into ``ranks x workers`` pieces
of equal row counts (+-1): a Hugging Face ``IterableDataset`` whose shards are those pieces, so
``datasets`` shuffles them with a buffer, ``split_dataset_by_node`` gives every rank whole pieces, and
the DataLoader gives every worker one piece. Every rank reads only its own rows, and every rank and
worker gets the same number of rows.

``datasets``' own ``map(with_indices=True)`` numbers rows per shard iterable (its counter restarts in
every file), which is why the ids are computed here from the unit offsets instead.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    """Rows ``[lo, hi)`` of one unit of a row source; row ``lo`` has instance id ``first_id``."""

    unit: int
    lo: int
    hi: int
    first_id: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo


class ParquetSource:
    """Parquet files (local paths or fsspec URLs such as ``hf://``): one unit per row group, row
    counts from the footers. Only the image column is read."""

    def __init__(self, files: list[str], column: str):
        import pyarrow.parquet as pq

        self.files, self.column = list(files), column
        self.units: list[tuple[int, int]] = []  # (file index, row group)
        self.unit_rows: list[int] = []
        for f, path in enumerate(self.files):
            meta = pq.ParquetFile(_open(path)).metadata
            for g in range(meta.num_row_groups):
                self.units.append((f, g))
                self.unit_rows.append(meta.row_group(g).num_rows)
        self._open_files: dict = {}

    def __getstate__(self):  # open file handles stay in the process that opened them
        return {**self.__dict__, "_open_files": {}}

    def read(self, unit: int, lo: int, hi: int):
        import pyarrow.parquet as pq

        f, group = self.units[unit]
        if f not in self._open_files:
            self._open_files = {f: pq.ParquetFile(_open(self.files[f]))}  # one file open at a time
        # batch by batch: a row group can be large (one per file is common), and only [lo, hi) is needed
        row = 0
        for batch in self._open_files[f].iter_batches(batch_size=256, row_groups=[group], columns=[self.column]):
            a, b = max(lo - row, 0), min(hi - row, batch.num_rows)
            if a < b:
                yield from batch.column(0).slice(a, b - a).to_pylist()
            row += batch.num_rows
            if row >= hi:
                return


class TableSource:
    """A memory-mapped ``datasets.Dataset`` (``disk:``, ``arrow:``, ``sklearn:``): units of ``chunk`` rows."""

    def __init__(self, table, column: str, chunk: int = 1000):
        self.table, self.column = table.select_columns([column]), column
        n = len(table)
        self.unit_rows = [min(chunk, n - s) for s in range(0, n, chunk)]
        self.chunk = chunk

    def read(self, unit: int, lo: int, hi: int):
        start = unit * self.chunk
        return self.table[start + lo:start + hi][self.column]


def _open(path: str):
    if "://" not in path:
        return path
    import fsspec

    return fsspec.open(path, "rb").open()


class NumberedStream:
    """The rows ``[start, start + limit)`` of a row source as a stream with stable instance ids."""

    def __init__(self, source, start: int = 0, limit: int | None = None):
        self.source = source
        total = sum(source.unit_rows)
        end = total if limit is None else min(total, start + limit)
        self.segments: list[Segment] = []
        row = 0
        for unit, n in enumerate(source.unit_rows):
            lo, hi = max(start, row), min(end, row + n)
            if lo < hi:
                self.segments.append(Segment(unit, lo - row, hi - row, lo - start))
            row += n
        self.num_instances = max(0, end - start)

    def pieces(self, count: int, seed: int | None) -> list[list[Segment]]:
        """The segments (shuffled when ``seed`` is not None) cut into ``count`` runs whose row counts
        differ by at most one."""
        order = list(self.segments)
        if seed is not None:
            perm = np.random.default_rng(seed).permutation(len(order))
            order = [order[i] for i in perm]
        bounds = np.linspace(0, self.num_instances, count + 1).round().astype(np.int64)
        sizes = np.diff(bounds)
        pieces, current, need = [], [], int(sizes[0])
        queue = list(order)
        while queue:
            seg = queue.pop(0)
            take = min(seg.rows, need)
            if take:
                current.append(Segment(seg.unit, seg.lo, seg.lo + take, seg.first_id))
            if take < seg.rows:
                queue.insert(0, Segment(seg.unit, seg.lo + take, seg.hi, seg.first_id + take))
            need -= take
            if need == 0 and len(pieces) < count - 1:
                pieces.append(current)
                current, need = [], int(sizes[len(pieces)])
        pieces.append(current)
        return pieces

    def dataset(self, pieces: list[list[Segment]]):
        """A ``datasets.IterableDataset`` with one shard per piece; rows ``{"instance_id", "cell"}``."""
        import datasets

        return datasets.IterableDataset.from_generator(_rows, gen_kwargs={"pieces": pieces, "source": self.source})


def _rows(pieces, source):
    for piece in pieces:
        for seg in piece:
            for i, cell in enumerate(source.read(seg.unit, seg.lo, seg.hi)):
                yield {"instance_id": seg.first_id + i, "cell": cell}


# --------------------------------------------------------------------------- the epoch's rows on one rank
class SeenIds:
    """Which instance ids an epoch has consumed: a bitmap of N bits, OR-ed over ranks when saved, so
    a resume on any number of ranks or workers skips exactly the consumed rows (before decoding)."""

    def __init__(self, num_instances: int, packed: np.ndarray | None = None):
        self.num_instances = num_instances
        self.bits = np.zeros(num_instances, dtype=bool) if packed is None else \
            np.unpackbits(packed, count=num_instances).astype(bool)

    def add(self, ids) -> None:
        self.bits[np.asarray(ids, dtype=np.int64)] = True

    def count(self) -> int:
        return int(self.bits.sum())

    def packed(self) -> np.ndarray:
        return np.packbits(self.bits)

    def merged_over_ranks(self, device) -> SeenIds:
        """Collective: the union of every rank's bitmap."""
        from ifc_ds.collectives import all_reduce_max

        bits = torch.from_numpy(self.bits.astype(np.uint8)).to(device)
        return SeenIds(self.num_instances, np.packbits(all_reduce_max(bits).cpu().numpy().astype(bool)))


class StreamShard(torch.utils.data.IterableDataset):
    """This rank's rows of a numbered stream for one epoch, decoded and cropped.

    ``prepare(cell, instance id)`` decodes and crops one image (``ifc_ds.crops.SampleCrop``; its epoch
    is set to this shard's). Yields ``(image, instance id, skipped-before flag)``; undecodable rows
    are skipped and flagged. ``exclude`` (packed bits over the ids) drops rows an interrupted epoch
    already consumed; they are dropped after the shuffle buffer, so with the same ranks and workers
    the remaining rows come in exactly the order the uninterrupted epoch would have given them."""

    def __init__(self, stream: NumberedStream, prepare, rank: int, world_size: int, num_workers: int = 0,
                 seed: int = 0, epoch: int = 0, shuffle: bool = True, shuffle_buffer: int = 10_000,
                 exclude: np.ndarray | None = None):
        if hasattr(prepare, "epoch"):
            prepare = dataclasses.replace(prepare, epoch=epoch)
        self.stream, self.prepare, self.rank, self.world_size = stream, prepare, rank, world_size
        self.num_workers, self.seed, self.epoch = max(1, num_workers), seed, epoch
        self.shuffle, self.shuffle_buffer, self.exclude = shuffle, shuffle_buffer, exclude

    def piece_rows(self) -> list[int]:
        """Rows of each (rank, worker) piece, in piece order."""
        return [sum(s.rows for s in p) for p in self._pieces()]

    def _pieces(self):
        seed = self.seed * 100_003 + self.epoch if self.shuffle else None
        return self.stream.pieces(self.world_size * self.num_workers, seed)

    def rows(self):
        from datasets.distributed import split_dataset_by_node

        ds = self.stream.dataset(self._pieces())
        if self.shuffle and self.shuffle_buffer:
            ds = ds.shuffle(seed=self.seed * 100_003 + self.epoch, buffer_size=self.shuffle_buffer)
        # ranks x workers pieces: a multiple of the world size, so datasets assigns whole pieces (shards)
        return split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)

    def __iter__(self):
        skipped = False
        for row in self.rows():
            instance = row["instance_id"]
            if self.exclude is not None and (self.exclude[instance >> 3] >> (7 - (instance & 7))) & 1:
                continue
            try:
                image = self.prepare(row["cell"], instance)
            except Exception as exc:  # PIL raises many types for corrupt data
                log.debug("instance %d undecodable: %s", instance, exc)
                skipped = True
                continue
            yield image, instance, skipped
            skipped = False


class StreamEpochs:
    """Epochs over a numbered stream for the trainer: ``batches(epoch, offset)`` yields ``(start, end,
    batch)`` like ``data.MapEpochs``. A step needs a batch on every rank, so an epoch ends when the
    first rank runs out; the rows that were never reached are counted and logged. The consumed ids are
    checkpointed (``state_dict``, a collective), so a resume continues the epoch without repeating or
    losing rows, on any number of ranks and workers."""

    def __init__(self, loaded, prepare, global_batch: int, rank: int, world_size: int, seed: int,
                 num_workers: int, device, timeout: float = 0):
        self.stream, self.prepare, self.global_batch = loaded.stream, prepare, global_batch
        self.timeout = timeout
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers, self.device = num_workers, device
        self.per_rank = global_batch // world_size
        self.seen = SeenIds(self.stream.num_instances)
        self.unreached = 0  # rows an epoch ended without (the last partial batches), all epochs
        # the smallest piece bounds the steps every rank can make (each worker drops its last partial batch)
        pieces = world_size * max(1, num_workers)
        smallest = self.stream.num_instances // pieces
        self.steps_per_epoch = max(1, max(1, num_workers) * (smallest // self.per_rank))

    def remaining_steps(self, epoch: int, offset: int) -> int:
        return max(0, self.steps_per_epoch - offset // self.global_batch)

    def shard(self, epoch: int) -> StreamShard:
        exclude = self.seen.packed() if self.seen.count() else None
        return StreamShard(self.stream, self.prepare, self.rank, self.world_size, self.num_workers, self.seed,
                           epoch, exclude=exclude)

    def batches(self, epoch: int, offset: int):
        from ifc_ds.collectives import lockstep
        from ifc_ds.data import make_loader

        loader = make_loader(self.shard(epoch), batch_size=self.per_rank, num_workers=self.num_workers,
                             timeout=self.timeout, drop_last=True)
        start = offset
        for batch in lockstep(iter(loader), self.device, until="any"):
            self.seen.add(batch["ids"])
            yield start, start + self.global_batch, batch
            start += self.global_batch
        reached = self.seen.merged_over_ranks(self.device).count()
        unreached = self.stream.num_instances - reached
        self.unreached += unreached
        if unreached:
            log.info("epoch %d: %d of %d rows not reached (the last partial batch of every rank and worker)",
                     epoch, unreached, self.stream.num_instances)
        self.seen = SeenIds(self.stream.num_instances)

    def state_dict(self) -> dict:
        """Collective: the ids consumed in the current epoch by any rank."""
        return {"streaming": True, "seed": self.seed, "seen": self.seen.merged_over_ranks(self.device).packed(),
                "unreached": self.unreached}

    def load_state_dict(self, state: dict) -> None:
        if state.get("streaming"):
            self.seen = SeenIds(self.stream.num_instances, state["seen"])
            self.unreached = state.get("unreached", 0)
