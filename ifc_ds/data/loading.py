"""Loading a spec with Hugging Face ``datasets``: the table (or the numbered stream) and its
image / label columns, as a ``LoadedDataset``. Instance id = row position after ``start`` / ``limit``."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
import numpy as np

from ifc_ds.data.spec import DatasetSpec, DatasetSpecError, parse_spec

log = logging.getLogger(__name__)


def _embedded_digits():
    """scikit-learn's 1,797 bundled 8x8 handwritten digits as 32x32 RGB PNGs with labels: a real
    image dataset that needs neither network nor ../shared."""
    import io

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
        if spec.streaming:  # (``stream`` is False here: HF's streaming loader reads only parquet and hub)
            raise spec.error("streaming=true is not supported for imagefolder (no stable row numbers without "
                             "listing every file; the map-style loader only stores file paths): use streaming=false")
        return _pick_split(spec, datasets.load_dataset("imagefolder", data_dir=spec.path))
    if spec.kind == "disk":
        if not Path(spec.path).exists():
            raise spec.error(f"folder '{spec.path}' does not exist")
        return _pick_split(spec, datasets.load_from_disk(spec.path))
    # hub: datasets reads its cache, or downloads (HF_HUB_OFFLINE=1: the cache only); a failure is one line
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

    builder = datasets.load_dataset_builder(spec.path)
    files = (builder.config.data_files or {}).get(spec.split or "train")
    if not files or not all(str(f).endswith(".parquet") for f in files):
        return None
    return [str(f) for f in files]


def _find_columns(spec: DatasetSpec, features) -> tuple[str, str | None]:

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


def _empty(spec: DatasetSpec, rows: int) -> DatasetSpecError:
    """The error for a spec that leaves no rows: the data's own, or those its start / limit cut away."""
    if rows == 0:
        return spec.error("is empty")
    return spec.error(f"is empty from start={spec.start} with limit={spec.limit}: the data has {rows} rows")


def load_dataset(spec: str | DatasetSpec, limit: int | None = None, streaming: bool | None = None,
                 num_instances: int | None = None) -> LoadedDataset:
    """Loads a spec. ``limit`` (first rows) and ``streaming`` override the spec's own options;
    ``num_instances``, when given, must equal the stream's row count."""

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

        source = _row_source(spec, ds, image_col)
        stream = NumberedStream(source, spec.start, spec.limit)
        if stream.num_instances == 0:
            raise _empty(spec, sum(source.unit_rows))
        if num_instances is not None and num_instances != stream.num_instances:
            raise spec.error(f"data.num_instances={num_instances}, but the data has {stream.num_instances} rows "
                             "(leave data.num_instances unset)")
        return LoadedDataset(spec, image_col, label_col, stream=stream, num_instances=stream.num_instances,
                             num_classes=num_classes)
    if spec.start or spec.limit is not None:
        end = len(ds) if spec.limit is None else min(len(ds), spec.start + spec.limit)
        if spec.start >= end:  # (datasets' select raises IndexError on an empty range at the end)
            raise _empty(spec, len(ds))
        ds = ds.select(range(spec.start, end))
    if len(ds) == 0:
        raise _empty(spec, 0)
    return LoadedDataset(spec, image_col, label_col, table=ds, num_instances=len(ds), num_classes=num_classes)


