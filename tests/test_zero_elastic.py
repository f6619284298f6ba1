"""ZeRO-1/2 backbone state saved by 2 ranks, re-partitioned onto 1 and 3 ranks (and back to 2).

The reference is read from the live engines through DeepSpeed's own ``safe_get_full_*`` API, not from
the files that ``zero_elastic`` parses, so a wrong reassembly cannot agree with it by construction."""

from pathlib import Path

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state
from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

from ifc_ds.classifier import ShardedInstanceClassifier
from ifc_ds.config import load_config
from ifc_ds.engine import build_engines, optimizer_step, train_step
from ifc_ds.engine.zero_elastic import ZeroReshardError, read_zero_partitions, restore_zero_partitions
from ifc_ds.model import InstanceEncoder
from tests._dist import needs_fp16, run_ranks

N, GLOBAL_BATCH = 24, 12
# 32 px, not 16: at 16 px the test ResNet's layer4 sees 1x1 maps, whose batch norm over a rank's 6-12 values
# sent bf16 gradients to 1e31 or NaN by the second step at lr 0.5 or 0.05, and DeepSpeed skipped those steps
IMAGE_SIZE = 32
STATE_KEYS = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq")}
# fp16's dynamic loss scale, set before the save: not what a fresh engine has (2^4 here), so a restore
# that drops it shows
SAVED_SCALE, SAVED_SCALE_ITER = 32.0, 77
# ds_configs written by the test (not shipped)
WRITTEN_CONFIGS = {
    "fp16_zero1.json": """{"fp16": {"enabled": true, "loss_scale": 0, "initial_scale_power": 4,
                                    "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
                           "zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 1,
                           "gradient_clipping": 0.0}""",
    # DeepSpeed's elastic_checkpoint saves the base optimizer state as a list of per-group states
    "zero2_elastic_checkpoint.json": """{"zero_optimization": {"stage": 2, "elastic_checkpoint": true},
                                         "gradient_accumulation_steps": 1, "gradient_clipping": 0.0}""",
    # bf16 accumulating its gradients in fp32: DeepSpeed's BF16_Optimizer, not its ZeRO-1/2 optimizer
    "bf16_fp32_accumulation.json": """{"bf16": {"enabled": true}, "zero_optimization": {"stage": 1},
                                        "data_types": {"grad_accum_dtype": "fp32"}}"""}


def _engines(world_size, ds_config, optimizer):
    cfg = load_config(None, ["model.name=test_resnet", "model.head_hidden=16", "model.dim=8",
                             f"train.ds_config={ds_config}", f"train.batch_size={GLOBAL_BATCH}",
                             f"train.optimizer={optimizer}", "train.weight_decay=0", "train.lr=0.5"])
    torch.manual_seed(0)
    engines = build_engines(cfg, InstanceEncoder(cfg.model, 16), ShardedInstanceClassifier(N, 8, 0.1),
                            steps_per_epoch=4, world_size=world_size)
    assert engines.backbone.zero_optimization_stage() in (1, 2) and engines.backbone.dp_world_size == world_size
    return engines


def _step(engines, rank, world_size, seed, want_grads=False):
    """One step on this rank's share of a fixed global batch; returns the full averaged gradients
    seen by the optimizer (when asked: read between backward and step)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(GLOBAL_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    ids = torch.randperm(N, generator=gen)[:GLOBAL_BATCH]
    share = GLOBAL_BATCH // world_size
    train_step(engines, images[rank * share:(rank + 1) * share], ids[rank * share:(rank + 1) * share], 0, 0.0)
    grads = {n: safe_get_full_grad(p).cpu().clone() for n, p in engines.backbone.module.named_parameters()
             if want_grads}
    optimizer_step(engines)
    # a step DeepSpeed skipped (non-finite gradients under bf16/fp16) leaves the state the checks expect moved
    # unmoved: say so, not "momentum mismatch" (a CI run failed that way, its bf16 step skipped)
    assert engines.backbone.was_step_applied(), f"DeepSpeed skipped step {seed}: non-finite gradients"
    return grads


def _full_state(engines, keys):
    """{name: {"fp32": [..], key: [..]}} assembled across ranks by DeepSpeed (a collective)."""
    # DeepSpeed links the optimizer-state fragments right after the *first* param group's first step,
    # when the other groups have no state yet; link them again so safe_get_full_optimizer_state works
    zero = engines.backbone.optimizer
    for group, hp in enumerate(zero.single_partition_of_fp32_groups):
        lazy_init_hp_params_optimizer_state(zero.bit16_groups[group], hp, zero.optimizer.state)
    return {n: {"fp32": safe_get_full_fp32_param(p).cpu().clone(),
                **{k: safe_get_full_optimizer_state(p, k).cpu().clone() for k in keys}}
            for n, p in engines.backbone.module.named_parameters()}


def _assert_equal(got, want):
    assert got.keys() == want.keys()
    for name in want:
        for key in want[name]:
            assert torch.equal(got[name][key], want[name][key]), (name, key)


def _train_and_save(rank, world_size, ds_config, optimizer, folder):
    engines = _engines(world_size, ds_config, optimizer)
    for seed in (1, 2):
        _step(engines, rank, world_size, seed)
    state = _full_state(engines, STATE_KEYS[optimizer])
    if engines.backbone.fp16_enabled():
        engines.backbone.optimizer.loss_scaler.cur_scale = SAVED_SCALE
        engines.backbone.optimizer.loss_scaler.cur_iter = SAVED_SCALE_ITER
    engines.backbone.save_checkpoint(folder, tag="backbone")
    if rank == 0:
        torch.save(state, Path(folder) / "reference.pt")


def _restore_and_check(rank, world_size, ds_config, optimizer, folder, reference, resave_to, saved_world=2):
    engines = _engines(world_size, ds_config, optimizer)
    engines.backbone.load_checkpoint(folder, tag="backbone", load_module_only=True)
    with torch.no_grad():  # off what the module file held: the working weights must come from the partitions
        for param in engines.backbone.module.parameters():
            param.add_(1.0)
    assert restore_zero_partitions(engines.backbone, Path(folder) / "backbone") == saved_world
    want = torch.load(reference, weights_only=False)
    _assert_equal(_full_state(engines, STATE_KEYS[optimizer]), want)
    for name, param in engines.backbone.module.named_parameters():  # the working weights follow the master
        assert torch.equal(param.detach().cpu(), want[name]["fp32"].view_as(param).to(param.dtype)), name
    if engines.backbone.fp16_enabled():
        scaler = engines.backbone.optimizer.loss_scaler
        assert (scaler.cur_scale, scaler.cur_iter) == (SAVED_SCALE, SAVED_SCALE_ITER)
    if resave_to:
        engines.backbone.save_checkpoint(resave_to, tag="backbone")
    if optimizer == "sgd":  # the next step continues the saved momentum: m' = 0.9 m + g (no weight decay, no clipping)
        grads = _step(engines, rank, world_size, 3, want_grads=True)
        after = _full_state(engines, STATE_KEYS[optimizer])
        for name in want:
            expected = 0.9 * want[name]["momentum_buffer"] + grads[name]
            assert torch.allclose(after[name]["momentum_buffer"], expected, rtol=1e-5, atol=1e-7), name
    else:  # Adam's per-group step counter came along and advances from it
        zero = engines.backbone.optimizer
        assert all(int(zero.optimizer.state[hp]["step"]) == 2 for hp in zero.single_partition_of_fp32_groups)
        _step(engines, rank, world_size, 3)
        assert all(int(zero.optimizer.state[hp]["step"]) == 3 for hp in zero.single_partition_of_fp32_groups)


@pytest.mark.parametrize("ds_config,optimizer", [("ds_configs/zero2_fp32.json", "sgd"),
                                                  ("ds_configs/zero1_fp32.json", "adamw"),
                                                  ("ds_configs/zero2_offload_fp32.json", "sgd"),
                                                  ("ds_configs/zero2_bf16.json", "sgd"),
                                                  # + fp16 weights, loss scaler
                                                  pytest.param("fp16_zero1.json", "adamw", marks=needs_fp16),
                                                  ("zero2_elastic_checkpoint.json", "adamw")],
                         ids=["zero2-sgd", "zero1-adamw", "zero2-offload-sgd", "zero2-bf16-sgd", "zero1-fp16-adamw",
                              "zero2-elastic-checkpoint-adamw"])
def test_two_ranks_to_one(tmp_path, ds_config, optimizer):
    if ds_config in WRITTEN_CONFIGS:
        (tmp_path / ds_config).write_text(WRITTEN_CONFIGS[ds_config])
        ds_config = str(tmp_path / ds_config)
    saved = tmp_path / "p2"
    run_ranks(_train_and_save, 2, ds_config, optimizer, str(saved))
    run_ranks(_restore_and_check, 1, ds_config, optimizer, str(saved), str(saved / "reference.pt"), None)


def test_two_to_three_and_back_to_two(tmp_path):
    ds_config, saved, resaved = "ds_configs/zero2_fp32.json", tmp_path / "p2", tmp_path / "p3"
    run_ranks(_train_and_save, 2, ds_config, "sgd", str(saved))
    run_ranks(_restore_and_check, 3, ds_config, "sgd", str(saved), str(saved / "reference.pt"), str(resaved))
    assert len(list((resaved / "backbone").glob("*optim_states.pt"))) == 3
    # the 3-rank partitions of the restored state give back exactly the 2-rank reference
    run_ranks(_restore_and_check, 2, ds_config, "sgd", str(resaved), str(saved / "reference.pt"), None, 3)


def test_missing_partition_is_a_clear_error(tmp_path):
    (tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt").touch()
    with pytest.raises(ZeroReshardError, match="ranks \\[1\\]"):
        read_zero_partitions(tmp_path)


def _restore_refused(rank, world_size, ds_config, folder):
    from ifc_ds.checkpoint import CheckpointError

    engines = _engines(world_size, ds_config, "sgd")
    assert type(engines.backbone.optimizer).__name__ == "BF16_Optimizer"
    with pytest.raises(CheckpointError, match="not of its BF16_Optimizer .*: resume on the 2 ranks that wrote it"):
        restore_zero_partitions(engines.backbone, Path(folder) / "backbone")


def test_an_optimizer_it_cannot_repartition_is_a_clear_error(tmp_path):
    """DeepSpeed's BF16_Optimizer keeps a layout of its own: an elastic resume of it is refused in one
    line (a checkpoint error, exit 2 from train.py) instead of an AttributeError traceback."""
    ds_config = tmp_path / "bf16_fp32_accumulation.json"
    ds_config.write_text(WRITTEN_CONFIGS["bf16_fp32_accumulation.json"])
    saved = tmp_path / "p2"
    run_ranks(_train_and_save_backbone, 2, str(ds_config), str(saved))
    run_ranks(_restore_refused, 1, str(ds_config), str(saved))


def _train_and_save_backbone(rank, world_size, ds_config, folder):
    engines = _engines(world_size, ds_config, "sgd")
    _step(engines, rank, world_size, 1)
    engines.backbone.save_checkpoint(folder, tag="backbone")


def test_elastic_checkpoint_without_a_step_count_is_refused(tmp_path):
    """DeepSpeed's loader of elastic_checkpoint's layout asserts a step count in the optimizer state:
    with SGD a run could never resume (an AssertionError at a same-world resume), so it never starts."""
    from ifc_ds.config import ConfigError

    ds_config = tmp_path / "elastic.json"
    ds_config.write_text(WRITTEN_CONFIGS["zero2_elastic_checkpoint.json"])
    cfg = load_config(None, [f"train.ds_config={ds_config}", "train.optimizer=sgd"])
    with pytest.raises(ConfigError, match="elastic_checkpoint=true with train.optimizer=sgd"):
        build_engines(cfg, None, None, steps_per_epoch=4, world_size=1)  # (refused before any engine is built)
