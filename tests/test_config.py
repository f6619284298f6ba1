import pytest

from ifc_ds.config import ConfigError, load_config, parse_overrides, save_config


def test_yaml_and_overrides(tmp_path):
    cfg = load_config("configs/cifar10.yaml", ["train.epochs=2", "data.limit=2000", "output_dir=out/run1",
                                               "classifier.chunk_size=null", "model.kwargs={drop_path_rate: 0.1}"])
    assert cfg.train.epochs == 2 and cfg.data.limit == 2000 and cfg.output_dir == "out/run1"
    assert cfg.classifier.chunk_size is None and cfg.model.kwargs == {"drop_path_rate": 0.1}
    assert cfg.train.lr == pytest.approx(float(cfg.train.lr))
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override,message", [
    ("train.epoch=3", "unknown config key 'train.epoch'"),
    ("nope=1", "unknown config key 'nope'"),
    ("train.epochs=two", "train.epochs: expected an integer"),
    ("train.epochs=0", "train.epochs must be > 0"),
    ("train.optimizer=rmsprop", "not one of sgd, lars, adamw"),
    ("model.small_images=maybe", "expected true/false"),
    ("train=3", "expected a section"),
    ("hooks.smoothing.eps=1.5", "eps must be in"),
    ("eval.holdout=0", "eval.holdout=0 with no eval.test"),  # the default eval.train has no eval.test
])
def test_bad_overrides_are_clear(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["justakey"])


def test_dotted_override_updates_a_mapping_in_place():
    from ifc_eval.suite import load_suite_config

    cfg = load_suite_config("ifc_eval/configs/cifar10.yaml", ["datasets.cifar10.limit_train=10000"])
    assert cfg.datasets["cifar10"].limit_train == 10000 and cfg.datasets["cifar10"].train.endswith("train.parquet")
    cfg = load_config(None, ["model.kwargs={drop_path_rate: 0.1}", "model.kwargs.drop_rate=0.2"])
    assert cfg.model.kwargs == {"drop_path_rate": 0.1, "drop_rate": 0.2}


def test_holdout_zero_is_fine_with_a_test_split_or_no_monitor():
    assert load_config(None, ["eval.holdout=0", "eval.test=sklearn:digits"]).eval.holdout == 0
    assert load_config(None, ["eval.holdout=0", "eval.train=null"]).eval.train is None


def test_choices_are_literal_fields_and_sections_check_themselves():
    import typing

    from ifc_ds.config import ClassifierConfig, DataConfig, OptimizerName, TrainConfig
    from ifc_ds.engine import OPTIMIZERS

    assert set(typing.get_args(OptimizerName)) == set(OPTIMIZERS)  # the config offers what the factory builds
    with pytest.raises(ConfigError, match=r"data.in_memory: True is not one of auto, always, never \(YAML reads yes"):
        load_config(None, ["data.in_memory=yes"])
    with pytest.raises(ConfigError, match="data.in_memory: 'sometimes' is not one of auto, always, never$"):
        load_config(None, ["data.in_memory=sometimes"])
    with pytest.raises(ConfigError, match="hooks.raw_init.mode: 'eager' is not one of full, lazy"):
        load_config(None, ["hooks.raw_init.mode=eager"])
    # a section built in code is checked as one loaded from a file
    with pytest.raises(ConfigError, match="train.batch_size must be >= 2"):
        TrainConfig(batch_size=1)
    with pytest.raises(ConfigError, match="classifier.temperature must be > 0"):
        ClassifierConfig(temperature=0)
    with pytest.raises(ConfigError, match="data.memory_gb must be >= 0"):
        DataConfig(memory_gb=-1)


def test_exponent_floats_without_a_dot():
    """PyYAML (YAML 1.1) reads ``5e-4`` as a string: a float field takes it, from the command line and
    from a file; other strings are still errors."""
    cfg = load_config(None, ["train.weight_decay=5e-4", "train.lr=1E-1"])
    assert cfg.train.weight_decay == 5e-4 and cfg.train.lr == 0.1
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        load_config(None, ["train.lr=e-4"])
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        load_config(None, ["train.lr=fast"])


def test_ds_config_paths_resolve_from_any_working_directory(tmp_path, monkeypatch):
    """A relative ``train.ds_config`` (the default is ``ds_configs/zero0_fp32.json``) is looked up in the
    working directory, then in the repository: a job started elsewhere (a SLURM job's folder) finds the
    shipped configs. Before, the repository lookup pointed into the package and such a job failed."""
    import json
    from pathlib import Path

    from ifc_ds.config import TrainConfig
    from ifc_ds.engine import read_ds_config

    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(tmp_path)
    for name in (TrainConfig().ds_config, "ds_configs/zero2_bf16.json"):
        assert read_ds_config(name) == json.loads((repo / name).read_text())
    (tmp_path / "ds_configs").mkdir()  # the working directory's own file wins
    (tmp_path / "ds_configs" / "zero0_fp32.json").write_text('{"gradient_accumulation_steps": 3}')
    assert read_ds_config("ds_configs/zero0_fp32.json") == {"gradient_accumulation_steps": 3}
    with pytest.raises(ConfigError, match="train.ds_config ds_configs/none.json does not exist"):
        read_ds_config("ds_configs/none.json")


@pytest.mark.parametrize("ds_config,message", [
    ({"optimizer": {"type": "Adam"}}, "has a 'optimizer' section"),
    ({"scheduler": {"type": "WarmupLR"}}, "has a 'scheduler' section"),
    ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3 is not supported"),
    ({"gradient_accumulation_steps": 0}, "must be a positive integer"),
    ({"gradient_accumulation_steps": 2, "managed_gradient_accumulation": True}, "is not supported"),
    # DeepSpeed never scales the loss there but unscales the gradients: the backbone did not move (measured)
    ({"fp16": {"enabled": True}}, "fp16 with ZeRO stage 0 does not train"),
    ({"fp16": {"enabled": True}, "zero_optimization": {"stage": 0}}, "deepspeedai/DeepSpeed#8393"),
    # DeepSpeed reads these as enabled (a string "false" too): the refusal above was walked around
    ({"fp16": {"enabled": "true"}}, "fp16.enabled must be true or false"),
    ({"fp16": {"enabled": 1}}, "fp16.enabled must be true or false"),
    ({"torch_autocast": {"enabled": "false"}}, "torch_autocast.enabled must be true or false"),
    ({"bfloat16": {"enabled": "yes"}}, "bfloat16.enabled must be true or false"),  # bf16's older name
    ({"fp16": True}, "ds_config fp16 must be a section"),  # (was an AttributeError traceback)
    ({"fp16": None}, "ds_config fp16 must be a section"),
    # fp16 autocast: ZeRO-1/2 never lowered the scale (every step skipped), ZeRO-0's scaler skipped unreported
    *[({"torch_autocast": {"enabled": True, **dtype}, "zero_optimization": {"stage": stage}}, "torch_autocast needs")
      for stage in (0, 1, 2) for dtype in ({"dtype": "torch.float16"}, {"dtype": "fp16"}, {"dtype": "half"}, {})],
])
def test_ds_configs_ifc_ds_cannot_run_are_refused(ds_config, message):
    from ifc_ds.engine import backbone_ds_config

    with pytest.raises(ConfigError, match=message):
        backbone_ds_config(ds_config, 16, 2)


def test_shipped_ds_configs_are_accepted():
    import json
    from pathlib import Path

    from ifc_ds.engine import backbone_ds_config, classifier_ds_config

    shipped = sorted((Path(__file__).resolve().parent.parent / "ds_configs").glob("*.json"))
    assert any("fp16" in p.name for p in shipped)
    for path in shipped:
        filled = backbone_ds_config(json.loads(path.read_text()), 16, 2)
        assert filled["train_batch_size"] == 16 * 2 * filled["gradient_accumulation_steps"], path.name
    for accepted in ({"torch_autocast": {"enabled": True, "dtype": "torch.bfloat16"},
                      "zero_optimization": {"stage": 2}},
                     {"fp16": {"enabled": True}, "zero_optimization": {"stage": 1}},
                     {"bf16": {"enabled": False}}):
        backbone_ds_config(accepted, 16, 2)
    # the classifier engine is fp32 whatever the backbone's precision, under either name of bf16
    for section in ("bf16", "bfloat16", "fp16"):
        backbone = backbone_ds_config({section: {"enabled": True}, "zero_optimization": {"stage": 1}}, 16, 2)
        assert section not in classifier_ds_config(backbone, 1.0)
