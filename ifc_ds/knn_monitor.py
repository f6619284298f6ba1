"""The kNN monitor of a pretraining run: kNN top-1 of the backbone's pooled features on a labelled
bank / query pair, through the training data path (decoded once into memory when they fit,
normalised on the device)."""

from __future__ import annotations

import torch

from ifc_ds.augment import DeviceViews, eval_crop
from ifc_ds.config import Config
from ifc_ds.data import load_dataset
from ifc_ds.decoded import decode_as_configured
from ifc_ds.features import extract_features
from ifc_ds.knn import knn_predict, topk_accuracy


class KnnMonitor:
    """The bank is sharded over the ranks of ``group`` (the run's data-parallel group)."""

    def __init__(self, cfg: Config, views: DeviceViews, num_workers: int, group=None):
        self.cfg, self.views, self.num_workers, self.group = cfg, views, num_workers, group
        self.crop = eval_crop(cfg.augment, cfg.data.image_size)
        bank = load_dataset(cfg.eval.train, limit=cfg.eval.limit_train)
        if cfg.eval.test:
            queries = load_dataset(cfg.eval.test, limit=cfg.eval.limit_test)
        else:  # hold out the last rows of the bank as queries
            n_query = max(1, int(bank.num_instances * cfg.eval.holdout))
            n_bank = bank.num_instances - n_query
            bank, queries = bank.select(range(n_bank)), bank.select(range(n_bank, bank.num_instances))
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
