"""Dataset specs, stable instance ids, the distributed sampler, bad images, the backbone shapes."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ifc_ds.config import ModelConfig
from ifc_ds.crops import SampleCrop
from ifc_ds.data import (
    DatasetSpecError,
    InstanceBatchSampler,
    InstanceDataset,
    collate,
    load_dataset,
    parse_spec,
    step_bounds,
)
from ifc_ds.model import InstanceEncoder


def _png(value: int, size=8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _table(n=12):
    import datasets

    feats = datasets.Features({"img": datasets.Image(), "cls": datasets.ClassLabel(names=["a", "b", "c"])})
    return datasets.Dataset.from_dict({"img": [{"bytes": _png(i * 10), "path": None} for i in range(n)],
                                       "cls": [i % 3 for i in range(n)]}, features=feats)


def _pixel(loaded, row):
    from ifc_ds.crops import decode_image

    return int(np.asarray(decode_image(loaded.table[row][loaded.image_column]))[0, 0, 0])


@pytest.fixture
def sources(tmp_path):
    table = _table()
    table.to_parquet(str(tmp_path / "t.parquet"))
    table.save_to_disk(str(tmp_path / "disk"))
    arrow = next((tmp_path / "disk").glob("*.arrow"))
    for i in range(12):
        folder = tmp_path / "folder" / "train" / "abc"[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:02d}.png").write_bytes(_png(i * 10))
    return {"parquet": f"parquet:{tmp_path}/t.parquet", "disk": f"disk:{tmp_path}/disk", "arrow": f"arrow:{arrow}",
            "imagefolder": f"imagefolder:{tmp_path}/folder"}


@pytest.mark.parametrize("kind", ["parquet", "disk", "arrow", "imagefolder"])
def test_spec_kinds_round_trip(sources, kind):
    loaded = load_dataset(sources[kind])
    assert loaded.num_instances == 12
    assert loaded.label_column is not None and loaded.labels().shape == (12,)
    again = load_dataset(sources[kind])  # ids are row positions: stable across loads
    assert [_pixel(loaded, r) for r in range(12)] == [_pixel(again, r) for r in range(12)]
    if kind != "imagefolder":  # the tables keep their row order: row i is the i-th image written
        assert [_pixel(loaded, r) for r in range(12)] == [10 * i for i in range(12)]
        assert loaded.labels().tolist() == [i % 3 for i in range(12)]


def test_limit_and_explicit_columns(sources):
    loaded = load_dataset(sources["parquet"] + ":image_column=img:label_column=cls:limit=5")
    assert loaded.num_instances == 5 and loaded.image_column == "img" and loaded.label_column == "cls"
    assert load_dataset(sources["parquet"], limit=3).num_instances == 3
    tail = load_dataset(sources["parquet"] + ":start=9")
    assert tail.num_instances == 3 and _pixel(tail, 0) == 90


def test_embedded_digits():
    loaded = load_dataset("sklearn:digits")
    assert loaded.num_instances == 1797 and loaded.num_classes == 10
    from ifc_ds.crops import decode_image

    assert decode_image(loaded.table[0]["image"]).size == (32, 32)


def test_bad_specs_give_one_line_errors(sources, tmp_path):
    cases = {
        "parquet:/nonexistent/*.parquet": "no file matches",
        f"imagefolder:{tmp_path}/missing": "does not exist",
        f"disk:{tmp_path}/missing": "does not exist",
        "zip:/x": "unknown kind",
        sources["parquet"] + ":image_column=nope": "missing image column 'nope'",
        sources["parquet"] + ":colour=red": "unknown option",
        sources["parquet"] + ":limit=x": "must be integers",
        sources["parquet"] + ":start=-2": "start and limit must be integers >= 0",
        sources["parquet"] + ":limit=-1": "start and limit must be integers >= 0",
        # these read exactly the files named: a split would only have renamed all of them (silently, before)
        sources["parquet"] + ":split=test": "name the split's files instead",
        sources["arrow"] + ":split=train": "name the split's files instead",
        "sklearn:digits:split=test": "name the split's files instead",
        sources["imagefolder"] + ":split=test": "no split 'test'; available: train",
    }
    for spec, message in cases.items():
        with pytest.raises(DatasetSpecError, match=message) as info:
            load_dataset(spec)
        assert "\n" not in str(info.value) and spec.split(":")[0] in str(info.value)
    assert load_dataset(sources["imagefolder"] + ":split=train").num_instances == 12  # where a split chooses


def test_hub_name_offline_not_cached(monkeypatch, tmp_path):
    """A user who starts offline (the variables set before ``datasets`` is imported) gets the
    one-line error at once. ``datasets`` and ``huggingface_hub`` read the variables at import, which
    this process did long ago: their constants are set as the import would have set them. With the
    variables alone the call went to the network and failed there, after 23 s of retries, without
    reaching the offline path this test is about."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert parse_spec("someone/some-data:split=test").kind == "hub"
    with pytest.raises(DatasetSpecError, match="local HF cache") as info:
        load_dataset("someone/some-data:split=test")
    assert "OfflineModeIsEnabled" in str(info.value)  # the offline path, not a failed connection


def test_empty_dataset_is_an_error(tmp_path):
    """An empty file, and rows that start / limit cut away (from a table or a stream), give the one-line
    error. The messages are asserted whole: this test's tmp_path holds the word "empty" itself.
    ``start`` at the end of a table's rows raised datasets' IndexError before."""
    empty = f"parquet:{tmp_path}/e.parquet"
    _table().select([]).to_parquet(str(tmp_path / "e.parquet"))
    with pytest.raises(DatasetSpecError) as info:
        load_dataset(empty)
    assert str(info.value) == f"dataset '{empty}': is empty"
    _table(12).to_parquet(str(tmp_path / "t.parquet"))
    for streaming in ("false", "true"):  # (a stream counts its rows from the parquet footers)
        for options, cut in ((":limit=0", "start=0 with limit=0"), (":start=12", "start=12 with limit=None"),
                             (":start=20:limit=3", "start=20 with limit=3")):
            spec = f"parquet:{tmp_path}/t.parquet:streaming={streaming}{options}"
            with pytest.raises(DatasetSpecError) as info:
                load_dataset(spec)
            assert str(info.value) == f"dataset '{spec}': is empty from {cut}: the data has 12 rows"
        last = load_dataset(f"parquet:{tmp_path}/t.parquet:streaming={streaming}:start=11")
        assert last.num_instances == 1  # the last row is kept


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n,global_batch", [(50, 12), (7, 4), (100, 100), (5, 12)])  # (5, 12): too few rows for 3 ranks
def test_sampler_covers_every_instance_once(world_size, n, global_batch):
    if n < 2 * world_size or global_batch < 2 * world_size:
        with pytest.raises(ValueError, match="at least 2 per rank"):
            InstanceBatchSampler(n, global_batch, 0, world_size)
        return
    for epoch in range(2):
        per_rank = []
        for r in range(world_size):
            s = InstanceBatchSampler(n, global_batch, r, world_size, seed=3)
            s.set_position(epoch)
            per_rank.append(list(s))
        steps = {len(b) for b in per_rank}
        assert len(steps) == 1, "every rank must run the same number of steps"
        ids = [i for batches in per_rank for batch in batches for i in batch]
        assert sorted(ids) == list(range(n))
        assert all(len(batch) >= 2 for batches in per_rank for batch in batches)
    if global_batch < 4 * world_size:
        return  # fewer than 4 per rank: the tail rule may depend on the world size
    # the order is world-size independent: the union of step s over ranks is the same set
    one = list(InstanceBatchSampler(n, global_batch, 0, 1, seed=3))
    many = [list(InstanceBatchSampler(n, global_batch, r, world_size, seed=3)) for r in range(world_size)]
    for s, batch in enumerate(one):
        assert sorted(batch) == sorted(i for r in range(world_size) for i in many[r][s])


def test_sampler_resume_mid_epoch_continues_the_same_order():
    full = InstanceBatchSampler(40, 8, 0, 1, seed=1)
    full.set_position(2)
    order = list(full)
    resumed = InstanceBatchSampler(40, 8, 0, 1, seed=1)
    resumed.set_position(2, offset=16)  # two global batches consumed
    assert list(resumed) == order[2:]
    # elastic: 2 ranks resuming what 1 rank started see exactly the remaining instances
    rest = [InstanceBatchSampler(40, 8, r, 2, seed=1) for r in range(2)]
    for s in rest:
        s.set_position(2, offset=16)
    assert sorted(i for s in rest for b in s for i in b) == sorted(i for b in order[2:] for i in b)


def test_step_bounds_tail_joins_previous_batch():
    assert step_bounds(10, 4, 0, min_per_step=4) == [(0, 4), (4, 10)]
    assert step_bounds(12, 4, 0, min_per_step=4) == [(0, 4), (4, 8), (8, 12)]


def test_corrupted_images_are_replaced_and_counted(tmp_path):
    import datasets

    cells = [{"bytes": _png(i * 10), "path": None} for i in range(6)]
    cells[2] = {"bytes": b"not an image", "path": None}
    cells[3] = {"bytes": _png(30)[:40], "path": None}  # truncated
    table = datasets.Dataset.from_dict({"image": cells}, features=datasets.Features({"image": datasets.Image()}))
    table.to_parquet(str(tmp_path / "bad.parquet"))
    loaded = load_dataset(f"parquet:{tmp_path}/bad.parquet")
    ds = InstanceDataset(loaded, SampleCrop(8, train=False))
    batch = collate([ds[i] for i in range(6)])
    assert batch["ids"].tolist() == [0, 1, 4, 4, 4, 5]  # rows 2 and 3 replaced by the next valid row
    assert int(batch["replaced"]) == 2
    assert batch["images"][:, 0, 0, 0].tolist() == [0, 10, 40, 40, 40, 50]  # each id with its own image
    # decoded once into memory: the same replacement, the same crops
    from ifc_ds.crops import crop_resize
    from ifc_ds.data import memory_batches
    from ifc_ds.decoded import decode_into_memory

    decoded = decode_into_memory(loaded, (8, 8))
    assert decoded.source_row.tolist() == [0, 1, 4, 4, 4, 5]
    memory = next(memory_batches(decoded, [list(range(6))], SampleCrop(8, train=False)))
    assert memory["ids"].tolist() == [0, 1, 4, 4, 4, 5] and int(memory["replaced"]) == 2
    assert torch.equal(crop_resize(memory["images"], memory["boxes"], 8), batch["images"])


def _parent_pid(cell, row) -> torch.Tensor:
    """A "crop" that reports which process started the worker that made it."""
    import os

    return torch.tensor(os.getppid())


def test_loader_workers_are_not_forked_from_the_rank(sources):
    """A worker forked from a threaded rank can deadlock before its first line (CPython gh-112275; 3 of 63
    runs of the streaming test here): every loader's workers start from a forkserver."""
    import os

    from ifc_ds.data import make_loader
    from ifc_ds.streaming import StreamEpochs

    table = load_dataset(sources["parquet"])
    map_style = make_loader(InstanceDataset(table, _parent_pid), batch_size=4, num_workers=2)
    stream = StreamEpochs(load_dataset(sources["parquet"] + ":streaming=true"), _parent_pid, 2, 0, 1, 0, 2,
                          torch.device("cpu"))
    parents = {int(p) for batch in map_style for p in batch["images"]}
    parents |= {int(p) for _, _, batch in stream.batches(0, 0) for p in batch["images"]}
    assert parents and os.getpid() not in parents


@pytest.mark.parametrize("name,kwargs", [("resnet18", {}), ("resnet18", {"small_images": True}),
                                         ("convnext_atto", {}), ("vit_tiny_patch16_224", {})])
def test_backbones_give_b_by_d(name, kwargs):
    model = InstanceEncoder(ModelConfig(name=name, dim=24, head_hidden=32, **kwargs), image_size=32)
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 24)
    if kwargs.get("small_images"):
        assert model.backbone.conv1.stride == (1, 1) and isinstance(model.backbone.maxpool, torch.nn.Identity)


def test_mean_std_follow_the_pretrained_tag_and_vits_get_the_image_size():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from ifc_ds.model import create_backbone, data_config

    assert data_config("resnet18d") == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert data_config("resnet18d.ra4_e3600_r224_in1k") == ((0.5,) * 3, (0.5,) * 3)  # the tag's own
    assert data_config("no_such_model") == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    vit = create_backbone(ModelConfig(name="test_vit"), 32)  # a fixed patch grid, built for 32 px
    assert vit(torch.zeros(1, 3, 32, 32)).shape == (1, vit.num_features)


def test_small_images_rejects_non_resnets():
    with pytest.raises(ValueError, match="ResNet"):
        InstanceEncoder(ModelConfig(name="vit_tiny_patch16_224", small_images=True), image_size=32)


def test_cifar10_through_a_path_setting(cifar10_dir):
    loaded = load_dataset(f"parquet:{cifar10_dir}/test.parquet", limit=100)
    assert loaded.num_instances == 100 and loaded.num_classes == 10


def test_augment_preview_png(tmp_path):
    from ifc_ds.augment import main

    out = tmp_path / "views.png"
    main(["--data", "sklearn:digits", "--out", str(out), "--images", "3", "--views", "4"])
    image = Image.open(out)
    assert image.size == (4 * 34 + 2, 3 * 34 + 2)  # 4 views x 3 images of 32x32 with 2-pixel padding
