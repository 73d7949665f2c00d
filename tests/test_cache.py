"""--cache: val equals the DALI pipeline's exactly, train crops are the plan's boxes (known answer on
coordinate-encoded images) as sharp as DALI's, a batch is a fixed number of tensor operations, big images are
capped."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data_utils
from conftest import CountOps
from kit.data import cache_loader, sampling, splits

CPU = torch.device("cpu")
MEAN = torch.tensor(splits.IMAGENET_MEAN).view(1, 3, 1, 1) * 255
STD = torch.tensor(splits.IMAGENET_STD).view(1, 3, 1, 1) * 255


def epoch_of(loader):
    images, labels = zip(*list(loader))
    return torch.cat(images), torch.cat(labels)


def loaders(root, files, labels, train, img_size, batch_size, seed=0, per_image=None, crop_scale=(0.08, 1.0)):
    """(DALI loader, cache) over one plan; per_image=False: the cache's fixed-ops batch path (the GPU's) on the CPU,
    True or None (on this CPU): its crops one by one."""
    sizes = splits.image_sizes(root, files) if train else None
    data = sampling.DataSettings(img_size=img_size, seed=seed, crop_scale_min=crop_scale[0], cache=True,
                                 loader="dali", workers=1)
    plan = sampling.SamplePlan(len(files), batch_size, train, data, sizes=sizes)
    return (data_utils.dali_loader.DaliLoader(root, files, labels, plan, CPU, data),
            cache_loader.CacheLoader(root, files, labels, plan, CPU, data, per_image=per_image))


BOTH_PATHS = pytest.mark.parametrize("per_image", [True, False], ids=["one_by_one", "fixed_ops"])


@pytest.mark.parametrize("split", ["val", "train"])
def test_cache_val_is_the_dali_val_exactly(prepared_root, split):
    # The cache stores DALI's own val crops: the tensors differ only by the order of float operations of the
    # normalisation (observed max 2.4e-7: two float32 steps at |x| ~ 2; one grey level is 0.017). The train split
    # goes through the val transform too, for more image shapes.
    files, labels = splits.read_split(prepared_root, split)
    root = splits.image_root(prepared_root)
    dali, cache = loaders(root, files, labels, False, 40, 4)
    (dali_images, dali_labels), (cache_images, cache_labels) = epoch_of(dali), epoch_of(cache)
    assert torch.equal(dali_labels, cache_labels)
    assert (dali_images - cache_images).abs().max() < 5e-7


def test_cache_without_dali_matches_the_torch_val(prepared_root):
    files, labels = splits.read_split(prepared_root, "val")
    root = splits.image_root(prepared_root)
    plan = sampling.SamplePlan(len(files), 4, False)
    data = sampling.DataSettings(img_size=40, loader="torch", workers=0)
    torch_images, torch_labels = epoch_of(data_utils.TorchLoader(root, files, labels, plan, CPU, data))
    cache = cache_loader.CacheLoader(root, files, labels, plan, CPU, sampling.DataSettings(img_size=40, loader="torch",
                                                                                          workers=1))
    cache_images, cache_labels = epoch_of(cache)
    assert torch.equal(torch_labels, cache_labels)
    assert (torch_images - cache_images).abs().max() < 5e-7  # the same PIL pixels, the same normalisation


def coordinate_image(width, height):
    """R encodes x and G encodes y, one grey level per pixel: a crop's pixels say where it came from."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([xs, ys, np.full_like(xs, 128)], -1).astype(np.uint8))


@pytest.fixture(scope="module")
def coordinate_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("coords")
    shapes = [(200, 150), (150, 200), (240, 100), (180, 180)]  # (w, h), all < 256 so a pixel value is a coordinate
    files = []
    for i in range(24):
        name = f"img_{i:03d}.png"
        coordinate_image(*shapes[i % 4]).save(root / name)
        files.append(name)
    return str(root), files


@BOTH_PATHS
def test_cache_crops_are_the_plans_boxes(coordinate_tree, per_image):
    """Known answer: the second and next-to-last output columns sit at their pixel centres in the box
    (x + 1.5 * w/S - 0.5 and x + w - 0.5 - 1.5 * w/S after resizing), mirrored where the plan flips."""
    root, files = coordinate_tree
    size = 48
    dali, cache = loaders(root, files, list(range(len(files))), True, size, 8, seed=4, crop_scale=(0.3, 1.0),
                          per_image=per_image)
    steps = list(cache.plan.epoch(0))
    for loader in (cache, dali):
        images, _ = epoch_of(loader)
        pixels = images * STD + MEAN
        box = {k: np.concatenate([s[k] for s in steps]) for k in ("x", "y", "w", "h", "flip")}
        scale_x, scale_y = box["w"] / size, box["h"] / size
        # The columns next to the edges: their filter windows lie inside the box (at an edge itself PIL's filter,
        # which the one-by-one path and the torch loader share, renormalises a cut window where DALI clamps).
        second_x = np.maximum(box["x"] + 1.5 * scale_x - 0.5, box["x"])
        next_to_last_x = np.minimum(box["x"] + box["w"] - 0.5 - 1.5 * scale_x, box["x"] + box["w"] - 1)
        left, right = pixels[:, 0, :, 1].mean(1).numpy(), pixels[:, 0, :, -2].mean(1).numpy()
        expect_left = np.where(box["flip"], next_to_last_x, second_x)
        expect_right = np.where(box["flip"], second_x, next_to_last_x)
        # Within 1.1 grey levels: antialiasing averages neighbours of a linear ramp (no shift) and DALI/the cache
        # round to uint8 at different points; a box off by one pixel, or a missed flip, fails.
        assert np.abs(left - expect_left).max() < 1.1, loader.kind
        assert np.abs(right - expect_right).max() < 1.1, loader.kind
        top = pixels[:, 1, 1, :].mean(1).numpy()
        second_y = np.maximum(box["y"] + 1.5 * scale_y - 0.5, box["y"])
        assert np.abs(top - second_y).max() < 1.1, loader.kind


def test_crops_sample_the_pyramid_level_they_shrink_least_from(coordinate_tree, monkeypatch):
    """Crops that shrink up to 5x (240 px sides to 48) sample a level they shrink 1-2x from: at most 3 x 3 samples
    per output pixel and windows under twice the output size; the originals alone need 4 x 4 and whole images."""
    root, files = coordinate_tree
    seen = []
    real = torch.nn.functional.grid_sample

    def spy(patches, grid, **kwargs):
        seen.append((patches.shape[2:], grid.shape[2] // 48))  # (window rows, cols), samples per pixel and axis
        return real(patches, grid, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grid_sample", spy)
    for max_levels in (None, 1):
        data = sampling.DataSettings(img_size=48, seed=4, crop_scale_min=0.3, cache=True, loader="dali", workers=1)
        plan = sampling.SamplePlan(len(files), 8, True, data, sizes=splits.image_sizes(root, files))
        cache = cache_loader.CacheLoader(root, files, list(range(len(files))), plan, CPU, data,
                                         max_levels=max_levels, per_image=False)
        seen.clear()
        epoch_of(cache)
        windows, samples = max(max(w) for w, _ in seen), max(k for _, k in seen)
        if max_levels is None:
            assert cache.level_heights.shape[0] == 3 and samples <= 3 and windows < 2 * 48 + 2
        else:
            assert cache.level_heights.shape[0] == 1 and samples == 4 and windows > 2 * 48 + 2


def sharpness(images):
    """Mean absolute difference of neighbouring pixels (normalised units)."""
    return ((images[..., 1:, :] - images[..., :-1, :]).abs().mean()
            + (images[..., :, 1:] - images[..., :, :-1]).abs().mean()).item() / 2


@BOTH_PATHS
def test_cache_train_crops_are_as_sharp_as_dali(prepared_root, per_image):
    """The cache keeps originals and antialiases like DALI's resize. Observed on this data: sharpness within 1%,
    per-image mean difference 0.012; on the real split at 96 and 224 px: 0.1862 vs 0.1844 and 0.1206 vs 0.1203
    (the old cache, cropping from val-resized images, was 15-20% blurrier)."""
    files, labels = splits.read_split(prepared_root, "train")
    root = splits.image_root(prepared_root)
    for size, scale in ((32, (0.35, 1.0)), (96, (0.08, 1.0))):
        dali, cache = loaders(root, files, labels, True, size, 6, seed=1, crop_scale=scale, per_image=per_image)
        a, b = epoch_of(dali)[0], epoch_of(cache)[0]
        assert abs(sharpness(a) - sharpness(b)) / sharpness(a) < 0.03, size
        assert (a - b).abs().mean() < 0.03, size


@pytest.mark.parametrize("train", [True, False])
def test_a_batch_is_a_fixed_number_of_tensor_operations(prepared_root, train):
    """The GPU path's promise, counted on the CPU: the aten operations one batch dispatches do not depend on how
    many images it holds (the old per-image loop dispatched about 11 per image)."""
    files, labels = splits.read_split(prepared_root, "train")
    root = splits.image_root(prepared_root)
    counts = []
    for batch in (2, 8):
        _, cache = loaders(root, files, labels, train, 32, batch, crop_scale=(0.08, 1.0), per_image=False)
        step = next(cache.plan.epoch(0))
        with CountOps() as mode:
            images, _ = cache.train_batch(step, cache.img_size) if train else cache.val_batch(step["index"])
        assert images.shape[0] == batch
        counts.append(mode.ops)
    assert counts[0] == counts[1]
    assert len(counts[0]) < 40


def test_big_images_are_capped_and_memory_is_bounded(tmp_path):
    big = np.random.default_rng(0).integers(0, 255, (900, 1200, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    coordinate_image(100, 80).save(tmp_path / "small.png")
    files = ["big.jpg", "small.png"]
    cap = cache_loader.train_cap(64, 0.35)  # smallest crop (area 0.35, aspect 3/4) keeps >= 64 px on its short side
    assert cap == 125
    _, cache = loaders(str(tmp_path), files, [0, 1], True, 64, 2, crop_scale=(0.35, 1.0), per_image=False)
    assert (int(cache.heights[0]), int(cache.widths[0])) == (cap, round(1200 * cap / 900))
    assert (int(cache.heights[1]), int(cache.widths[1])) == (80, 100)  # small images stay as they are
    # The pyramid: the largest crop side (167 px) shrinks 2.6x to 64 px, so one level more, half the size
    # (rounded up): 63 x 84 and 40 x 50. At most a third more memory than the originals, plus the row padding.
    assert cache.level_heights.tolist() == [[cap, 80], [63, 40]] and cache.level_widths.tolist() == [[167, 100],
                                                                                                   [84, 50]]
    originals = (cap * 167 + 80 * 100) * 3
    assert cache.nbytes == originals + (63 * 84 + 40 * 50) * 3 + 3 * 167 <= originals * 4 / 3 + 3 * 167
    images, _ = next(iter(cache))
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    # On a CPU the crops are cut one by one: no pyramid, images capped at twice the cap (250 x 333 here), padding.
    _, cache = loaders(str(tmp_path), files, [0, 1], True, 64, 2, crop_scale=(0.35, 1.0))
    assert cache.per_image and cache.level_heights.tolist() == [[250, 80]]
    assert cache.level_widths.tolist() == [[333, 100]]
    assert cache.nbytes == (250 * 333 + 80 * 100) * 3 + 3 * 333
    assert next(iter(cache))[0].shape == (2, 3, 64, 64)


@pytest.mark.slow
@BOTH_PATHS
def test_real_cache_memory_and_agreement(real_root, per_image):
    """The real train split at 96 px (cpu_smoke's settings): cached sizes and the crops' agreement with DALI."""
    files, labels = splits.read_split(real_root, "train")
    root = splits.image_root(real_root)
    dali, cache = loaders(root, files[:256], labels[:256], True, 96, 64, seed=2, crop_scale=(0.35, 1.0),
                          per_image=per_image)
    if per_image:  # capped at twice 187 px: the originals at most, plus the row padding
        heights, widths = splits.image_sizes(root, files[:256])
        assert cache.nbytes <= int((heights * widths * 3).sum()) + 3 * int(widths.max())
    else:
        assert cache.nbytes < 256 * 190 * 260 * 3 * 4 / 3  # shorter sides capped at 187 px, plus the pyramid
    a, b = epoch_of(dali)[0], epoch_of(cache)[0]
    assert abs(sharpness(a) - sharpness(b)) / sharpness(a) < 0.03
    assert (a - b).abs().mean() < 0.03
    assert os.path.isdir(root)
