"""--cache: the split decoded once and kept as uint8 on the training device; every epoch's crops, flips and
normalisation are tensor operations there, with no JPEG decode after the first pass.

    loader = cache_loader.CacheLoader(image_root, files, labels, plan, torch.device("cuda"), data)

Train images are kept at their original size (so a cached crop is the crop DALI cuts), downscaled only when their
shorter side exceeds `train_cap(img_size, crop_scale_min)`: the size at which even the smallest crop is still
larger than img_size, so the cap never makes a crop blurrier. Two train paths give the same crops:
- on a CPU (per_image), each crop is cut from its image and resized by torch's uint8 bilinear antialiased resize
  (PIL's filter, vectorised), flipped, and the batch normalised once: no kernel launches to save there, and far
  less arithmetic than sampling in float;
- on a GPU, beside each image a pyramid of half-size levels: a crop samples the level it shrinks 1-2x from, so the
  supersampling below stays at most 3 x 3. A train batch is a fixed number of tensor operations whatever its
  size: one gather of the crop windows' rows, one bilinear grid_sample of every crop at once (the flip folded into
  the grid; k x k samples per output pixel when a crop shrinks, averaged: antialiasing), one normalisation.
Val/test images are stored already resized and centre-cropped exactly as the
DALI val pipeline cuts them, so a val batch is an index and a normalisation.
Under torchrun each rank decodes only the images its plan can give it (sampling.SamplePlan with data.cache).
"""
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import model_utils
from kit.data import dali_loader, sampling, splits

# One by one, a crop of a capped image is resized twice (the cap's resize, then the crop's), and even a slight
# resize blurs by resampling; the fixed-ops path subtracts the cap's blur from its own filter, which a uint8 resize
# cannot. On a CPU, where memory is the host's, images are kept up to this multiple of the cap: Caltech-101's (shorter
# sides up to about 300 px) stay as they are at 96 px and above, as the torch loader and DALI see them.
PER_IMAGE_CAP_FACTOR = 2
MAX_SUPERSAMPLE = 4  # samples per output pixel and axis when a crop shrinks (antialiasing up to 4x downscaling)


def train_cap(img_size, crop_scale_min):
    """Largest shorter side kept: the smallest crop (area crop_scale_min, aspect 3/4) of an image this size is
    still img_size pixels on its short side."""
    return math.ceil(img_size / math.sqrt(crop_scale_min * sampling.RRC_RATIO[0]))


def resized(array, height, width):
    """An HWC uint8 image resized to height x width (bilinear, antialiased, uint8 like DALI)."""
    image = torch.from_numpy(array).permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
    return F.interpolate(image, size=(height, width), mode="bilinear", antialias=True)[0].permute(1, 2, 0).numpy()


def shrink(array, cap):
    """An HWC uint8 image whose shorter side is above `cap`, resized to it."""
    height, width = array.shape[:2]
    scale = cap / min(height, width)
    if scale >= 1:
        return array
    return resized(array, max(1, round(height * scale)), max(1, round(width * scale)))


def half(array):
    """An HWC uint8 image at half its size (rounded up): the next level of the cache's pyramid."""
    return resized(array, -(-array.shape[0] // 2), -(-array.shape[1] // 2))


def decode_all(image_root, files, device, workers, use_dali, cap=None, img_size=None):
    """uint8 HWC arrays of `files`: whole images (shorter side capped at `cap`) for train (img_size=None), or the
    val transform's img_size crops (shorter side to img_size*256/224, centre crop) for val/test."""
    if use_dali:
        plan = sampling.SamplePlan(len(files), 64, train=False)
        shorter = splits.resize_size(img_size) if img_size else None
        pipe = dali_loader.first_step_pipe(image_root, files, plan, device, max(1, workers), train=False,
                                           shorter=shorter, img_size=img_size)
        arrays = [a for batch in dali_loader.epoch_batches(pipe, plan.steps, image_root, files) for a in batch]
        del pipe
        if device.type == "cuda":
            dali_loader.release_unused_memory()
    else:
        resize = splits.ResizeShorter(splits.resize_size(img_size)) if img_size else None
        crop = splits.CentreCrop(img_size) if img_size else None
        arrays = []
        for name in files:
            image = splits.load_rgb(os.path.join(image_root, name))
            arrays.append(np.asarray(crop(resize(image)) if img_size else image))
    return [shrink(a, cap) for a in arrays] if cap else arrays


class CacheLoader(sampling.PlanPosition):
    """Yields (images, labels) like the other loaders, from pixels decoded once; follows `plan` like them."""
    kind = "cache"

    def __init__(self, image_root, files, labels, plan, device, data=sampling.DataSettings(),
                 max_levels=None,  # train pyramid levels (None: as many as crops need; 1: the originals only)
                 per_image=None):  # train crops one by one (None: on a CPU)
        img_size, workers = data.size(plan.train), data.workers
        use_dali = data.loader == "dali" and dali_loader.HAVE_DALI  # the first pass decodes with the run's decoder
        self.plan, self.img_size, self.device, self.dtype = plan, img_size, device, data.dtype
        # On a CPU there is no kernel launch to save, and torch's vectorised uint8 antialiased resize (PIL's
        # filter) of each crop does a fraction of the batched float sampling's arithmetic; a GPU wants a batch
        # to be a fixed number of kernels.
        self.per_image = device.type == "cpu" if per_image is None else per_image
        self.layout = model_utils.memory_format(data.channels_last)
        n = len(files)
        # The images this rank can be given: its fixed shard for train, its contiguous part for val/test.
        self.mine = np.arange(plan.rank, n, plan.world) if plan.train else np.arange(plan.lo, plan.hi)
        self.local = np.full(n, -1, np.int64)
        self.local[self.mine] = np.arange(len(self.mine))
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64)).to(device)
        start = time.perf_counter()
        mine = [files[i] for i in self.mine]
        std = torch.tensor([s * 255 for s in splits.IMAGENET_STD], device=device).view(1, 3, 1, 1)
        self.norm_scale = 1 / std
        self.norm_shift = -torch.tensor([m * 255 for m in splits.IMAGENET_MEAN], device=device).view(1, 3, 1, 1) / std
        if plan.train:
            self.cap = train_cap(img_size, plan.crop_scale[0]) * (PER_IMAGE_CAP_FACTOR if self.per_image else 1)
            levels = [decode_all(image_root, mine, device, workers, use_dali, cap=self.cap)]
            # A pyramid: each level half the one below (antialiased), up to where the largest crop of the largest
            # image shrinks less than 2x, so a crop samples the level it shrinks 1-2x from: at most 3 x 3 samples
            # per output pixel (2 x 2 above level 0, whose pixels are already blurred) instead of 4 x 4, and
            # windows up to a quarter of the size, for at most a third more memory.
            largest = max(max(a.shape[:2]) for a in levels[0])
            smallest_out = min(plan.out_sizes or [img_size])  # progressive resizing: its first, smallest crops
            extra = max(0, int(math.floor(math.log2(max(largest / smallest_out, 1.0)))))
            if self.per_image:  # each crop is resized from the original pixels: no pyramid
                extra = 0
            for _ in range(extra if max_levels is None else min(extra, max_levels - 1)):
                levels.append([half(a) for a in levels[-1]])
            self.level_heights = np.array([[a.shape[0] for a in level] for level in levels], np.int64)
            self.level_widths = np.array([[a.shape[1] for a in level] for level in levels], np.int64)
            sizes = (self.level_heights * self.level_widths * 3).reshape(-1)  # level by level, image by image
            self.level_offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64).reshape(len(levels), -1)
            # Crop boxes come in original pixels; a capped image, and every pyramid level, is smaller by these.
            self.level_scale_y = self.level_heights / plan.heights[self.mine]
            self.level_scale_x = self.level_widths / plan.widths[self.mine]
            self.heights, self.widths, self.offsets = (self.level_heights[0], self.level_widths[0],
                                                       self.level_offsets[0])
            self.scale_y, self.scale_x = self.level_scale_y[0], self.level_scale_x[0]
            # Padding at the end: a row window that starts in the last image may run past its end (never sampled).
            pad = np.zeros(int(self.widths.max()) * 3, np.uint8)
            self.pixels = torch.from_numpy(np.concatenate([a.reshape(-1) for level in levels for a in level]
                                                          + [pad])).to(device)
        else:
            arrays = decode_all(image_root, mine, device, workers, use_dali, img_size=img_size)
            self.pixels = torch.from_numpy(np.stack(arrays)).to(device)  # (n, S, S, 3): the val crops
        self.decode_seconds = time.perf_counter() - start
        self.num_images = plan.num_local
        self.epoch, self.batches_done = 0, 0

    @property
    def nbytes(self):
        return self.pixels.numel()

    def to_device(self, array):
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)

    def finish(self, images, index):
        """(pixel - mean) / std in float32, then one cast to the batch dtype and layout; the labels."""
        images = torch.addcmul(self.norm_shift, images, self.norm_scale)
        return images.to(dtype=self.dtype, memory_format=self.layout), self.labels[self.to_device(index)]

    def val_batch(self, index):
        crops = self.pixels.index_select(0, self.to_device(self.local[index]))
        return self.finish(crops.permute(0, 3, 1, 2).float(), index)

    def train_batch(self, step, size):
        return self.crops_one_by_one(step, size) if self.per_image else self.crops_at_once(step, size)

    def crops_one_by_one(self, step, size):
        """Each crop of the step cut from its cached image (its box rounded to whole cached pixels, exact for an
        image below the cap) and resized to `size` by torch's uint8 bilinear antialiased resize, as the torch
        loader's PIL resize and DALI's triangle filter do; flipped; then one normalisation of the whole batch."""
        local = self.local[step["index"]]
        heights, widths, offsets = self.heights[local], self.widths[local], self.offsets[local]
        top, left = np.rint(step["y"] * self.scale_y[local]), np.rint(step["x"] * self.scale_x[local])
        bottom = np.minimum(np.maximum(np.rint((step["y"] + step["h"]) * self.scale_y[local]), top + 1), heights)
        right = np.minimum(np.maximum(np.rint((step["x"] + step["w"]) * self.scale_x[local]), left + 1), widths)
        out = torch.empty(len(local), size, size, 3, dtype=torch.uint8, device=self.device)
        boxes = np.stack([heights, widths, offsets, top, left, bottom, right], 1).astype(np.int64).tolist()
        # One thread: torch's own intra-op threads run each resize (a pool of Python threads on top measured
        # slower here, oversubscribing the cores DALI and the model share).
        for i, (height, width, offset, top, left, bottom, right) in enumerate(boxes):
            image = self.pixels[offset:offset + height * width * 3].view(1, height, width, 3)
            crop = image[:, top:bottom, left:right].permute(0, 3, 1, 2)  # NCHW sizes, channels_last strides
            resized = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
            out[i] = resized[0].permute(1, 2, 0)
        flipped = self.to_device(np.flatnonzero(step["flip"]))
        out[flipped] = out[flipped].flip(2)
        return self.finish(out.permute(0, 3, 1, 2).float(), step["index"])

    def crops_at_once(self, step, size):
        """Every crop of the step resized to `size` at once: a fixed number of tensor operations."""
        local = self.local[step["index"]]
        # Each crop samples the pyramid level it shrinks 1-2x from (level 0 when it shrinks less, or grows).
        shrink0 = np.maximum(step["h"] * self.scale_y[local], step["w"] * self.scale_x[local]) / size
        level = np.clip(np.floor(np.log2(np.maximum(shrink0, 1.0))).astype(np.int64), 0, len(self.level_heights) - 1)
        scale_y, scale_x = self.level_scale_y[level, local], self.level_scale_x[level, local]
        heights, widths = self.level_heights[level, local], self.level_widths[level, local]
        offsets = self.level_offsets[level, local]
        # The crop box in the sampled level's pixels, and the whole-pixel window around it that is gathered.
        y0, box_h = step["y"] * scale_y, step["h"] * scale_y
        x0, box_w = step["x"] * scale_x, step["w"] * scale_x
        row0, col0 = np.floor(y0).astype(np.int64), np.floor(x0).astype(np.int64)
        rows = np.minimum(np.ceil(y0 + box_h).astype(np.int64), heights) - row0
        cols = np.minimum(np.ceil(x0 + box_w).astype(np.int64), widths) - col0
        max_rows, max_cols = int(rows.max()), int(cols.max())
        # Row r of window i starts at this byte; rows past the window repeat its last row (never sampled).
        row_index = np.minimum(np.arange(max_rows)[None], rows[:, None] - 1) + row0[:, None]
        starts = offsets[:, None] + (row_index * widths[:, None] + col0[:, None]) * 3
        # Antialiasing: a crop that shrinks f-fold is sampled k x k times per output pixel over a box whose width
        # gives the same blur (variance) as DALI's triangle filter; a crop that grows is sampled once (bilinear).
        shrink_y, shrink_x = box_h / size, box_w / size
        capped = (level > 0) | (self.scale_y[local] < 1)  # pixels that already carry a resize's blur
        k = int(np.clip(math.ceil(self.box_width(np.maximum(shrink_y, shrink_x), capped).max()), 1, MAX_SUPERSAMPLE))
        grid_y = self.sample_positions(y0 - row0, box_h, rows, size, k, np.zeros(len(local), bool), capped)
        grid_x = self.sample_positions(x0 - col0, box_w, cols, size, k, step["flip"], capped)
        windows = self.pixels.unfold(0, max_cols * 3, 1)  # a view: every byte offset starts a row of max_cols
        patches = windows.index_select(0, self.to_device(starts.reshape(-1)))
        patches = patches.view(len(local), max_rows, max_cols, 3).permute(0, 3, 1, 2).float()
        gy, gx = self.to_device(grid_y / max_rows * 2 - 1), self.to_device(grid_x / max_cols * 2 - 1)
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)
        images = F.grid_sample(patches, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return self.finish(F.avg_pool2d(images, k), step["index"])

    @staticmethod
    def box_width(shrink, capped):
        """Width (cached pixels) of the box whose average over bilinear samples (variance 1/6) blurs a crop that
        shrinks `shrink`-fold as much as DALI's triangle filter of half-width `shrink` (variance shrink**2 / 6); a
        capped image already carries the cap's own resize (1/6); 0 when the crop grows (plain bilinear)."""
        return np.sqrt(np.maximum(2 * shrink ** 2 - 2 - 2 * capped, 0))

    @classmethod
    def sample_positions(cls, start, length, limit, size, k, flip, capped):
        """Sample positions (float32, shape (n, size * k)) of a resize of [start, start + length) to `size` pixels: k
        per output pixel, spread over box_width() around its centre, clamped to the window's pixels as DALI and
        torch clamp at a crop's edge, mirrored where `flip`; shifted by +0.5 for grid_sample's coordinates."""
        centres = (np.arange(size) + 0.5)[None] * (length / size)[:, None] + start[:, None] - 0.5
        spread = ((np.arange(k) + 0.5) / k - 0.5)[None] * cls.box_width(length / size, capped)[:, None]
        samples = (centres[:, :, None] + spread[:, None, :]).reshape(len(start), size * k)
        samples = np.clip(samples, 0, (limit - 1)[:, None])
        samples = np.where(flip[:, None], samples[:, ::-1], samples)
        return (samples + 0.5).astype(np.float32)

    def __iter__(self):
        size = self.plan.out_size(self.epoch, self.img_size)
        for step in self.plan.epoch(self.epoch, self.batches_done):
            batch = self.train_batch(step, size) if self.plan.train else self.val_batch(step["index"])
            self.epoch, self.batches_done = sampling.next_position(self.epoch, self.batches_done, self.plan.steps)
            yield batch
