"""--cache: the decoded-image cache matches the DALI pipeline (val exactly, train crops in distribution),
covers every image once per epoch and resumes at any batch exactly."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data_utils

CPU = torch.device("cpu")
MEAN = torch.tensor(data_utils.IMAGENET_MEAN).view(1, 3, 1, 1) * 255
STD = torch.tensor(data_utils.IMAGENET_STD).view(1, 3, 1, 1) * 255


def epoch_of(loader):
    images, labels = zip(*list(loader))
    return torch.cat(images), torch.cat(labels)


def split_loaders(prepared_root, split, **kw):
    files, labels = data_utils.read_split(prepared_root, split)
    image_root = os.path.join(prepared_root, data_utils.IMAGES_DIR)
    args = dict(image_root=image_root, files=files, labels=labels, train=split == "train", device=CPU,
                dtype=torch.float32, workers=1, seed=3)
    args.update(kw)
    return args


@pytest.mark.parametrize("drop_last", [False, True])
def test_cache_epoch_has_every_image_once(prepared_root, drop_last):
    files, labels = data_utils.read_split(prepared_root, "train")
    loader = data_utils.build_loader(prepared_root, "train", img_size=32, batch_size=5, device=CPU, workers=1,
                                     cache=True, drop_last=drop_last, dtype=torch.bfloat16)
    images, got = epoch_of(loader)
    assert images.dtype == torch.bfloat16 and images.is_contiguous(memory_format=torch.channels_last)
    assert len(loader) == (len(files) // 5 if drop_last else -(-len(files) // 5))
    if drop_last:
        assert len(got) == len(files) // 5 * 5
    else:
        assert sorted(got.tolist()) == sorted(labels)
    second = epoch_of(loader)[1]
    assert second.tolist() != got.tolist() or len(set(labels)) == 1  # reshuffled every epoch


@pytest.mark.parametrize("split", ["val", "train"])
def test_cache_val_is_the_dali_val_exactly(prepared_root, split):
    # Same decode and shorter-side resize, then the same centre crop: the tensors agree to float rounding.
    # (The train split is used too, through the val transform, for more image shapes.)
    args = split_loaders(prepared_root, split, train=False, img_size=40, batch_size=4)
    dali_images, dali_labels = epoch_of(data_utils.DaliLoader(**args))
    cache_images, cache_labels = epoch_of(data_utils.CacheLoader(**args))
    assert torch.equal(dali_labels, cache_labels)
    assert (dali_images - cache_images).abs().max() < 1e-4


def test_cache_without_dali_matches_the_torch_val(prepared_root):
    args = split_loaders(prepared_root, "val", train=False, img_size=40, batch_size=4)
    torch_images, torch_labels = epoch_of(data_utils.TorchLoader(**args))
    cache_images, cache_labels = epoch_of(data_utils.CacheLoader(**args, use_dali=False))
    assert torch.equal(torch_labels, cache_labels)
    assert (torch_images - cache_images).abs().mean() < 0.02


def test_cache_resumes_mid_epoch_exactly(prepared_root):
    args = split_loaders(prepared_root, "train", img_size=32, batch_size=3)
    loader = data_utils.CacheLoader(**args)
    epoch_of(loader)
    stream = iter(loader)
    next(stream), next(stream)
    state = loader.state_dict()
    expected = list(stream) + list(loader)  # the rest of epoch 1, then epoch 2
    resumed = data_utils.CacheLoader(**args)
    resumed.load_state_dict(state)
    got = list(resumed) + list(resumed)
    assert len(got) == len(expected)
    for (a, la), (b, lb) in zip(got, expected):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_crop_boxes_follow_torchvision_rules():
    from torchvision.transforms import RandomResizedCrop

    rng = np.random.default_rng(0)
    heights = np.array([120, 90, 200, 64] * 500)
    widths = np.array([160, 300, 100, 64] * 500)
    y, x, h, w = data_utils.random_resized_crops(heights, widths, (0.08, 1.0), data_utils.RRC_RATIO, rng)
    assert (y >= 0).all() and (x >= 0).all() and (y + h <= heights).all() and (x + w <= widths).all()
    area = h * w / (heights * widths)
    aspect = w / h
    assert area.min() > 0.07 and area.max() <= 1.0 and ((aspect > 0.7) & (aspect < 1.45)).all()
    # Rejected draws bias the result towards small crops on elongated images: compare with torchvision itself.
    torch.manual_seed(0)
    reference = np.array([RandomResizedCrop.get_params(torch.zeros(1, int(hh), int(ww)), (0.08, 1.0),
                                                       data_utils.RRC_RATIO) for hh, ww in zip(heights, widths)])
    reference_area = reference[:, 2] * reference[:, 3] / (heights * widths)
    reference_aspect = reference[:, 3] / reference[:, 2]
    assert abs(area.mean() - reference_area.mean()) < 0.02
    assert abs(np.log(aspect).mean() - np.log(reference_aspect).mean()) < 0.02
    # No attempt can fit a 400x50 strip at >= 90% of its area: torchvision's central fallback, exactly.
    y, x, h, w = data_utils.random_resized_crops(np.array([50]), np.array([400]), (0.9, 1.0), data_utils.RRC_RATIO, rng)
    top, left, th, tw = RandomResizedCrop.get_params(torch.zeros(1, 50, 400), (0.9, 1.0), data_utils.RRC_RATIO)
    assert (int(y[0]), int(x[0]), int(h[0]), int(w[0])) == (top, left, th, tw)


def coordinate_image(width, height):
    """R encodes x and G encodes y across the whole image, so a crop's pixels say where it came from."""
    xs, ys = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    return Image.fromarray(np.stack([xs, ys, np.full_like(xs, 128)], -1).round().astype(np.uint8))


def crop_statistics(loader, epochs, sizes):
    """Estimated (area fraction, aspect ratio, flipped) of every crop the loader made, from the coordinates."""
    area, aspect, flipped = [], [], []
    for _ in range(epochs):
        for images, labels in loader:
            pixels = images.float() * STD + MEAN
            left, right = pixels[:, 0, :, 0].mean(1), pixels[:, 0, :, -1].mean(1)
            top, bottom = pixels[:, 1, 0, :].mean(1), pixels[:, 1, -1, :].mean(1)
            width_frac, height_frac = (right - left).abs() / 255, (bottom - top) / 255
            w, h = (torch.tensor([sizes[int(c)] for c in labels], dtype=torch.float32)).unbind(1)
            area += (width_frac * height_frac).tolist()
            aspect += (width_frac * w / (height_frac * h)).tolist()
            flipped += (left > right).tolist()
    return np.array(area), np.array(aspect), np.array(flipped)


def test_cache_train_crops_match_dali_in_distribution(tmp_path):
    sizes = [(200, 150), (150, 200), (240, 100), (180, 180)]  # (w, h); the label says which
    files, labels = [], []
    for i in range(48):
        label = i % len(sizes)
        name = f"img_{i:03d}.jpg"
        coordinate_image(*sizes[label]).save(tmp_path / name, quality=95, subsampling=0)
        files.append(name)
        labels.append(label)
    args = dict(image_root=str(tmp_path), files=files, labels=labels, train=True, img_size=48, batch_size=16,
                device=CPU, dtype=torch.float32, workers=1, seed=0)
    dali = crop_statistics(data_utils.DaliLoader(**args), 8, sizes)
    cache = crop_statistics(data_utils.CacheLoader(**args), 8, sizes)
    for area, aspect, flipped in (dali, cache):
        assert 0.06 < area.min() and area.max() < 1.03
        assert np.mean((aspect > 0.7) & (aspect < 1.43)) > 0.95
        assert 0.4 < flipped.mean() < 0.6
    assert abs(dali[0].mean() - cache[0].mean()) < 0.05
    assert abs(np.log(dali[1]).mean() - np.log(cache[1]).mean()) < 0.06
    # Two-sample Kolmogorov-Smirnov distance of the area fractions (384 crops each).
    grid = np.linspace(0, 1, 201)
    ks = np.abs(np.searchsorted(np.sort(dali[0]), grid) / len(dali[0]) -
                np.searchsorted(np.sort(cache[0]), grid) / len(cache[0])).max()
    assert ks < 0.12
