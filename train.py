"""Pretrain a backbone by full instance classification.

    deepspeed --num_gpus 2 train.py --config configs/cifar10.yaml data.train=parquet:/x/train.parquet
    python train.py train.epochs=1 data.limit=500            # one process, embedded digits data

Everything is set in the YAML config (ifc_ds/config.py lists every key) plus key=value overrides;
the DeepSpeed flags (--deepspeed_config, --local_rank, ...) are accepted as well.
"""

import argparse
import logging
import os
import sys

import deepspeed

from ifc_ds.config import load_config
from ifc_ds.trainer import EXIT_PEER_LOST, finish, is_peer_failure, run


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
    cfg = load_config(args.config, overrides)
    try:
        return finish(run(cfg))
    except RuntimeError as exc:
        if not is_peer_failure(exc):
            raise
        logging.getLogger("ifc_ds").error(
            "a peer rank died or a collective timed out (dist.timeout_s=%s); restart with resume=auto to continue "
            "from the last complete checkpoint in %s/checkpoints. (%s)", cfg.dist.timeout_s, cfg.output_dir,
            str(exc).splitlines()[0][:300])
        os._exit(EXIT_PEER_LOST)  # tearing down a broken process group can itself hang


if __name__ == "__main__":
    sys.exit(main())
