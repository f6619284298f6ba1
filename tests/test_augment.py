"""The data path: keyed per-sample parameters, batched photometric ops against torchvision's functional
ops, crop boxes against torchvision's RandomResizedCrop, and in-memory crops against decoding on the fly."""

import io
import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from ifc_ds.augment import (
    DeviceViews,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    grayscale,
    photometric,
    sample_params,
)
from ifc_ds.config import AugmentConfig
from ifc_ds.crops import SampleCrop, center_boxes, crop_resize, random_resized_boxes
from ifc_ds.keyed_random import CROP, keyed_uniform


def _images(batch=4, size=24, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("op,tv_op,factors", [
    (adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4, 0.9]),
    (adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4, 0.0]),
    (adjust_saturation, TF.adjust_saturation, [0.6, 1.0, 1.4, 0.0]),
    (adjust_hue, TF.adjust_hue, [-0.1, 0.0, 0.05, 0.5]),
])
def test_jitter_ops_match_torchvision_per_sample(op, tv_op, factors):
    x = _images()
    mine = op(x.clone(), torch.tensor(factors))
    for i, f in enumerate(factors):  # float images: torchvision does the same arithmetic
        torch.testing.assert_close(mine[i], tv_op(x[i], f), atol=1e-5, rtol=0)
    # uint8 images (what the trainer crops): torchvision rounds after the op (and floors the grayscale
    # mean of contrast); rounded to uint8, ours is within one level
    u8 = (x * 255).round().to(torch.uint8)
    mine = (op(u8.float() / 255, torch.tensor(factors)) * 255).round()
    for i, f in enumerate(factors):
        assert (mine[i] - tv_op(u8[i], f).float()).abs().max() <= 1


def _color_cube(levels=(0, 1, 37, 128, 200, 254, 255)):
    """Every colour of a coarse RGB grid, as float [1, 3, 1, n]: grays, black, white, ties of the
    maximum or minimum (r = g > b, ...), where the hue's branches meet."""
    grid = torch.tensor(list(itertools.product(levels, repeat=3)), dtype=torch.float32).T / 255
    return grid.reshape(1, 3, 1, -1)


@pytest.mark.parametrize("factor", [-0.5, -0.3, -1e-3, 0.0, 1e-3, 0.25, 0.5])
def test_hue_matches_torchvision_where_its_branches_meet(factor):
    cube = _color_cube()
    mine = adjust_hue(cube, torch.tensor([factor]))
    torch.testing.assert_close(mine, TF.adjust_hue(cube, factor), atol=1e-6, rtol=0)
    gray = (cube[0, 0] == cube[0, 1]) & (cube[0, 1] == cube[0, 2])
    assert torch.equal(mine[0][:, gray], cube[0][:, gray])  # grays and black keep their value exactly


def test_photometric_matches_torchvision_sample_by_sample():
    """The batched pipeline against each sample's own torchvision chain: flip, the four jitter ops in
    that sample's order, grayscale, blur; with every op on, and with some jitter ops off."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for cfg in (AugmentConfig(hflip_p=0.5, jitter_p=0.9, grayscale_p=0.3, blur_p=0.5),
                AugmentConfig(hflip_p=0.5, jitter_p=1.0, brightness=0.0, saturation=0.0, grayscale_p=0.0)):
        x = _images(batch=48, size=20, seed=3)
        params = sample_params(cfg, 5, 1, range(48))
        out = photometric(x.clone(), params, cfg)
        ranges = [cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue]
        for i in range(48):
            expected = TF.horizontal_flip(x[i]) if params.flip[i] else x[i]
            if params.jitter[i]:
                for op in params.order[i].tolist():
                    if ranges[op] > 0:
                        expected = ops[op](expected, params.factors[i, op].item())
            if params.gray[i]:
                expected = TF.rgb_to_grayscale(expected, num_output_channels=3)
            if params.blur[i]:
                sigma = params.sigma[i].item()
                expected = TF.gaussian_blur(expected, [3, 3], [sigma, sigma])
            torch.testing.assert_close(out[i], expected, atol=2e-5, rtol=0)


def test_grayscale_flip_and_blur_match_torchvision():
    x = _images(size=40)
    torch.testing.assert_close(grayscale(x).expand(-1, 3, -1, -1), TF.rgb_to_grayscale(x, num_output_channels=3),
                               atol=1e-6, rtol=0)
    sigmas = torch.tensor([0.1, 0.7, 1.3, 2.0])
    for kernel in (3, 9, 23):
        mine = gaussian_blur(x, sigmas, kernel)
        for i, s in enumerate(sigmas.tolist()):
            torch.testing.assert_close(mine[i], TF.gaussian_blur(x[i], [kernel, kernel], [s, s]), atol=1e-5, rtol=0)
    cfg = AugmentConfig(hflip_p=1.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    flipped = photometric(x.clone(), sample_params(cfg, 0, 0, range(4)), cfg)
    assert torch.equal(flipped, TF.horizontal_flip(x))


@pytest.mark.parametrize("off", ["hflip_p", "jitter_p", "grayscale_p", "blur_p", "all"])
def test_probability_zero_is_the_identity(off):
    probabilities = {"hflip_p": 1.0, "jitter_p": 1.0, "grayscale_p": 1.0, "blur_p": 1.0}
    for key in probabilities if off == "all" else [off]:
        probabilities[key] = 0.0
    cfg = AugmentConfig(**probabilities)
    x = _images(batch=16)
    out = photometric(x.clone(), sample_params(cfg, 0, 0, range(16)), cfg)
    if off == "all":
        assert torch.equal(out, x)
        return
    # with that op off, the result equals applying the others alone: compare with the op forced off
    # by hand (its samples skip it bitwise, e.g. no HSV round trip for hue)
    params = sample_params(cfg, 0, 0, range(16))
    assert not {"hflip_p": params.flip, "jitter_p": params.jitter, "grayscale_p": params.gray,
                "blur_p": params.blur}[off].any()


def test_an_op_skips_the_samples_it_does_not_apply_to():
    cfg = AugmentConfig(hflip_p=0.0, jitter_p=0.5, grayscale_p=0.0, blur_p=0.0)
    x = _images(batch=64)
    params = sample_params(cfg, 1, 2, range(64))
    out = photometric(x.clone(), params, cfg)
    untouched = ~params.jitter
    assert untouched.any() and params.jitter.any()
    assert torch.equal(out[untouched], x[untouched])
    assert not torch.equal(out[params.jitter], x[params.jitter])


def test_parameters_follow_the_ranges_and_are_independent_across_the_batch():
    cfg = AugmentConfig(hflip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.3, saturation=0.2, hue=0.1,
                        grayscale_p=0.2, blur_p=0.5, blur_sigma_min=0.1, blur_sigma_max=2.0)
    n = 40_000
    p = sample_params(cfg, seed=3, epoch=1, ids=np.arange(n))
    for flags, rate in ((p.flip, 0.5), (p.jitter, 0.8), (p.gray, 0.2), (p.blur, 0.5)):
        assert abs(flags.float().mean().item() - rate) < 0.01
    lows, highs = [0.6, 0.7, 0.8, -0.1], [1.4, 1.3, 1.2, 0.1]
    for j, (lo, hi) in enumerate(zip(lows, highs)):
        f = p.factors[:, j]
        assert f.min() >= lo - 1e-6 and f.max() <= hi + 1e-6
        assert abs(f.mean().item() - (lo + hi) / 2) < 0.01 * (hi - lo) and f.min() < lo + 0.01 and f.max() > hi - 0.01
        assert abs(f.std().item() - (hi - lo) / 12 ** 0.5) < 0.02 * (hi - lo)  # uniform
    assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for row in p.order.tolist():
        counts[tuple(row)] += 1
    assert all(abs(c / n - 1 / 24) < 0.01 for c in counts.values())  # every order equally likely
    # independence: neighbouring ids, and different kinds of choice for one id, are uncorrelated
    series = torch.stack([p.factors[:, 0], p.factors[:, 3], p.sigma, p.flip.float(), p.gray.float()])
    pairs = [(series[0, :-1], series[0, 1:]), (series[0], series[1]), (series[2], series[3]), (series[3], series[4])]
    for a, b in pairs:
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.03
    # a sample's parameters depend on (seed, epoch, id) only: not on its batch, and not equal across epochs
    alone = sample_params(cfg, 3, 1, [12345])
    assert alone.factors[0].tolist() == p.factors[12345].tolist() and alone.order[0].tolist() == p.order[12345].tolist()
    other_epoch = sample_params(cfg, 3, 2, np.arange(n))
    assert (other_epoch.factors != p.factors).any(dim=1).float().mean() > 0.99


def test_keyed_uniform_is_uniform_and_keyed():
    u = keyed_uniform(0, 0, np.arange(100_000), CROP, 4)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 0.09 * u.size
    assert np.array_equal(keyed_uniform(0, 0, [5, 7], CROP, 4)[1], u[7])
    assert not np.array_equal(keyed_uniform(1, 0, [7], CROP, 4)[0], u[7])


def test_random_resized_boxes_follow_torchvision():
    from torchvision.transforms import v2

    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    n, height, width = 20_000, 40, 60
    boxes = random_resized_boxes(keyed_uniform(0, 0, np.arange(n), CROP, 40), [height] * n, [width] * n, scale, ratio)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert np.array_equal(boxes, np.round(boxes))  # integer pixel boxes, as torchvision's
    torch.manual_seed(0)
    reference = np.array([v2.RandomResizedCrop.get_params(torch.zeros(3, height, width), scale, ratio)
                          for _ in range(n)], dtype=np.float64)  # (top, left, h, w)
    for mine, theirs in ((h * w / (height * width), reference[:, 2] * reference[:, 3] / (height * width)),
                         (w / h, reference[:, 3] / reference[:, 2]), (boxes[:, 0], reference[:, 1]),
                         (boxes[:, 1], reference[:, 0])):
        assert abs(mine.mean() - theirs.mean()) < 0.02 * theirs.mean() + 0.05
        assert abs(mine.std() - theirs.std()) < 0.05 * theirs.std() + 0.05
    # an image no attempt fits: torchvision's centre-crop fallback, exactly
    tall = random_resized_boxes(keyed_uniform(0, 0, [0], CROP, 40), [300], [4], (0.9, 1.0), ratio)[0]
    top, left, hh, ww = v2.RandomResizedCrop.get_params(torch.zeros(3, 300, 4), (0.9, 1.0), ratio)
    assert tall.tolist() == [left, top, left + ww, top + hh]


def test_crop_resize_matches_crop_then_antialiased_resize():
    """On natural (smooth) content, roi_align's crop-and-resize agrees with torchvision's crop followed
    by an antialiased bilinear resize to within 2 levels on average (the filters differ: roi_align
    averages ceil(scale) bilinear samples per pixel, a box filter on downscales); a box of the output's
    size is a plain crop, bitwise."""
    small = torch.rand(2, 3, 6, 8, generator=torch.Generator().manual_seed(0))
    x = (torch.nn.functional.interpolate(small, size=(40, 60), mode="bicubic", align_corners=False)
         .clamp(0, 1) * 255).round().to(torch.uint8)
    for (x0, y0, x1, y1), size in (((0, 0, 60, 40), 20), ((5, 2, 45, 34), 16), ((10, 4, 22, 16), 24)):
        mine = crop_resize(x, torch.tensor([[x0, y0, x1, y1]] * 2, dtype=torch.float32), size).float()
        reference = TF.resize(x[:, :, y0:y1, x0:x1], [size, size], antialias=True).float()
        diff = (mine - reference).abs()
        assert diff.mean() < 2.0 and diff.max() <= 16, ((x0, y0, x1, y1), diff.mean(), diff.max())
    exact = crop_resize(x, torch.tensor([[4.0, 3.0, 20.0, 19.0]] * 2), 16)
    assert torch.equal(exact, x[:, :, 3:19, 4:20])


def _png(array) -> dict:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def test_in_memory_crops_equal_decoding_on_the_fly():
    from ifc_ds.data import load_dataset
    from ifc_ds.decoded import decide, decode_into_memory

    loaded = load_dataset("sklearn:digits", limit=96)
    size = decide(loaded, "auto", memory_gb=1.0)
    assert size == (32, 32)
    decoded = decode_into_memory(loaded, size)
    ids = np.arange(96)
    for crop in (SampleCrop(24, train=True, seed=5, epoch=0), SampleCrop(24, train=True, seed=5, epoch=3),
                 SampleCrop(32, train=False)):
        fly = torch.stack([crop(loaded.table[int(i)]["image"], int(i)) for i in ids])
        boxes = torch.from_numpy(crop.boxes(ids, [32] * 96, [32] * 96))
        batched = crop_resize(decoded.images[torch.from_numpy(ids)], boxes, crop.size)
        assert fly.dtype == torch.uint8 and torch.equal(fly, batched)


def test_jpeg_draft_decodes_less_and_stays_close():
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (24, 32, 3)), np.ones((16, 16, 1))).astype(np.uint8)  # 384x512
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="JPEG", quality=95)
    cell = {"bytes": buf.getvalue(), "path": None}
    full, drafted = SampleCrop(32, train=False, draft=False)(cell, 0), SampleCrop(32, train=False)(cell, 0)
    assert drafted.shape == full.shape == (3, 32, 32)
    assert (drafted.float() - full.float()).abs().mean() < 4


def test_device_views_are_normalised_channels_last_and_independent_of_the_batch():
    cfg = AugmentConfig()
    views = DeviceViews(cfg, 16, (0.5,) * 3, (0.25,) * 3, seed=1)
    images = (torch.rand(8, 3, 16, 16) * 255).to(torch.uint8)
    ids = torch.arange(100, 108)
    out = views.train(images, ids, epoch=2)
    assert out.shape == (8, 3, 16, 16) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    perm = torch.randperm(8)
    torch.testing.assert_close(views.train(images[perm], ids[perm], epoch=2), out[perm], atol=0, rtol=0)
    assert not torch.equal(views.train(images, ids, epoch=3), out)
    plain = views.eval(images)
    torch.testing.assert_close(plain, (images.float() / 255 - 0.5) / 0.25)
    boxes = torch.from_numpy(center_boxes([16] * 8, [16] * 8, 1.0))
    torch.testing.assert_close(views.eval(images, boxes), plain)


def test_jpegs_left_for_the_device_decode_to_the_same_crops():
    """data.decode_on_device: the workers read only the JPEG header and pass the bytes on; the batch is
    decoded by torchvision.io.decode_jpeg (nvJPEG on CUDA; libjpeg-turbo here) and cropped there. A PNG in
    the same batch is still decoded by the worker."""
    from ifc_ds.crops import batch_crops
    from ifc_ds.data import collate

    rng = np.random.default_rng(1)
    smooth = [np.kron(rng.integers(0, 255, (6, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8) for _ in range(3)]
    cells = []
    for i, pixels in enumerate(smooth):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG" if i == 1 else "JPEG", quality=95)
        cells.append({"bytes": buf.getvalue(), "path": None})
    on_cpu = SampleCrop(24, train=True, seed=2, draft=False)
    raw = SampleCrop(24, train=True, seed=2, draft=False, raw_jpeg=True)
    batch = collate([(raw(c, i), i, False) for i, c in enumerate(cells)])
    assert batch["jpeg"]["index"].tolist() == [0, 2]
    device = batch_crops(batch, 24, torch.device("cpu"))
    reference = torch.stack([on_cpu(c, i) for i, c in enumerate(cells)])
    assert torch.equal(device[1], reference[1])  # the PNG: decoded by the worker, as before
    assert (device.float() - reference.float()).abs().mean() < 1.5  # two JPEG decoders, same crops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_views_on_cuda_match_the_cpu():
    """The same batch, ids and epoch give the same views on the GPU as on the CPU (float rounding
    aside), whole-image crops included: the trainer's device half runs where the engine is."""
    cfg = AugmentConfig(blur_p=0.5)
    images = (torch.rand(32, 3, 40, 48) * 255).to(torch.uint8)
    ids = torch.arange(32)
    boxes = torch.from_numpy(SampleCrop(32, seed=3).boxes(ids.numpy(), [40] * 32, [48] * 32)).float()
    cpu = DeviceViews(cfg, 32, (0.5,) * 3, (0.25,) * 3, seed=3)
    gpu = DeviceViews(cfg, 32, (0.5,) * 3, (0.25,) * 3, seed=3, dtype=torch.bfloat16)
    reference = cpu.train(crop_resize(images, boxes, 32), ids, 1)
    out = gpu.train(crop_resize(images.cuda(), boxes.cuda(), 32), ids, 1)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.float().cpu() - reference).abs().mean() < 0.02  # bf16 rounding of values ~1


def test_decoding_into_memory_with_workers_and_on_two_ranks(tmp_path):
    """DataLoader workers write into the shared mapping directly; two ranks each decode half into one
    /dev/shm file: both give the single-process tensor, and no file is left behind."""
    import glob

    from ifc_ds.data import load_dataset
    from ifc_ds.decoded import decode_into_memory
    from tests._dist import run_ranks

    loaded = load_dataset("sklearn:digits", limit=200)
    alone = decode_into_memory(loaded, (32, 32))
    with_workers = decode_into_memory(loaded, (32, 32), num_workers=2)
    assert torch.equal(alone.images, with_workers.images) and alone.images.sum() > 0
    before = set(glob.glob("/dev/shm/ifc_ds-*"))
    torch.save(alone.images, tmp_path / "alone.pt")
    run_ranks(_decode_on_ranks, 2, str(tmp_path))
    assert set(glob.glob("/dev/shm/ifc_ds-*")) <= before


def _decode_on_ranks(rank, world_size, tmp):
    from ifc_ds.data import load_dataset
    from ifc_ds.decoded import decode_into_memory

    decoded = decode_into_memory(load_dataset("sklearn:digits", limit=200), (32, 32))
    assert torch.equal(decoded.images, torch.load(f"{tmp}/alone.pt"))
