"""data_utils: the DALI CPU pipeline (the same graph that runs with device='mixed' on a GPU) and the torch fallback."""
import collections
import os

import pytest
import torch

import data_utils
from conftest import CLASS_COLOURS

CPU = torch.device("cpu")
MEAN = torch.tensor(data_utils.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(data_utils.IMAGENET_STD).view(1, 3, 1, 1)
GRAY = "alpha/gray.jpg"


def epoch_of(loader):
    images, labels = zip(*list(loader))
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_batches_are_model_ready(prepared_root, loader, split):
    ld = data_utils.build_loader(prepared_root, split, img_size=40, batch_size=5, device=CPU, loader=loader,
                                 workers=1, dtype=torch.bfloat16)
    images, labels = next(iter(ld))
    assert images.shape == (5, 3, 40, 40) and images.dtype == torch.bfloat16
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and labels.shape == (5,)
    pixels = images.float() * STD + MEAN  # undo the normalisation: back to [0, 1]
    assert pixels.min() >= -0.02 and pixels.max() <= 1.02 and pixels.std() > 0.05


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_epochs_are_exact_and_labels_match_pixels(prepared_root, loader):
    files, labels = data_utils.read_split(prepared_root, "val")
    ld = data_utils.build_loader(prepared_root, "val", img_size=32, batch_size=4, device=CPU, loader=loader,
                                 workers=1)
    assert len(ld) == -(-len(files) // 4)  # the short last batch is kept
    for _ in range(2):  # two epochs: the iterator resets itself
        images, got = epoch_of(ld)
        assert got.tolist() == labels  # val order is the list order, every image exactly once
    colours = torch.tensor([CLASS_COLOURS[c] for c in sorted(CLASS_COLOURS)], dtype=torch.float32) / 255
    mean_rgb = (images * STD + MEAN).mean((2, 3))
    predicted = torch.cdist(mean_rgb, colours).argmin(1)
    keep = torch.tensor([f != GRAY for f in files])  # the grayscale image carries no colour evidence
    assert (predicted[keep] == got[keep]).float().mean() == 1.0


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_train_epoch_sees_every_image_once(prepared_root, loader):
    files, labels = data_utils.read_split(prepared_root, "train")
    ld = data_utils.build_loader(prepared_root, "train", img_size=32, batch_size=5, device=CPU, loader=loader,
                                 workers=1, seed=3)
    orders = []
    for _ in range(2):
        _, got = epoch_of(ld)
        assert collections.Counter(got.tolist()) == collections.Counter(labels)
        orders.append(got.tolist())
    assert orders[0] != sorted(orders[0]) or orders[1] != sorted(orders[1])  # shuffled


def test_drop_last_drops_the_train_remainder(prepared_root):
    files, _ = data_utils.read_split(prepared_root, "train")
    ld = data_utils.build_loader(prepared_root, "train", img_size=32, batch_size=5, device=CPU, workers=1,
                                 drop_last=True)
    _, got = epoch_of(ld)
    assert len(ld) == len(files) // 5 and len(got) == len(files) // 5 * 5


def test_loaders_agree_on_val(prepared_root):
    dali = epoch_of(data_utils.build_loader(prepared_root, "val", 48, 8, CPU, loader="dali", workers=1))
    torch_ = epoch_of(data_utils.build_loader(prepared_root, "val", 48, 8, CPU, loader="torch", workers=0))
    assert torch.equal(dali[1], torch_[1])
    diff = (dali[0] - torch_[0]).abs()
    # Same decoder (libjpeg-turbo), same resize rounding and crop; only the resampling filters differ slightly:
    # 0.05 in normalised units is about 3 grey levels out of 255 (real photos agree to about 0.01); the
    # saturated, noisy synthetic colours stress chroma upsampling, and CMYK has no one right RGB conversion.
    assert diff.mean() < 0.05, diff.mean()
    assert diff.mean((1, 2, 3)).max() < 0.25


def test_grayscale_and_cmyk_become_rgb(prepared_root):
    for name in ("alpha/gray.jpg", "bravo/cmyk.jpg", "charlie/png_named.jpg"):
        ds = data_utils.ListDataset(os.path.join(prepared_root, data_utils.IMAGES_DIR), [name], [0],
                                    data_utils.torch_transform(False, 32))
        image, _ = ds[0]
        assert image.shape == (3, 32, 32)
    gray, _ = data_utils.ListDataset(os.path.join(prepared_root, data_utils.IMAGES_DIR), [GRAY], [0],
                                     data_utils.torch_transform(False, 32))[0]
    raw = gray * STD[0] + MEAN[0]
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)


def test_sharding_splits_without_overlap(prepared_root):
    files, labels = data_utils.read_split(prepared_root, "val")
    seen = []
    for shard in range(2):
        ld = data_utils.build_loader(prepared_root, "val", 32, 4, CPU, workers=1, shard_id=shard, num_shards=2)
        _, got = epoch_of(ld)
        assert len(got) == ld.num_images and len(ld) == -(-ld.num_images // 4)
        seen += got.tolist()
    assert sorted(seen) == sorted(labels)


def test_missing_data_root_and_missing_files_are_clear(prepared_root, tmp_path):
    with pytest.raises(data_utils.DataError, match="download.py"):
        data_utils.build_loaders(str(tmp_path / "nowhere"), 32, 4, CPU)
    root = tmp_path / "root"
    root.mkdir()
    (root / "classes.txt").write_text("a\n")
    (root / "train.txt").write_text("a/missing.jpg 0\n")
    with pytest.raises(data_utils.DataError, match="missing files"):
        data_utils.read_split(str(root), "train")


def test_real_val_split_through_dali(real_root):
    files, labels = data_utils.read_split(real_root, "val")
    ld = data_utils.build_loader(real_root, "val", 64, 256, CPU, loader="dali", workers=2)
    count, hist = 0, collections.Counter()
    for images, got in ld:
        assert images.shape[1:] == (3, 64, 64) and torch.isfinite(images).all()
        count += len(got)
        hist.update(got.tolist())
    assert count == 5647 and hist == collections.Counter(labels)
