"""The kNN monitor of a pretraining run: kNN top-1 of the backbone's pooled features on a labelled
bank / query pair, through the training data path (decoded once into memory when they fit,
normalised on the device)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ifc_ds.augment import DeviceViews, eval_crop
from ifc_ds.config import Config
from ifc_ds.data import load_dataset, parse_spec
from ifc_ds.decoded import decode_as_configured
from ifc_ds.features import extract_features
from ifc_ds.knn import knn_predict, topk_accuracy

log = logging.getLogger(__name__)


def holdout_rows(num_rows: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(bank rows, query rows), each ascending: a fixed random ``fraction`` of the rows (at least one)
    as queries. Random, not the last rows: a dataset stored class after class (an imagefolder) would
    keep its last classes out of the bank, and every query would be wrong."""
    is_query = np.zeros(num_rows, dtype=bool)
    is_query[np.random.default_rng(seed).permutation(num_rows)[:max(1, int(num_rows * fraction))]] = True
    return np.flatnonzero(~is_query).tolist(), np.flatnonzero(is_query).tolist()


class KnnMonitor:
    """The bank is sharded over the ranks of ``group`` (the run's data-parallel group)."""

    def __init__(self, cfg: Config, views: DeviceViews, num_workers: int, group=None):
        self.cfg, self.views, self.num_workers, self.group = cfg, views, num_workers, group
        self.crop = eval_crop(cfg.augment, cfg.data.image_size)
        # map-style whatever the spec says: a held-out split picks rows, and both are decoded once
        for spec in (cfg.eval.train, cfg.eval.test):
            if spec and parse_spec(spec).streaming:
                log.info("kNN monitor: %s is read map-style (streaming=true applies to data.train only)", spec)
        bank = load_dataset(cfg.eval.train, limit=cfg.eval.limit_train, streaming=False)
        if cfg.eval.test:
            queries = load_dataset(cfg.eval.test, limit=cfg.eval.limit_test, streaming=False)
        else:
            bank_rows, query_rows = holdout_rows(bank.num_instances, cfg.eval.holdout)
            bank, queries = bank.select(bank_rows), bank.select(query_rows)
        self.bank, self.queries = bank, queries
        self.num_classes = bank.num_classes or int(max(bank.labels().max(), queries.labels().max())) + 1
        # evaluated many times: decoded once
        self.bank_decoded = decode_as_configured(bank, cfg.data, num_workers)
        self.queries_decoded = decode_as_configured(queries, cfg.data, num_workers)

    @torch.no_grad()
    def __call__(self, encoder, dev) -> float:
        """Collective: kNN top-1 (a fraction) of ``encoder.backbone_features`` on every rank."""
        was_training = encoder.training
        encoder.eval()
        fwd, bs = encoder.backbone_features, self.cfg.eval.batch_size
        bank_f, bank_y, bank_ids = extract_features(fwd, self.bank, self.crop, self.views, bs, dev, self.num_workers,
                                                    decoded=self.bank_decoded, group=self.group)
        query_f, query_y, _ = extract_features(fwd, self.queries, self.crop, self.views, bs, dev, self.num_workers,
                                               gather=True, decoded=self.queries_decoded, group=self.group)
        scores = knn_predict(bank_f, bank_y, query_f, self.num_classes, self.cfg.eval.k, self.cfg.eval.temperature,
                             bank_ids=bank_ids, group=self.group)
        encoder.train(was_training)
        return topk_accuracy(scores, query_y, ks=(1,))[1]
