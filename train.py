"""Pretrain a backbone by full instance classification.

    deepspeed --num_gpus 2 train.py --config configs/cifar10.yaml data.train=parquet:/x/train.parquet
    python train.py train.epochs=1 data.limit=500            # one process, embedded digits data

Everything is set in the YAML config (ifc_ds/config.py lists every key) plus key=value overrides;
the DeepSpeed flags (--deepspeed_config, --local_rank, ...) are accepted as well.
"""

import argparse
import sys

import deepspeed

from ifc_ds.config import load_config
from ifc_ds.trainer import finish, run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML recipe, e.g. configs/cifar10.yaml")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=2")
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if getattr(args, "deepspeed_config", None):
        overrides.append(f"train.ds_config={args.deepspeed_config}")
    return finish(run(load_config(args.config, overrides)))


if __name__ == "__main__":
    sys.exit(main())
