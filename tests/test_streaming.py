"""Streaming datasets: the instance id is the row's own global row number however the stream is
shuffled, split over ranks and DataLoader workers, replayed over epochs or resumed mid-epoch.

Every image encodes its global row number in its pixels, so a test can check that an id names the
row's own image; the files are many and uneven (and so are their row groups), as real datasets are."""

import io
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from ifc_ds.data import DatasetSpecError, load_dataset
from ifc_ds.streaming import StreamEpochs, StreamShard
from tests._dist import run_ranks

FILE_ROWS = [7, 23, 3, 31, 16]  # 80 rows in 5 files
N = sum(FILE_ROWS)


def _png(row: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.zeros((4, 4, 3), np.uint8)
    pixels[..., 0], pixels[..., 1] = row % 256, row // 256
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def row_of(cell, instance_id) -> torch.Tensor:
    """The row number an image encodes (what the tests stream instead of a crop)."""
    from ifc_ds.crops import decode_image

    pixels = np.asarray(decode_image(cell))
    return torch.tensor(int(pixels[0, 0, 0]) + 256 * int(pixels[0, 0, 1]))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """5 parquet files written as `datasets` writes them (Image feature metadata), with uneven row
    groups (3 or 5 rows, or the whole file)."""
    import datasets

    folder = tmp_path_factory.mktemp("stream")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    row = 0
    for f, n in enumerate(FILE_ROWS):
        table = datasets.Dataset.from_dict({"image": [{"bytes": _png(row + i), "path": None} for i in range(n)],
                                            "label": [(row + i) % 3 for i in range(n)]}, features=features)
        pq.write_table(table.data.table, folder / f"part-{f:02d}.parquet", row_group_size=(3, 5, n)[f % 3])
        row += n
    assert [pq.ParquetFile(p).metadata.num_row_groups for p in sorted(folder.glob("*.parquet"))] == [3, 5, 1, 11, 4]
    return folder


def test_ids_name_their_rows_and_match_the_map_style_loader(files):
    spec = f"parquet:{files}/*.parquet"
    stream = load_dataset(spec + ":streaming=true")
    table = load_dataset(spec)
    assert stream.num_instances == table.num_instances == N and stream.num_classes == 3
    for world in (1, 2, 3):
        seen = []
        for rank in range(world):
            for image, instance, _ in StreamShard(stream.stream, row_of, rank, world, seed=5, shuffle_buffer=8):
                assert int(image) == instance  # the id names the row's own image
                seen.append(instance)
        assert sorted(seen) == list(range(N))
    window = load_dataset(spec + ":streaming=true:start=5:limit=30")
    rows = {i: int(im) for im, i, _ in StreamShard(window.stream, row_of, 0, 1)}
    assert rows == {i: i + 5 for i in range(30)}  # ids count from `start`, as in the map-style table


_LOADED = {}


def _epochs(files, world, rank, workers, seed=1):
    if files not in _LOADED:  # once per process: HF's streaming loader takes about a second
        _LOADED[files] = load_dataset(f"parquet:{files}/*.parquet:streaming=true")
    return StreamEpochs(_LOADED[files], row_of, 4 * world, rank, world, seed, workers, torch.device("cpu"))


def _run(epochs, epoch, offset=0, steps=None):
    """[(ids, rows)] of this rank's batches."""
    out = []
    for _, _, batch in epochs.batches(epoch, offset):
        out.append((batch["ids"].tolist(), batch["images"].tolist()))
        if steps is not None and len(out) == steps:
            break
    return out


def _gather(obj, world):
    parts = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def _epochs_and_resume(rank, world, files, out):
    results = {}
    for workers in (0, 2):
        epochs = _epochs(files, world, rank, workers)
        per_epoch = []
        for epoch in range(2):
            before = epochs.unreached
            mine = _run(epochs, epoch)
            per_epoch.append((_gather(mine, world), epochs.unreached - before))
        # interrupted after 2 steps of epoch 0, checkpointed, resumed in fresh objects
        first = _epochs(files, world, rank, workers)
        head = _run(first, 0, steps=2)
        state = first.state_dict()  # a collective, as in the trainer's checkpoint
        resumed = _epochs(files, world, rank, workers)
        resumed.load_state_dict(pickle.loads(pickle.dumps(state)))
        before = resumed.unreached
        tail = _run(resumed, 0, offset=2 * 4 * world)
        results[workers] = {"epochs": per_epoch, "head": _gather(head, world), "tail": _gather(tail, world),
                            "tail_unreached": resumed.unreached - before}
    if rank == 0:
        torch.save(results, out)


def _check_epoch(rank_batches, unreached):
    ids = [i for batches in rank_batches for batch_ids, rows in batches for i in batch_ids]
    rows = [r for batches in rank_batches for _, batch_rows in batches for r in batch_rows]
    assert ids == rows, "an id named another row's image"
    assert len(ids) == len(set(ids)), "an id came twice in one epoch"
    assert len(ids) + unreached == N, (len(ids), unreached)  # every row seen once, or counted as unreached
    assert len({len(batches) for batches in rank_batches}) == 1, "ranks ran different numbers of steps"
    return ids


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_id_once_per_epoch_over_ranks_workers_epochs_and_resume(files, tmp_path, world):
    run_ranks(_epochs_and_resume, world, files, tmp_path / "out.pt")
    results = torch.load(tmp_path / "out.pt", weights_only=False)
    for workers, res in results.items():
        orders = [_check_epoch(batches, unreached) for batches, unreached in res["epochs"]]
        assert orders[0] != orders[1], "epochs must be reshuffled"
        # the interrupted epoch: the rows before the checkpoint and after the resume, each once
        joined = [head + tail for head, tail in zip(res["head"], res["tail"])]
        _check_epoch(joined, res["tail_unreached"])
        if workers == 0:  # without workers the resumed epoch is the uninterrupted one, batch for batch
            assert joined == res["epochs"][0][0]


def _save_mid_epoch(rank, world, files, out):
    epochs = _epochs(files, world, rank, 2)
    head = _run(epochs, 0, steps=3)
    state = epochs.state_dict()
    parts = _gather(head, world)
    if rank == 0:
        torch.save({"state": state, "head": parts}, out)


def _resume_elsewhere(rank, world, files, saved, out):
    epochs = _epochs(files, world, rank, 0)
    epochs.load_state_dict(torch.load(saved, weights_only=False)["state"])
    before = epochs.unreached
    parts = _gather(_run(epochs, 0, offset=3 * 8), world)
    if rank == 0:
        torch.save({"tail": parts, "unreached": epochs.unreached - before}, out)


def test_resume_mid_epoch_on_another_number_of_ranks_and_workers(files, tmp_path):
    run_ranks(_save_mid_epoch, 2, files, tmp_path / "a.pt")  # 2 ranks x 2 workers, 3 steps of 8
    run_ranks(_resume_elsewhere, 3, files, tmp_path / "a.pt", tmp_path / "b.pt")  # 3 ranks, no workers
    head = torch.load(tmp_path / "a.pt", weights_only=False)["head"]
    tail = torch.load(tmp_path / "b.pt", weights_only=False)
    ids = [i for batches in head + tail["tail"] for batch_ids, _ in batches for i in batch_ids]
    rows = [r for batches in head + tail["tail"] for _, batch_rows in batches for r in batch_rows]
    assert ids == rows and len(ids) == len(set(ids)) and len(ids) + tail["unreached"] == N


def test_streaming_formats(files, tmp_path):
    import datasets

    table = load_dataset(f"parquet:{files}/*.parquet").table.cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "disk"), num_shards=3)
    for spec in (f"disk:{tmp_path}/disk", f"arrow:{tmp_path}/disk/*.arrow"):
        loaded = load_dataset(spec + ":streaming=true")
        rows = {i: int(im) for rank in range(2) for im, i, _ in StreamShard(loaded.stream, row_of, rank, 2, seed=3)}
        assert rows == {i: i for i in range(N)}, spec
    folder = tmp_path / "folder" / "a"
    folder.mkdir(parents=True)
    (folder / "x.png").write_bytes(_png(0))
    with pytest.raises(DatasetSpecError, match="not supported for imagefolder"):  # (not the hub's error)
        load_dataset(f"imagefolder:{tmp_path}/folder:streaming=true")
    with pytest.raises(DatasetSpecError, match="num_instances=81"):
        load_dataset(f"parquet:{files}/*.parquet:streaming=true", num_instances=81)


def test_undecodable_rows_are_skipped_and_flagged(tmp_path):
    cells = [{"bytes": _png(i), "path": None} for i in range(6)]
    cells[2] = {"bytes": b"not an image", "path": None}
    pq.write_table(pa.table({"image": cells}), tmp_path / "bad.parquet", row_group_size=4)
    loaded = load_dataset(f"parquet:{tmp_path}/bad.parquet:streaming=true:image_column=image")
    out = [(int(im), i, flag) for im, i, flag in StreamShard(loaded.stream, row_of, 0, 1, shuffle=False)]
    assert out == [(0, 0, False), (1, 1, False), (3, 3, True), (4, 4, False), (5, 5, False)]
