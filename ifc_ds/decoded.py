"""Datasets decoded once per run: uint8 images in memory, so that an epoch decodes nothing.

CIFAR-10's 50,000 32x32 images are 150 MB of uint8; decoding them once costs seconds, decoding them
every epoch costs a large part of every step. ``data.in_memory=auto`` decodes a map-style dataset
once when all its images have one size and the decoded bytes fit ``data.memory_gb``; crops are then
cut from whole images a batch at a time on the device (``ifc_ds.crops.crop_resize``).

The ranks of one node share one copy: every local rank decodes its share of the rows straight into a
file in ``/dev/shm`` that all of them map, and the file is unlinked as soon as every rank has mapped
it (nothing is left behind, even after a crash). Without enough shared memory (containers often
have 64 MB) each rank keeps a private copy instead.

An undecodable row is replaced by the next decodable row, as on the fly (``source_row``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ifc_ds.crops import decode_image, open_image

log = logging.getLogger(__name__)

_SIZE_PROBE = 64  # rows whose header sizes decide, before any decoding, whether the sizes look uniform


class InMemoryError(ValueError):
    """``data.in_memory=always`` for a dataset that cannot be decoded into one tensor."""


@dataclass
class DecodedImages:
    """uint8 ``images [N, 3, H, W]`` (rows in dataset order) and ``source_row [N]``: the row whose image
    stands in for each row (itself, or the next decodable row)."""

    images: torch.Tensor
    source_row: np.ndarray

    @property
    def num_instances(self) -> int:
        return len(self.source_row)

    @property
    def height(self) -> int:
        return self.images.shape[2]

    @property
    def width(self) -> int:
        return self.images.shape[3]


def _probe_size(loaded) -> tuple[int, int] | None:
    """(H, W) shared by the first rows' headers (no decoding), or None if they differ."""
    table, column = loaded.table, loaded.image_column
    sizes = set()
    for row in range(min(_SIZE_PROBE, len(table))):
        try:
            width, height = open_image(table[row][column]).size
        except Exception:  # undecodable rows are handled when decoding
            continue
        sizes.add((height, width))
    return sizes.pop() if len(sizes) == 1 else None


def decide(loaded, mode: str, memory_gb: float) -> tuple[int, int] | None:
    """The (H, W) to decode into memory, or None to decode on the fly. ``mode``: auto | always | never."""
    if mode == "never" or loaded.table is None:
        if mode == "always" and loaded.table is None:
            raise InMemoryError(f"dataset '{loaded.spec.text}': data.in_memory=always needs a map-style dataset "
                                "(streaming=false)")
        return None
    size = _probe_size(loaded)
    if size is None:
        if mode == "always":
            raise InMemoryError(f"dataset '{loaded.spec.text}': data.in_memory=always needs images of one size")
        log.info("dataset '%s': images of several sizes: decoded on the fly", loaded.spec.text)
        return None
    gigabytes = loaded.num_instances * 3 * size[0] * size[1] / 1e9
    if mode == "auto" and gigabytes > memory_gb:
        log.info("dataset '%s': %.1f GB decoded > data.memory_gb=%g: decoded on the fly", loaded.spec.text,
                 gigabytes, memory_gb)
        return None
    return size


def decode_into_memory(loaded, size: tuple[int, int], num_workers: int = 0, mode: str = "auto") -> DecodedImages | None:
    """Collective: decodes every row of ``loaded`` into uint8 ``[N, 3, H, W]``, shared by the ranks of
    a node. Returns None (on every rank) if a row has another size and ``mode`` is auto."""
    from ifc_ds.collectives import all_reduce_max, all_reduce_min, barrier, broadcast_object, rank_in
    from ifc_ds.dist import local_rank, local_world_size

    n, (height, width) = loaded.num_instances, size
    shape = (n, 3, height, width)
    token = broadcast_object(uuid.uuid4().hex if rank_in() == 0 else None)
    shm = _shared_memory_path(token, int(np.prod(shape)))
    # one rank without room in /dev/shm, and nobody shares: a shared file needs every local rank's part
    shared = bool(all_reduce_min(torch.tensor([shm is not None], dtype=torch.uint8)).item())
    path = shm if shared else Path(tempfile.gettempdir()) / f"ifc_ds-{token}-{os.getpid()}.u8"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # no O_TRUNC: the node's ranks open it concurrently
    try:
        os.ftruncate(fd, int(np.prod(shape)))
    finally:
        os.close(fd)
    images = np.memmap(path, dtype=np.uint8, mode="r+", shape=shape)
    local, local_world = (local_rank(), local_world_size()) if shared else (0, 1)
    status = _decode_rows(loaded, images, range(local, n, local_world), num_workers)  # 0 ok, 1 bad, 2 size
    barrier()
    if local == 0:
        path.unlink(missing_ok=True)  # every local rank has it mapped by now; the memory lives on until exit
    status = all_reduce_max(torch.from_numpy(status)).numpy()
    if (status == 2).any():
        rows = np.flatnonzero(status == 2)
        if mode == "always":
            raise InMemoryError(f"dataset '{loaded.spec.text}': row {rows[0]} is not {height}x{width} "
                                "(data.in_memory=always needs images of one size)")
        log.info("dataset '%s': %d images are not %dx%d: decoded on the fly", loaded.spec.text, len(rows), height,
                 width)
        return None
    source_row = _next_valid_rows(status == 1, loaded.spec.text)
    log.info("dataset '%s': %d images decoded into memory (%.2f GB%s), %d undecodable", loaded.spec.text, n,
             images.nbytes / 1e9, ", shared by the node's ranks" if shared else "", int((status == 1).sum()))
    return DecodedImages(torch.from_numpy(images), source_row)


def _shared_memory_path(token: str, nbytes: int) -> Path | None:
    """A file in /dev/shm if it has room for the node's one copy, else None."""
    from ifc_ds.dist import shared_memory_has_room

    if shared_memory_has_room(nbytes):
        return Path("/dev/shm") / f"ifc_ds-{token}.u8"
    log.info("no room for %.2f GB in /dev/shm: every rank decodes its own copy", nbytes / 1e9)
    return None


def _decode_rows(loaded, images: np.ndarray, rows, num_workers: int) -> np.ndarray:
    """Decodes ``rows`` into ``images`` (a shared mapping: DataLoader workers write into it directly)."""
    status = np.zeros(len(images), dtype=np.uint8)
    rows = list(rows)
    task = _DecodeInto(loaded.table, loaded.image_column, images)
    if num_workers > 0:  # workers write into the mapping (they map the file themselves)
        from ifc_ds.workers import worker_context

        loader = torch.utils.data.DataLoader(rows, batch_size=256, num_workers=num_workers,
                                             collate_fn=task.decode_many,
                                             multiprocessing_context=worker_context(num_workers))
        results = (item for part in loader for item in part)
    else:
        results = (task(row) for row in rows)
    for row, code in results:
        status[row] = code
    if isinstance(images, np.memmap):
        images.flush()
    return status


class _DecodeInto:
    """Decodes a row into its slot of ``images`` (an ``np.memmap``); pickled for a worker as the file's
    path, so that the worker writes into the very mapping instead of into a copy."""

    def __init__(self, table, column, images: np.memmap):
        self.table, self.column, self.images = table, column, images

    def __getstate__(self):
        images = self.images
        return {"table": self.table, "column": self.column, "path": images.filename, "shape": images.shape}

    def __setstate__(self, state):
        self.table, self.column = state["table"], state["column"]
        self.images = np.memmap(state["path"], dtype=np.uint8, mode="r+", shape=state["shape"])

    def __call__(self, row: int) -> tuple[int, int]:
        try:
            pixels = np.asarray(decode_image(self.table[row][self.column]), dtype=np.uint8)
        except Exception as exc:  # PIL raises many types for corrupt data
            log.debug("row %d undecodable: %s", row, exc)
            return row, 1
        if pixels.shape[:2] != self.images.shape[2:]:
            return row, 2
        self.images[row] = pixels.transpose(2, 0, 1)
        return row, 0

    def decode_many(self, rows):
        return [self(row) for row in rows]


def _next_valid_rows(bad: np.ndarray, name: str) -> np.ndarray:
    """``source_row[r]``: r, or the next row (cyclically) that decoded."""
    n = len(bad)
    good = np.flatnonzero(~bad)
    if len(good) == 0:
        raise ValueError(f"dataset '{name}': no image could be decoded")
    rows = np.arange(n)
    nxt = np.searchsorted(good, rows)  # index of the first good row >= r
    return np.where(nxt < len(good), good[np.minimum(nxt, len(good) - 1)], good[0])


def decode_as_configured(loaded, data_cfg, num_workers: int):
    """Collective. A map-style dataset decoded into memory if ``data.in_memory`` / ``data.memory_gb``
    say so (``DecodedImages``), else None (streams are never decoded into memory)."""
    if loaded.table is None:
        return None
    size = decide(loaded, data_cfg.in_memory, data_cfg.memory_gb)
    return decode_into_memory(loaded, size, num_workers, data_cfg.in_memory) if size else None
