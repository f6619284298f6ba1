"""Hugging Face ``datasets`` ingestion: dataset specs, stable instance ids, sampling, decoding.

A dataset spec names the data the way users already do::

    parquet:/data/train-*.parquet          imagefolder:/data/train       disk:/data/saved
    arrow:/data/train.arrow                owner/name  (hub: datasets' cache or a download)
    sklearn:digits                         (the embedded default: scikit-learn's digits, 32x32 RGB)

followed by optional ``:key=value`` options: ``split`` (imagefolder, disk, hub), ``image_column``, ``label_column``,
``start`` (skip the first rows), ``limit``, ``streaming``
(e.g. ``parquet:/x/train.parquet:image_column=img:limit=2000``, ``sklearn:digits:start=1200``).

Instance id = row position in the dataset after ``start`` / ``limit``: stable across runs, world
sizes and shuffles. A streaming dataset gives every row the same id the map-style loader would
(its global row number, from the files' row counts; see ``ifc_ds.streaming``).

The package, along its seams: ``spec`` (parsing), ``loading`` (HF ``datasets`` -> ``LoadedDataset``),
``sampling`` (the distributed sampler), ``batches`` (samples, collate, loaders), ``epochs``
(``MapEpochs``). Everything public is importable from ``ifc_ds.data``.
"""

from ifc_ds.data.batches import (
    InstanceDataset,
    collate,
    default_num_workers,
    make_loader,
    memory_batches,
    ordered_batches,
)
from ifc_ds.data.epochs import MapEpochs
from ifc_ds.data.loading import LoadedDataset, load_dataset
from ifc_ds.data.sampling import InstanceBatchSampler, epoch_permutation, step_bounds
from ifc_ds.data.spec import KINDS, OPTIONS, DatasetSpec, DatasetSpecError, parse_spec

__all__ = ["KINDS", "OPTIONS", "DatasetSpec", "DatasetSpecError", "InstanceBatchSampler", "InstanceDataset",
           "LoadedDataset", "MapEpochs", "collate", "default_num_workers", "epoch_permutation", "load_dataset",
           "make_loader", "memory_batches", "ordered_batches", "parse_spec", "step_bounds"]
