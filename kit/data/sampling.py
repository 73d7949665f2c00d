"""The sampling plan: which images each step of an epoch gives each rank, each image's crop box and flip, and the
output size of an epoch's crops; and DataSettings, the one record of every data-path setting that the plan and the
loaders read.

    data = sampling.DataSettings(img_size=224, seed=0)
    plan = sampling.SamplePlan(len(files), 64, True, data, sizes=splits.image_sizes(root, files))
    for step in plan.epoch(3): ...          # {"index", "y", "x", "h", "w", "flip"} of each step

The plan is a pure function of (seed, epoch, rank, world size), so the DALI, torch and cache loaders draw the very
same order, crops and flips, a resumed run only needs (epoch, batches done), and `--seed` changes the order on
every loader. RandomResizedCrop follows torchvision's rules (area uniform in [scale_min, 1], aspect ratio
log-uniform in [3/4, 4/3], 10 attempts, then a central fallback).
"""
import abc
import dataclasses

import numpy as np
import torch

RRC_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults: fraction of the image area
RRC_RATIO = (3 / 4, 4 / 3)  # and aspect-ratio range (width / height)
HW_DECODER_LOAD = 0.65  # share of JPEGs for the A100/H100 hardware decoder (DALI's default); others ignore it


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Every setting of the data path in one record: what the plan and each loader read. A run's come from
    data_utils.data_settings(cfg); a new data setting is a field here and a line there."""
    img_size: int = 224  # px: side of the train crops (the last size under progressive resizing)
    eval_size: int = 0  # px: side of the val/test centre crops (0: img_size)
    out_sizes: tuple = ()  # px per epoch: progressive resizing's train crop sizes (empty: img_size throughout)
    crop_scale_min: float = RRC_SCALE[0]  # smallest train crop, as a fraction of the image area
    balanced: bool = False  # train draws every class equally often, with replacement (--class_balance sampler)
    drop_last: bool = False  # train leaves out a short last step
    seed: int = 0  # the plan's order, crops and flips are a function of (seed, epoch, rank, world)
    loader: str = "auto"  # dali | torch | auto (data_utils.choose_loader)
    cache: bool = False  # decode once, keep uint8 pixels on the device (cache_loader); fixes each rank's shard
    workers: int = 4  # DALI threads or DataLoader worker processes (0: the torch loader in the main process)
    hw_decoder_load: float = HW_DECODER_LOAD  # DALI on a GPU: share of JPEGs for the hardware decoder
    dtype: torch.dtype = torch.float32  # of the image batches
    channels_last: bool = True  # NHWC image batches

    def size(self, train):
        """Side in px of the images a train or an eval loader gives."""
        return self.img_size if train else (self.eval_size or self.img_size)

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


def step_sizes(num_images, global_batch, world, drop_last):
    """Images per rank in each step of an epoch, shape (steps, world).

    Full steps give every rank global_batch / world images. The last, short step of r images gives rank k
    r // world + (k < r % world) of them, unless that would leave a rank with fewer than two (r < 2 * world): then
    it is left out, so every rank always takes the same number of steps, and BatchNorm never trains on a single
    image (at small sizes its last stage is 1x1: one value per channel, which it refuses). drop_last leaves out
    any short step.
    """
    full, rest = divmod(num_images, global_batch)
    sizes = [[global_batch // world] * world] * full
    if rest and not drop_last and rest >= 2 * world:
        sizes.append([rest // world + (k < rest % world) for k in range(world)])
    return np.array(sizes, dtype=np.int64).reshape(-1, world)


def next_position(epoch, batches_done, steps):
    """The stream position after one more batch: a loader's state always names the next batch it will give, so a
    checkpoint taken after the last step of an epoch resumes at the next epoch."""
    return (epoch + 1, 0) if batches_done + 1 >= steps else (epoch, batches_done + 1)


def shard_probabilities(labels, world, iterations=500):
    """Balanced draws when rank k may only draw from its own shard (images k, k + world, ...), one draw per position
    of the shard: (per-image probabilities within each shard, the expected share of each class overall).

    Normalising 1 / count per shard would favour a class that happens to sit in a shard with few images of the
    others. Instead the expected draws form a shards x classes table whose row sums are the shards' positions and
    whose column sums are equal (N / K each), on the cells where a shard holds the class: found by alternately
    scaling rows and columns (Sinkhorn-Knopp). Within a cell, draws are uniform over its images. When the shards
    cannot give every class an equal share (too few images of some classes in some shards), the table comes as
    close as they allow and class_shares says how close."""
    classes = np.unique(labels)
    shard = np.arange(len(labels)) % world
    held = np.zeros((world, labels.max() + 1))
    np.add.at(held, (shard, labels), 1)
    held = held[:, classes]
    positions = np.bincount(shard, minlength=world).astype(float)
    table = held.copy()
    for _ in range(iterations):
        table *= (len(labels) / len(classes) / np.maximum(table.sum(0), 1e-300))[None, :]
        table *= (positions / np.maximum(table.sum(1), 1e-300))[:, None]
    column = np.searchsorted(classes, labels)
    probs = table[shard, column] / held[shard, column] / positions[shard]
    return probs, table.sum(0) / len(labels)


class PlanPosition(abc.ABC):
    """What a loader is: an iterable of (images, labels) batches that follows one SamplePlan, and its position in
    the plan's stream, (epoch, batches done), which names the next batch it will give; len() is the plan's steps
    per epoch. A loader subclasses this, sets `plan`, `epoch` and `batches_done`, and implements __iter__; its
    constructor takes (image_root, files, labels, plan, device, data) as data_utils.loader_over passes them (data:
    a DataSettings). For the same plan every loader gives the same images
    (tests/test_loaders_agree.py)."""
    plan: "SamplePlan"
    epoch: int
    batches_done: int

    @abc.abstractmethod
    def __iter__(self):
        """The remaining batches of the current epoch, from the position on, advancing the position per batch."""

    def state_dict(self):
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state):
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]

    def __len__(self):
        return self.plan.steps


class SamplePlan:
    """Which images each step of an epoch gives this rank, and (train) the crop box and flip of each, and the size
    the epoch's crops are resized to (out_size: progressive resizing changes it per epoch, never the boxes).

    Train, without data.cache: one permutation of the whole split per epoch, drawn from (seed, epoch); each global
    batch of batch_size * world images is cut into `world` contiguous parts and rank k takes part k, so a 2-rank run
    sees the same global batches as a 1-process run. With data.cache (`fixed_shard`: the device cache holds only
    its rank's images): rank k owns images k, k + world, ... and takes them in the order the same global
    permutation puts them; with one process both are the same plan. Either way rank k gets the step sizes of
    step_sizes(), so the ranks always take the same number of steps.
    Val/test (train=False): rank k takes the contiguous part [N*k/world, N*(k+1)/world) of the list, in order,
    in batches of batch_size (the last one short), so gathering the ranks' outputs restores the list order.
    """

    def __init__(self, num_images, batch_size, train, data=DataSettings(), rank=0, world=1, sizes=None, labels=None):
        """`data` gives seed, drop_last (train), crop_scale_min, out_sizes, balanced (with `labels`) and cache (a
        fixed shard per rank); `sizes` (heights, widths) of the images, for train's crop boxes."""
        self.num_images, self.batch_size, self.train, self.seed = num_images, batch_size, train, data.seed
        self.rank, self.world, self.fixed_shard = rank, world, data.cache
        self.crop_scale = (data.crop_scale_min, 1.0)
        self.out_sizes = tuple(data.out_sizes) if train and data.out_sizes else None
        # --class_balance sampler: each image drawn with probability 1 / (classes * its class's count); the
        # device cache's fixed shards draw by shard (see shard_probabilities).
        self.probs, self.class_shares = None, None
        if train and data.balanced:
            if labels is None:
                raise ValueError("a balanced plan needs the images' labels")
            labels = np.asarray(labels, dtype=np.int64)
            counts = np.bincount(labels)
            self.probs = 1.0 / (np.count_nonzero(counts) * counts[labels])
            if self.fixed_shard and world > 1:
                self.probs, self.class_shares = shard_probabilities(labels, world)
        self.heights, self.widths = sizes if sizes is not None else (None, None)
        if train:
            if sizes is None:
                raise ValueError("a train plan needs the image sizes for its crop boxes")
            self.sizes = step_sizes(num_images, batch_size * world, world, data.drop_last)
            self.steps = len(self.sizes)
            self.num_local = int(self.sizes[:, rank].sum()) if self.steps else 0
        else:
            self.lo, self.hi = num_images * rank // world, num_images * (rank + 1) // world
            self.num_local = self.hi - self.lo
            self.steps = -(-self.num_local // batch_size)

    def out_size(self, epoch, img_size):
        """The output size of an epoch's train crops (epoch 0 first): the progressive-resizing schedule's, or
        img_size without one; past the schedule's end (a stream read ahead beyond the run), its last size."""
        return self.out_sizes[min(epoch, len(self.out_sizes) - 1)] if self.out_sizes else img_size

    def global_images(self, step):
        """Images in one step across all ranks (the divisor of the step's mean loss)."""
        return int(self.sizes[step].sum()) if self.train else None

    def draw(self, rng):
        """An epoch's images in order: a permutation of the split, or (balanced) as many draws with replacement,
        every class equally likely. The device cache's ranks own fixed shards (images k, k + world, ...): there
        the draws at positions k, k + world, ... come from shard k, so every rank keeps its step sizes."""
        if self.probs is None:
            return rng.permutation(self.num_images)
        if not self.fixed_shard or self.world == 1:
            return rng.choice(self.num_images, size=self.num_images, p=self.probs)
        order = np.empty(self.num_images, dtype=np.int64)
        for shard in range(self.world):
            pool = np.arange(shard, self.num_images, self.world)
            order[pool] = rng.choice(pool, size=len(pool), p=self.probs[pool])
        return order

    def epoch(self, epoch, start_step=0):
        """Yield, for each step from start_step, a dict of numpy arrays: `index` (positions in the split list) and,
        for train, the crop box `y`, `x`, `h`, `w` and `flip` of each image."""
        if not self.train:
            for step in range(start_step, self.steps):
                lo = self.lo + step * self.batch_size
                yield {"index": np.arange(lo, min(lo + self.batch_size, self.hi))}
            return
        rng = np.random.default_rng([self.seed, epoch])
        order = self.draw(rng)
        y, x, h, w = random_resized_crops(self.heights[order], self.widths[order], self.crop_scale, RRC_RATIO, rng)
        flip = rng.random(self.num_images) < 0.5
        if self.fixed_shard:
            mine = np.flatnonzero(order % self.world == self.rank)  # positions of this rank's images, in order
            ends = np.cumsum(self.sizes[:, self.rank])
            bounds = [(mine[e - s:e]) for s, e in zip(self.sizes[:, self.rank], ends)]
        else:
            global_batch = self.batch_size * self.world
            bounds = []
            for step, sizes in enumerate(self.sizes):
                lo = step * global_batch + int(sizes[:self.rank].sum())
                bounds.append(np.arange(lo, lo + sizes[self.rank]))
        for step in range(start_step, self.steps):
            pos = bounds[step]
            yield {"index": order[pos], "y": y[pos], "x": x[pos], "h": h[pos], "w": w[pos], "flip": flip[pos]}
