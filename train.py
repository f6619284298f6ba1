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
import traceback

import deepspeed

from ifc_ds.config import load_config
from ifc_ds.dist import hard_exit
from ifc_ds.lifecycle import BAD_INPUT, EXIT_FAILED, EXIT_PEER_LOST, exit_bad_input, finish, is_peer_failure
from ifc_ds.trainer import run


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
    cfg = None
    try:
        cfg = load_config(args.config, overrides)  # (inside: a bad key or value is bad input too)
        return finish(run(cfg))
    except BAD_INPUT as exc:  # one line says what
        exit_bad_input(exc)
    except Exception as exc:
        log = logging.getLogger("ifc_ds")
        rank = os.environ.get("RANK", "0")
        # the whole traceback first, whatever the failure: it is the only record of the cause
        log.error("rank %s failed:\n%s", rank, traceback.format_exc().rstrip())
        if cfg is not None and is_peer_failure(exc):
            log.error("a peer rank died or a collective timed out (dist.timeout_s=%s); restart with resume=auto to "
                      "continue from the last complete checkpoint in %s/checkpoints", cfg.dist.timeout_s,
                      cfg.output_dir)
            code = EXIT_PEER_LOST
        else:
            code = EXIT_FAILED
        hard_exit(code)


if __name__ == "__main__":
    sys.exit(main())
