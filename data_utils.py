"""Loaders for the Caltech-101 split written by download.py: DALI by default, torchvision/PIL as fallback.

Both yield `(images, labels)` ready for the model: ImageNet-normalized, NCHW shape in channels_last memory
layout, on the training device, in the AMP dtype; labels are int64 on the same device.

    import data_utils
    train_loader, val_loader, classes = data_utils.build_loaders(data_root="data/Caltech101", img_size=224,
                                                                 batch_size=128, device=torch.device("cuda"))

DALI pipeline (one definition for both devices): on a GPU the JPEG decoder runs with device='mixed' (nvJPEG)
and every operator after it on the GPU; without a GPU the same graph runs on CPU operators (device_id=None).
Train: decode with random-resized-crop (scale 0.08-1, ratio 3/4-4/3, as torchvision), resize to img_size,
random horizontal flip, normalize. Val/test: decode, resize the shorter side to img_size*256/224, centre crop.
"""
import os
import time

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RRC_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults: fraction of the image area
RRC_RATIO = (3 / 4, 4 / 3)  # and aspect-ratio range
IMAGES_DIR = "101_ObjectCategories"

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    HAVE_DALI = True
except ImportError:  # macOS / Windows / no DALI wheel: the torch loader still works
    HAVE_DALI = False


class DataError(Exception):
    """A user-facing data problem: the scripts print it as one line and exit non-zero."""


def resize_size(img_size):
    """Shorter side before the val centre crop: the 256/224 ratio of the ImageNet recipe."""
    return int(img_size * 256 / 224)


def read_classes(data_root):
    path = os.path.join(data_root, "classes.txt")
    if not os.path.isfile(path):
        raise DataError(f"no prepared dataset at {data_root} (missing classes.txt): "
                        f"run `python download.py --data_root {data_root}` first")
    with open(path) as f:
        classes = [line.strip() for line in f if line.strip()]
    if not classes:
        raise DataError(f"{path} is empty: run `python download.py --data_root {data_root}` again")
    return classes


def read_split(data_root, split):
    """(files, labels) of one split list; paths are relative to data_root/101_ObjectCategories."""
    path = os.path.join(data_root, f"{split}.txt")
    if not os.path.isfile(path):
        hint = " (prepare one with --test_per_class N)" if split == "test" else ""
        raise DataError(f"no {split} split at {path}{hint}: run `python download.py --data_root {data_root}`")
    files, labels = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                name, label = line.rstrip("\n").rsplit(" ", 1)
                labels.append(int(label))
            except ValueError:
                raise DataError(f"{path}:{lineno}: expected '<relative path> <label>', got {line.strip()!r}") from None
            files.append(name)
    if not files:
        raise DataError(f"{path} lists no images: run `python download.py --data_root {data_root}` again")
    image_root = os.path.join(data_root, IMAGES_DIR)
    missing = [p for p in files if not os.path.isfile(os.path.join(image_root, p))]
    if missing:
        raise DataError(f"{path} names {len(missing)} missing files (first: {os.path.join(image_root, missing[0])}): "
                        f"re-run `python download.py --data_root {data_root}`")
    return files, labels


def to_model_input(images, labels, device, dtype):
    """NHWC batch (host or device) -> NCHW-shaped, channels_last, on device, in dtype; int64 labels."""
    if images.shape[-1] == 3:  # NHWC from DALI: the permute is free and is exactly channels_last memory
        images = images.permute(0, 3, 1, 2)
    images = images.to(device, non_blocking=True).to(dtype=dtype, memory_format=torch.channels_last)
    labels = labels.reshape(-1).to(device, non_blocking=True).long()
    return images, labels


# ---------------------------------------------------------------------------------------------
# DALI

if HAVE_DALI:
    def decode_resize_shorter(jpegs, decoder_device, shorter):
        """The val pipeline's first half, shared with the --cache decode pass so that both cut the same pixels."""
        images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
        return fn.resize(images, resize_shorter=shorter, antialias=True)

    def decode_random_crop(jpegs, decoder_device, crop_scale_min):
        """The train pipeline's first step: decode only a random crop (torchvision's scale and ratio rules), as
        variable-size uint8 RGB. bench.py times it alone as the ceiling of the whole pipeline."""
        return fn.decoders.image_random_crop(jpegs, device=decoder_device, output_type=types.RGB,
                                             random_area=[crop_scale_min, 1.0], random_aspect_ratio=list(RRC_RATIO),
                                             num_attempts=10)

    @pipeline_def
    def caltech_pipeline(image_root, files, labels, train, img_size, crop_scale_min, dali_device, shard_id, num_shards,
                         reader_seed):
        jpegs, label = fn.readers.file(file_root=image_root, files=files, labels=labels, name="Reader",
                                       shuffle_after_epoch=train, seed=reader_seed, pad_last_batch=True,
                                       shard_id=shard_id, num_shards=num_shards)
        decoder_device = "mixed" if dali_device == "gpu" else "cpu"  # the only GPU-specific line
        if train:
            images = decode_random_crop(jpegs, decoder_device, crop_scale_min)
            images = fn.resize(images, resize_x=img_size, resize_y=img_size, antialias=True)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = decode_resize_shorter(jpegs, decoder_device, resize_size(img_size))
            mirror = 0
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC", crop=(img_size, img_size),
                                          mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD],
                                          mirror=mirror)
        return images, label


def _decode_error(err, image_root):
    """A DataError naming the file DALI failed on (its message says 'Failed to decode sample #i : <path>')."""
    text = str(err)
    for line in text.splitlines():
        if "Failed to decode" in line or "Error when reading" in line:
            name = line.split(" : ", 1)[-1].strip()
            return DataError(f"cannot decode {os.path.join(image_root, name)}: the file is corrupt; re-run "
                             f"download.py (it re-checks every image) or remove it from the split lists")
    return DataError(f"the DALI pipeline failed: {text.strip().splitlines()[-1] if text.strip() else err!r}")


class DaliLoader:
    """Iterates a DALI pipeline as (images, labels) model inputs. len() is batches per epoch.

    state_dict()/load_state_dict() save and restore the reader position and every DALI RNG (DALI pipeline
    checkpointing), at an epoch boundary or in the middle of an epoch.
    """
    kind = "dali"

    def __init__(self, image_root, files, labels, train, img_size, batch_size, device, dtype, workers, seed,
                 shard_id=0, num_shards=1, drop_last=False, crop_scale_min=RRC_SCALE[0]):
        if not HAVE_DALI:
            raise DataError("DALI is not installed (pip install nvidia-dali-cuda120, Linux only): use --loader torch")
        self.device, self.dtype, self.image_root = device, dtype, image_root
        on_gpu = device.type == "cuda"
        self._make_pipe = lambda checkpoint: caltech_pipeline(
            image_root, files, labels, train, img_size, crop_scale_min, "gpu" if on_gpu else "cpu", shard_id,
            num_shards, seed, batch_size=batch_size, num_threads=workers,
            device_id=(device.index or 0) if on_gpu else None, seed=seed + 1, enable_checkpointing=True,
            checkpoint=checkpoint)
        # Train: every image once per epoch, a short last batch unless drop_last; val keeps the short batch.
        self.policy = LastBatchPolicy.DROP if drop_last else LastBatchPolicy.PARTIAL
        self._build(None)
        # DALI's shard i holds files [N*i//k, N*(i+1)//k); iterator.size would count the padding sample.
        n = len(files)
        self.num_images = n * (shard_id + 1) // num_shards - n * shard_id // num_shards
        self.num_batches = self.num_images // batch_size if drop_last else -(-self.num_images // batch_size)

    def _build(self, checkpoint):
        self.pipe = self._make_pipe(checkpoint)
        try:
            self.pipe.build()
            # The iterator prefetches its first batch here, so a corrupt first image fails already now.
            self.iterator = DALIGenericIterator([self.pipe], ["images", "labels"], reader_name="Reader",
                                                last_batch_policy=self.policy, auto_reset=True)
        except RuntimeError as e:
            raise _decode_error(e, self.image_root) from None

    def state_dict(self):
        return {"dali_checkpoint": self.iterator.checkpoints()[0]}

    def load_state_dict(self, state):
        self._build(state["dali_checkpoint"])

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        try:
            for batch in self.iterator:
                yield to_model_input(batch[0]["images"], batch[0]["labels"], self.device, self.dtype)
        except RuntimeError as e:
            raise _decode_error(e, self.image_root) from None


# ---------------------------------------------------------------------------------------------
# torchvision / PIL fallback

def load_rgb(path):
    """A file as a PIL RGB image (grayscale, palette and CMYK converted); DataError naming the file otherwise."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises all three for broken or foreign files
        raise DataError(f"cannot decode {path}: not a readable image ({e})") from None


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, image_root, files, labels, transform):
        self.image_root, self.files, self.labels, self.transform = image_root, files, labels, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(load_rgb(os.path.join(self.image_root, self.files[i]))), self.labels[i]


class ResizeShorter:
    """Bilinear (antialiased) resize of the shorter side to `size`, rounding the longer side as DALI does
    (torchvision truncates it), so that both loaders produce the same val tensors."""

    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        from PIL import Image

        w, h = img.size
        scale = self.size / min(w, h)
        return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)


class CentreCrop:
    """Centre crop placed as DALI places it (half-pixel margins round up; torchvision rounds half to even), so
    that the DALI, torch and cache loaders cut the same window."""

    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        w, h = img.size
        left, top = int(centre_crop_offsets(w, self.size)), int(centre_crop_offsets(h, self.size))
        return img.crop((left, top, left + self.size, top + self.size))


def torch_transform(train, img_size, crop_scale_min=RRC_SCALE[0]):
    from torchvision import transforms as T

    if train:
        spatial = [T.RandomResizedCrop(img_size, scale=(crop_scale_min, 1.0), ratio=RRC_RATIO, antialias=True),
                   T.RandomHorizontalFlip()]
    else:
        spatial = [ResizeShorter(resize_size(img_size)), CentreCrop(img_size)]
    return T.Compose(spatial + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch from (seed, epoch), optionally starting part-way through (for resume)."""

    def __init__(self, n, shuffle, seed):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.epoch, self.start = 0, 0

    def __len__(self):
        return self.n - self.start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        else:
            order = torch.arange(self.n)
        yield from order[self.start:].tolist()


class TorchLoader:
    """torch DataLoader over the split list, with the DALI loader's interface and output.

    Resume restores the epoch's sample order and position; the random crops of a resumed partial epoch are
    drawn afresh (worker RNGs are seeded per epoch, not per sample).
    """
    kind = "torch"

    def __init__(self, image_root, files, labels, train, img_size, batch_size, device, dtype, workers, seed,
                 shard_id=0, num_shards=1, drop_last=False, crop_scale_min=RRC_SCALE[0]):
        self.device, self.dtype, self.seed, self.batch_size = device, dtype, seed, batch_size
        files, labels = files[shard_id::num_shards], labels[shard_id::num_shards]
        self.num_images = len(files)
        self.sampler = EpochSampler(len(files), train, seed)
        self.batches_done = 0
        self.generator = torch.Generator()
        self.loader = torch.utils.data.DataLoader(
            ListDataset(image_root, files, labels, torch_transform(train, img_size, crop_scale_min)),
            batch_size=batch_size, sampler=self.sampler, drop_last=drop_last, num_workers=workers,
            pin_memory=device.type == "cuda", generator=self.generator)
        self.num_batches = self.num_images // batch_size if drop_last else -(-self.num_images // batch_size)

    def state_dict(self):
        return {"epoch": self.sampler.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state):
        self.sampler.epoch, self.batches_done = state["epoch"], state["batches_done"]

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        self.sampler.start = self.batches_done * self.batch_size
        self.generator.manual_seed(self.seed * 100003 + self.sampler.epoch)  # worker augmentation seeds
        for images, labels in self.loader:
            self.batches_done += 1
            yield to_model_input(images, labels, self.device, self.dtype)
        self.sampler.epoch, self.batches_done, self.sampler.start = self.sampler.epoch + 1, 0, 0


# ---------------------------------------------------------------------------------------------
# Decoded-image cache on the device (--cache)

if HAVE_DALI:
    @pipeline_def
    def first_step_pipeline(image_root, files, dali_device, train, shorter, crop_scale_min):
        """The train or val pipeline's first step alone: train decodes a random crop (bench.py times it as the
        pipeline's ceiling), val decodes and resizes the shorter side (the --cache decode pass)."""
        jpegs, _ = fn.readers.file(file_root=image_root, files=files, name="Reader", shuffle_after_epoch=train,
                                   pad_last_batch=True)
        decoder_device = "mixed" if dali_device == "gpu" else "cpu"
        if train:
            return decode_random_crop(jpegs, decoder_device, crop_scale_min)
        return decode_resize_shorter(jpegs, decoder_device, shorter)


def first_step_pipe(image_root, files, device, workers, batch_size, train, shorter=None, crop_scale_min=RRC_SCALE[0]):
    """A built first_step_pipeline on `device`; iterate it with epoch_batches()."""
    on_gpu = device.type == "cuda"
    pipe = first_step_pipeline(image_root, files, "gpu" if on_gpu else "cpu", train, shorter, crop_scale_min,
                               batch_size=batch_size, num_threads=workers,
                               device_id=(device.index or 0) if on_gpu else None, seed=0)
    pipe.build()
    return pipe


def epoch_batches(pipe, num_images):
    """One epoch of a single-output reader pipeline: (TensorList, how many of it are real images) per batch; the
    reader pads the last batch with repeats."""
    for start in range(0, num_images, pipe.max_batch_size):
        (out,) = pipe.run()
        yield out, min(pipe.max_batch_size, num_images - start)


def decode_resized(image_root, files, shorter, device, workers, use_dali):
    """Every file decoded once with its shorter side resized to `shorter`, as uint8 HWC pixels packed into one
    flat buffer on `device`: (pixels, offsets, heights, widths), the last three as int64 numpy arrays."""
    arrays = []
    if use_dali:
        try:
            pipe = first_step_pipe(image_root, files, device, workers, 64, train=False, shorter=shorter)
            for out, real in epoch_batches(pipe, len(files)):
                out = out.as_cpu() if hasattr(out, "as_cpu") else out  # GPU-decoded: packed on the host once
                arrays.extend(np.array(out.at(i)) for i in range(real))
        except RuntimeError as e:
            raise _decode_error(e, image_root) from None
    else:
        resize = ResizeShorter(shorter)
        arrays = [np.asarray(resize(load_rgb(os.path.join(image_root, name)))) for name in files]
    heights = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    widths = np.array([a.shape[1] for a in arrays], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(heights * widths * 3)[:-1]])
    pixels = torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays]))
    return pixels.to(device), offsets, heights, widths


def random_resized_crops(heights, widths, scale, ratio, rng, attempts=10):
    """torchvision's RandomResizedCrop box sampling for many images at once: int arrays (y, x, h, w).

    Area fraction uniform in `scale`, aspect ratio (w/h) log-uniform in `ratio`; the first of `attempts` draws
    that fits wins; if none fits, the whole image cut centrally to the nearest allowed aspect ratio.
    """
    n = len(heights)
    target = (heights * widths)[:, None] * rng.uniform(scale[0], scale[1], (n, attempts))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, attempts)))
    crop_w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    crop_h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (crop_w >= 1) & (crop_h >= 1) & (crop_w <= widths[:, None]) & (crop_h <= heights[:, None])
    first, rows = fits.argmax(1), np.arange(n)
    crop_w, crop_h = crop_w[rows, first], crop_h[rows, first]
    fallback = ~fits.any(1)
    image_ratio = widths / heights
    fallback_w = np.where(image_ratio > ratio[1], np.round(heights * ratio[1]), widths).astype(np.int64)
    fallback_h = np.where(image_ratio < ratio[0], np.round(widths / ratio[0]), heights).astype(np.int64)
    crop_w, crop_h = np.where(fallback, fallback_w, crop_w), np.where(fallback, fallback_h, crop_h)
    y = np.where(fallback, (heights - crop_h) // 2, (rng.random(n) * (heights - crop_h + 1)).astype(np.int64))
    x = np.where(fallback, (widths - crop_w) // 2, (rng.random(n) * (widths - crop_w + 1)).astype(np.int64))
    return y, x, crop_h, crop_w


def centre_crop_offsets(size, crop):
    """Where a centre crop of `crop` starts in `size` pixels (DALI's crop_mirror_normalize convention)."""
    return np.round((size - crop) / 2.0 + 1e-9).astype(np.int64)


class CacheLoader:
    """The split decoded once (DALI, or PIL without it) at the val resize and kept as uint8 on the device; every
    epoch's random-resized crops, flips and normalisation are tensor operations there, with no JPEG decode.

    Semantics match the DALI pipeline: crop area fraction uniform in [crop_scale_min, 1], aspect ratio
    log-uniform in [3/4, 4/3], resize to img_size (bilinear, antialiased), flip with probability 0.5; val/test is
    the same shorter-side resize and centre crop. Each epoch's plan (order, boxes, flips) is a function of
    (seed, epoch), so state_dict() restores any position exactly.
    """
    kind = "cache"

    def __init__(self, image_root, files, labels, train, img_size, batch_size, device, dtype, workers, seed,
                 shard_id=0, num_shards=1, drop_last=False, crop_scale_min=RRC_SCALE[0], use_dali=HAVE_DALI):
        files, labels = files[shard_id::num_shards], labels[shard_id::num_shards]
        self.device, self.dtype, self.train, self.img_size = device, dtype, train, img_size
        self.batch_size, self.seed, self.crop_scale = batch_size, seed, (crop_scale_min, 1.0)
        start = time.perf_counter()
        self.pixels, self.offsets, self.heights, self.widths = decode_resized(
            image_root, files, resize_size(img_size), device, workers, use_dali)
        self.decode_seconds = time.perf_counter() - start
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_images = len(files)
        self.num_batches = self.num_images // batch_size if drop_last else -(-self.num_images // batch_size)
        self.epoch, self.batches_done = 0, 0
        # (pixel - mean) / std as pixel * scale + shift, with mean and std on the 0-255 scale, laid out as one
        # NHWC image row (RGBRGB...): normalising whole rows keeps the kernel's inner loop long and vectorised,
        # where a per-channel broadcast over an inner dimension of 3 runs about 3x slower on a CPU.
        std = torch.tensor([s * 255 for s in IMAGENET_STD], device=device)
        self.norm_scale_row = (1 / std).repeat(img_size)
        self.norm_shift_row = (-torch.tensor([m * 255 for m in IMAGENET_MEAN], device=device) / std).repeat(img_size)

    @property
    def nbytes(self):
        return self.pixels.numel()

    def state_dict(self):
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state):
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]

    def __len__(self):
        return self.num_batches

    def plan(self, epoch):
        """(order, y, x, h, w, flip) of one epoch, as numpy arrays in batch order."""
        n, crop = self.num_images, self.img_size
        if not self.train:
            order = np.arange(n)
            y, x = centre_crop_offsets(self.heights, crop), centre_crop_offsets(self.widths, crop)
            return order, y, x, np.full(n, crop), np.full(n, crop), np.zeros(n, dtype=bool)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n)
        y, x, h, w = random_resized_crops(self.heights[order], self.widths[order], self.crop_scale, RRC_RATIO, rng)
        return order, y, x, h, w, rng.random(n) < 0.5

    def make_batch(self, order, y, x, h, w, flip):
        crop = self.img_size
        batch = torch.empty(len(order), crop, crop, 3, device=self.device)  # NHWC: channels_last once permuted
        for j, i in enumerate(order.tolist()):
            height, width, offset = int(self.heights[i]), int(self.widths[i]), int(self.offsets[i])
            image = self.pixels[offset:offset + height * width * 3].view(height, width, 3)
            region = image[y[j]:y[j] + h[j], x[j]:x[j] + w[j]].permute(2, 0, 1)[None]
            # The CPU has a fast uint8 antialiased kernel (rounding to uint8 like DALI's resize) for contiguous
            # channels_last input; CUDA's kernel needs float.
            region = region.contiguous(memory_format=torch.channels_last) if region.device.type == "cpu" \
                else region.float()
            if h[j] != crop or w[j] != crop:
                region = torch.nn.functional.interpolate(region, size=(crop, crop), mode="bilinear",
                                                         align_corners=False, antialias=True)
            if flip[j]:
                region = region.flip(-1)
            batch[j] = region[0].permute(1, 2, 0)
        # Normalise in float32, then one cast for the whole batch: a bf16 `out=` takes a slow conversion path,
        # and this rounds the same way.
        rows = batch.view(-1, crop * 3)
        torch.addcmul(self.norm_shift_row, rows, self.norm_scale_row, out=rows)
        labels = torch.from_numpy(self.labels[order]).to(self.device, non_blocking=True)
        return batch.permute(0, 3, 1, 2).to(self.dtype), labels

    def __iter__(self):
        order, y, x, h, w, flip = self.plan(self.epoch)
        for b in range(self.batches_done, self.num_batches):
            part = slice(b * self.batch_size, (b + 1) * self.batch_size)
            self.batches_done = b + 1
            yield self.make_batch(order[part], y[part], x[part], h[part], w[part], flip[part])
        self.epoch, self.batches_done = self.epoch + 1, 0


def build_loader(data_root, split, img_size, batch_size, device, dtype=torch.float32, loader="dali", workers=4,
                 seed=0, shard_id=0, num_shards=1, drop_last=False, crop_scale_min=RRC_SCALE[0], cache=False):
    """One loader over one split; train augments and reshuffles every epoch, val/test are deterministic.
    cache=True decodes the split once (with `loader`'s decoder) and keeps it on the device."""
    files, labels = read_split(data_root, split)
    if loader not in ("dali", "torch"):
        raise DataError(f"unknown loader '{loader}': choose dali or torch")
    args = (os.path.join(data_root, IMAGES_DIR), files, labels, split == "train", img_size, batch_size, device, dtype,
            workers, seed, shard_id, num_shards, drop_last and split == "train", crop_scale_min)
    if cache:
        return CacheLoader(*args, use_dali=loader == "dali")
    return (DaliLoader if loader == "dali" else TorchLoader)(*args)


def build_loaders(data_root, img_size, batch_size, device, dtype=torch.float32, loader="dali", workers=4, seed=0,
                  eval_batch_size=None, shard_id=0, num_shards=1, drop_last=False, crop_scale_min=RRC_SCALE[0],
                  cache=False):
    """(train_loader, val_loader, classes) for a prepared data root."""
    classes = read_classes(data_root)
    common = dict(img_size=img_size, device=device, dtype=dtype, loader=loader, workers=workers, seed=seed,
                  shard_id=shard_id, num_shards=num_shards, cache=cache)
    train = build_loader(data_root, "train", batch_size=batch_size, drop_last=drop_last, crop_scale_min=crop_scale_min,
                         **common)
    val = build_loader(data_root, "val", batch_size=eval_batch_size or batch_size, **common)
    return train, val, classes
