"""Hugging Face ``datasets`` ingestion: dataset specs, stable instance ids, sampling, decoding.

A dataset spec names the data the way users already do::

    parquet:/data/train-*.parquet          imagefolder:/data/train       disk:/data/saved
    arrow:/data/train.arrow                owner/name  (hub, offline cache only)
    sklearn:digits                         (the embedded default: scikit-learn's digits, 32x32 RGB)

followed by optional ``:key=value`` options: ``split``, ``image_column``, ``label_column``,
``start`` (skip the first rows), ``limit``, ``streaming``
(e.g. ``parquet:/x/train.parquet:image_column=img:limit=2000``, ``sklearn:digits:start=1200``).

Instance id = row position in the dataset after ``start`` / ``limit``: stable across runs, world
sizes and shuffles. A streaming dataset gives every row the same id the map-style loader would
(its global row number, from the files' row counts; see ``ifc_ds.streaming``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

KINDS = ("parquet", "imagefolder", "disk", "arrow", "sklearn")
OPTIONS = ("split", "image_column", "label_column", "start", "limit", "streaming")


class DatasetSpecError(ValueError):
    """A dataset spec that cannot be loaded; the message names the spec."""


@dataclass(frozen=True)
class DatasetSpec:
    kind: str  # one of KINDS, or "hub"
    path: str
    split: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    start: int = 0
    limit: int | None = None
    streaming: bool = False
    text: str = ""

    def error(self, message: str) -> DatasetSpecError:
        return DatasetSpecError(f"dataset '{self.text}': {message}")


def parse_spec(text: str) -> DatasetSpec:
    """``"parquet:/x/*.parquet:split=train"`` -> DatasetSpec (see the module docstring)."""
    if not text or not isinstance(text, str):
        raise DatasetSpecError(f"dataset spec must be a non-empty string, got {text!r}")
    head, _, rest = text.partition(":")
    if head in KINDS:
        kind, body = head, rest
    elif "/" in head and not head.startswith(("/", ".")):
        kind, body = "hub", text
    else:
        raise DatasetSpecError(f"dataset '{text}': unknown kind '{head}'; use one of {', '.join(KINDS)} "
                               "or a hub name owner/name")
    # options are the trailing ':key=value' segments; everything before them is the path
    segments = body.split(":")
    options: dict = {}
    while len(segments) > 1 and "=" in segments[-1]:
        for item in segments.pop().split(","):
            key, _, value = item.partition("=")
            if key not in OPTIONS:
                raise DatasetSpecError(f"dataset '{text}': unknown option '{key}'; options: {', '.join(OPTIONS)}")
            options[key] = value
    path = ":".join(segments)
    if not path:
        raise DatasetSpecError(f"dataset '{text}': missing path")
    try:
        limit = int(options["limit"]) if "limit" in options else None
        start = int(options.get("start", 0))
    except ValueError:
        raise DatasetSpecError(f"dataset '{text}': start and limit must be integers") from None
    return DatasetSpec(kind=kind, path=path, split=options.get("split"), image_column=options.get("image_column"),
                       label_column=options.get("label_column"), start=start, limit=limit,
                       streaming=options.get("streaming", "false").lower() in ("1", "true", "yes"), text=text)


# --------------------------------------------------------------------------- loading
def _embedded_digits():
    """scikit-learn's 1,797 bundled 8x8 handwritten digits as 32x32 RGB PNGs with labels: a real
    image dataset that needs neither network nor ../shared."""
    import io

    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for img in digits.images:
        pixels = (img / 16.0 * 255).astype(np.uint8)
        pil = Image.fromarray(pixels, mode="L").resize((32, 32), Image.BILINEAR).convert("RGB")
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)


def _pick_split(spec: DatasetSpec, ds):
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        split = spec.split or ("train" if "train" in ds else next(iter(ds)))
        if split not in ds:
            raise spec.error(f"no split '{split}'; available: {', '.join(ds)}")
        return ds[split]
    return ds


def _load_raw(spec: DatasetSpec, stream: bool):
    """The spec's rows as a datasets.Dataset (or IterableDataset); every failure is one DatasetSpecError."""
    try:
        return _load_raw_unchecked(spec, stream)
    except DatasetSpecError:
        raise
    except Exception as exc:  # datasets / pyarrow / PIL raise many types; the user needs one line
        first = (str(exc).splitlines() or [""])[0]
        if "corresponds to no data" in first:
            raise spec.error("is empty") from None
        raise spec.error(f"cannot load: {type(exc).__name__}: {first}") from None


def _match_files(spec: DatasetSpec) -> list[str]:
    root, pattern = (Path("/"), spec.path.lstrip("/")) if spec.path.startswith("/") else (Path("."), spec.path)
    files = sorted(str(p) for p in root.glob(pattern))
    if not files:
        raise spec.error(f"no file matches '{spec.path}'")
    return files


def _load_raw_unchecked(spec: DatasetSpec, stream: bool):
    import datasets

    split = spec.split or "train"
    if spec.kind == "sklearn":
        if spec.path != "digits":
            raise spec.error("the only embedded dataset is sklearn:digits")
        return _embedded_digits()
    if spec.kind in ("parquet", "arrow"):
        files = _match_files(spec)
        if spec.kind == "arrow" and stream:  # memory-mapped in place, numbered by ifc_ds.streaming
            return datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])
        return datasets.load_dataset(spec.kind, data_files={split: files}, split=split, streaming=stream)
    if spec.kind == "imagefolder":
        if not Path(spec.path).is_dir():
            raise spec.error(f"folder '{spec.path}' does not exist")
        if stream:
            raise spec.error("streaming=true is not supported for imagefolder (no stable row numbers without "
                             "listing every file; the map-style loader only stores file paths): use streaming=false")
        return _pick_split(spec, datasets.load_dataset("imagefolder", data_dir=spec.path))
    if spec.kind == "disk":
        if not Path(spec.path).exists():
            raise spec.error(f"folder '{spec.path}' does not exist")
        return _pick_split(spec, datasets.load_from_disk(spec.path))
    # hub: only what the local cache holds, so a missing dataset fails at once instead of hanging
    try:
        return datasets.load_dataset(spec.path, split=split, streaming=stream)
    except Exception as exc:  # datasets raises several types for "not cached" / offline
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline mode: it must be in the local HF cache)" if offline else ""
        raise spec.error(f"cannot load hub dataset{hint}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


def _row_source(spec: DatasetSpec, ds, image_col: str):
    """The numbered row source of a streaming spec (see ifc_ds.streaming); a format whose rows cannot
    be numbered without reading them all is refused instead of guessed."""
    from ifc_ds.streaming import ParquetSource, TableSource

    if spec.kind == "parquet":
        return ParquetSource(_match_files(spec), image_col)
    if spec.kind in ("disk", "sklearn", "arrow"):  # map-style tables: memory-mapped, numbered by position
        return TableSource(ds, image_col)
    files = _hub_parquet_files(spec)
    if files is None:
        raise spec.error("streaming=true needs parquet data files (their footers number the rows); this hub "
                         "dataset has others: use streaming=false")
    return ParquetSource(files, image_col)


def _hub_parquet_files(spec: DatasetSpec) -> list[str] | None:
    import datasets

    builder = datasets.load_dataset_builder(spec.path)
    files = (builder.config.data_files or {}).get(spec.split or "train")
    if not files or not all(str(f).endswith(".parquet") for f in files):
        return None
    return [str(f) for f in files]


def _find_columns(spec: DatasetSpec, features) -> tuple[str, str | None]:
    import datasets

    names = list(features or {})
    image_col = spec.image_column
    if image_col is None:
        image_cols = [n for n in names if isinstance(features[n], datasets.Image)]
        if not image_cols:
            raise spec.error(f"no column of type Image; columns: {', '.join(names)} (pass :image_column=...)")
        image_col = image_cols[0]
    elif image_col not in names:
        raise spec.error(f"missing image column '{image_col}'; columns: {', '.join(names)}")
    label_col = spec.label_column
    if label_col is None:
        labels = [n for n in names if isinstance(features[n], datasets.ClassLabel)]
        label_col = labels[0] if labels else ("label" if "label" in names else None)
    elif label_col not in names:
        raise spec.error(f"missing label column '{label_col}'; columns: {', '.join(names)}")
    return image_col, label_col


@dataclass
class LoadedDataset:
    """A map-style table (``table``) or a stream (``stream``), with its columns resolved."""

    spec: DatasetSpec
    image_column: str
    label_column: str | None
    table: object = None  # datasets.Dataset, images not decoded (decode=False)
    stream: object = None  # ifc_ds.streaming.NumberedStream
    num_instances: int = 0
    num_classes: int | None = None

    def labels(self) -> np.ndarray:
        if self.label_column is None or self.table is None:
            raise self.spec.error("has no label column (pass :label_column=...)")
        return np.asarray(self.table[self.label_column], dtype=np.int64)

    def select(self, rows) -> LoadedDataset:
        """The map-style dataset of these ``rows`` only (renumbered 0..len(rows)-1)."""
        table = self.table.select(rows)
        return replace(self, table=table, num_instances=len(table))


def load_dataset(spec: str | DatasetSpec, limit: int | None = None, streaming: bool | None = None,
                 num_instances: int | None = None) -> LoadedDataset:
    """Loads a spec. ``limit`` (first rows) and ``streaming`` override the spec's own options;
    ``num_instances``, when given, must equal the stream's row count."""
    import datasets

    spec = parse_spec(spec) if isinstance(spec, str) else spec
    spec = replace(spec, limit=limit if limit is not None else spec.limit,
                   streaming=streaming if streaming is not None else spec.streaming)
    # streaming parquet and hub data is read by HF's streaming loader for its features only; the
    # rows come from ifc_ds.streaming, which numbers them
    ds = _load_raw(spec, stream=spec.streaming and spec.kind in ("parquet", "hub"))
    image_col, label_col = _find_columns(spec, ds.features)
    ds = ds.cast_column(image_col, datasets.Image(decode=False))  # decode ourselves: bad files are skipped
    num_classes = None
    if label_col is not None and isinstance(ds.features[label_col], datasets.ClassLabel):
        num_classes = ds.features[label_col].num_classes
    if spec.streaming:
        from ifc_ds.streaming import NumberedStream

        stream = NumberedStream(_row_source(spec, ds, image_col), spec.start, spec.limit)
        if stream.num_instances == 0:
            raise spec.error("is empty")
        if num_instances is not None and num_instances != stream.num_instances:
            raise spec.error(f"data.num_instances={num_instances}, but the data has {stream.num_instances} rows "
                             "(leave data.num_instances unset)")
        return LoadedDataset(spec, image_col, label_col, stream=stream, num_instances=stream.num_instances,
                             num_classes=num_classes)
    if spec.start or spec.limit is not None:
        end = len(ds) if spec.limit is None else min(len(ds), spec.start + spec.limit)
        ds = ds.select(range(min(spec.start, end), end))
    if len(ds) == 0:
        raise spec.error("is empty")
    return LoadedDataset(spec, image_col, label_col, table=ds, num_instances=len(ds), num_classes=num_classes)


# --------------------------------------------------------------------------- samples and batches
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
    out = {"images": torch.stack(images),
           "ids": torch.tensor([s[1] for s in samples], dtype=torch.int64),
           "replaced": torch.tensor(sum(int(s[2]) for s in samples), dtype=torch.int64)}
    if samples and len(samples[0]) > 3:
        out["labels"] = torch.tensor([s[3] for s in samples], dtype=torch.int64)
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


# --------------------------------------------------------------------------- sampling
def epoch_permutation(num_instances: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_instances, generator=gen)


def step_bounds(num_instances: int, global_batch: int, offset: int, min_per_step: int) -> list[tuple[int, int]]:
    """Splits positions ``[offset, N)`` of an epoch into global batches of ``global_batch``; a tail
    smaller than ``min_per_step`` joins the previous batch (batch norm needs >= 2 samples per rank)."""
    bounds = [(s, min(s + global_batch, num_instances)) for s in range(offset, num_instances, global_batch)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_per_step:
        bounds[-2:] = [(bounds[-2][0], bounds[-1][1])]
    return bounds


class InstanceBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's instance ids for each step: every id exactly once per epoch across ranks.

    The epoch order is a seeded permutation; step s takes the next ``global_batch`` positions and
    splits them over the ranks (rank sizes differ by at most one). The order depends on
    (seed, epoch, global_batch) only, so ``offset`` (positions already consumed) is a resume point
    that stays valid when the number of ranks changes.
    """

    def __init__(self, num_instances: int, global_batch: int, rank: int, world_size: int, seed: int = 0,
                 shuffle: bool = True, min_per_rank: int = 2):
        self.min_per_rank = min_per_rank  # 2 (batch norm), times the micro-batches a step is split into
        if num_instances < min_per_rank * world_size or global_batch < min_per_rank * world_size:
            raise ValueError(f"{num_instances} instances in global batches of {global_batch} cannot be split "
                             f"over {world_size} ranks with at least {min_per_rank} per rank")
        self.num_instances, self.global_batch = num_instances, global_batch
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch, self.offset = 0, 0

    def set_position(self, epoch: int, offset: int = 0) -> None:
        self.epoch, self.offset = epoch, offset

    def bounds(self) -> list[tuple[int, int]]:
        # half a global batch keeps the tail rule independent of the world size whenever each rank's
        # batch is >= 4; 2 per rank is the floor batch norm needs
        min_tail = max(-(-self.global_batch // 2), self.min_per_rank * self.world_size)
        return step_bounds(self.num_instances, self.global_batch, self.offset, min_tail)

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_instances)
        return epoch_permutation(self.num_instances, self.seed, self.epoch)

    def __len__(self) -> int:
        return len(self.bounds())

    def __iter__(self):
        order = self.order()
        for start, end in self.bounds():
            yield np.array_split(order[start:end].numpy(), self.world_size)[self.rank].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "global_batch": self.global_batch,
                "num_instances": self.num_instances}


def default_num_workers(local_world_size: int) -> int:
    """Spare cores per rank, at most 8; 0 (decode in the main process) when there are none."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(local_world_size, 1) - 1))


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
                    pin_memory: bool = False, decoded=None):
    """This rank's share of a map-style dataset in order (no shuffle): the same number of batches on
    every rank (collective-safe), from memory when ``decoded`` is given, else decoded by workers."""
    from ifc_ds.dist import rank, world_size

    world = world_size()
    sampler = InstanceBatchSampler(loaded.num_instances, batch_size * world, rank(), world, shuffle=False)
    if decoded is not None:
        return memory_batches(decoded, sampler, crop, loaded.labels() if with_labels else None)
    dataset = InstanceDataset(loaded, crop, with_labels=with_labels)
    return make_loader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory)


# --------------------------------------------------------------------------- epochs for the trainer
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
