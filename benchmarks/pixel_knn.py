"""A floor for "random init" kNN numbers: the suite's weighted kNN on raw pixels.

    python benchmarks/pixel_knn.py --data ../shared/data/cifar10 [--limit-train 10000]

Features are the eval-transformed images flattened ([3*H*W]: per-channel normalised pixels), the
protocol is the suite's (cosine, votes exp(sim/T), T=0.07, k in {20, 200}). One process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ifc_ds.augment import DeviceViews  # noqa: E402
from ifc_ds.config import AugmentConfig  # noqa: E402
from ifc_ds.crops import SampleCrop  # noqa: E402
from ifc_ds.data import load_dataset  # noqa: E402
from ifc_ds.features import extract_features  # noqa: E402
from ifc_ds.knn import knn_predict, topk_accuracy  # noqa: E402
from ifc_ds.model import data_config  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cifar10")
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    start = time.time()
    mean, std = data_config("resnet18")
    crop, views = SampleCrop(args.image_size, train=False), DeviceViews(AugmentConfig(), args.image_size, mean, std,
                                                                         channels_last=False)
    cpu = torch.device("cpu")
    rows = {}
    for split, limit in (("train", args.limit_train), ("test", None)):
        loaded = load_dataset(f"parquet:{args.data}/{split}.parquet", limit=limit)
        feats, labels, _ = extract_features(lambda x: x.flatten(1), loaded, crop, views, 512, cpu)
        rows[split] = (feats, labels, loaded.num_classes)
    (bank, bank_y, num_classes), (queries, query_y, _) = rows["train"], rows["test"]
    print(f"raw-pixel kNN, bank {len(bank):,} x {bank.shape[1]}, queries {len(queries):,}\n")
    print("| k | top-1 (%) |\n|---|---|")
    for k in (20, 200):
        scores = knn_predict(bank, bank_y, queries, num_classes, k=k, temperature=0.07)
        print(f"| {k} | {100 * topk_accuracy(scores, query_y, ks=(1,))[1]:.2f} |")
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
