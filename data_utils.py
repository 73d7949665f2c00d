"""Loaders for the split download.py writes: DALI by default, torchvision/PIL as fallback, or the decoded --cache.

All three yield `(images, labels)` ready for the model: ImageNet-normalized, NCHW shape in channels_last memory
layout (or contiguous with channels_last=False), on the training device, in the AMP dtype; labels are int64.
They follow one splits.SamplePlan, so they draw the same order, crops and flips for the same seed, and under
torchrun each rank gets its part of every step (see splits.step_sizes for what happens to a short last step).

    import data_utils
    train_loader, val_loader, classes = data_utils.build_loaders(data_root="data/Caltech101", img_size=224,
                                                                 batch_size=128, device=torch.device("cuda"))

Train: random-resized crop (scale crop_scale_min-1, ratio 3/4-4/3, as torchvision), resize to img_size (or to the
epoch's size of a progressive-resizing schedule: SamplePlan.out_size), random horizontal flip, normalize.
Val/test: resize the shorter side to img_size*256/224, centre crop, normalize.
"""
import os

import torch

import presets
from kit.base import errors
from kit.data import cache_loader, dali_loader, splits
from kit.settings import resolution


class PlanDataset(torch.utils.data.Dataset):
    """Items are the plan's per-image entries: (index,) for val, (index, y, x, h, w, flip, out size) for train."""

    def __init__(self, root, files, labels, img_size):
        self.root, self.files, self.labels, self.img_size = root, files, labels, img_size
        self.val = splits.val_transform(img_size)

    def __getitem__(self, item):
        from torchvision.transforms import functional as TF

        image = splits.load_rgb(os.path.join(self.root, self.files[item[0]]))
        if len(item) == 1:
            return self.val(image), self.labels[item[0]]
        _, y, x, h, w, flip, size = item
        image = TF.resized_crop(image, y, x, h, w, [size, size],
                                TF.InterpolationMode.BILINEAR, antialias=True)
        if flip:
            image = TF.hflip(image)
        return TF.normalize(TF.to_tensor(image), splits.IMAGENET_MEAN, splits.IMAGENET_STD), self.labels[item[0]]


class PlanBatches:
    """The DataLoader's batch sampler: the plan's steps of one epoch, from a start step, as lists of items."""

    def __init__(self, plan, img_size):
        self.plan, self.img_size, self.epoch, self.start = plan, img_size, 0, 0

    def __len__(self):
        return self.plan.steps - self.start

    def __iter__(self):
        if not self.plan.train:
            for step in self.plan.epoch(self.epoch, self.start):
                yield [(i,) for i in step["index"].tolist()]
            return
        size = self.plan.out_size(self.epoch, self.img_size)
        for step in self.plan.epoch(self.epoch, self.start):
            columns = [step[k].tolist() for k in ("index", "y", "x", "h", "w", "flip")]
            yield list(zip(*columns, [size] * len(columns[0])))


def ignore_sigint(_worker_id):
    """Ctrl-C is the main process's to handle (it saves and stops); workers that also caught it would each print
    their own traceback."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TorchLoader(splits.PlanPosition):
    """A torch DataLoader over the plan (PIL decode and torchvision resize in worker processes), with the DALI
    loader's interface and output. Every image's crop and flip come from the plan, not from worker RNGs, so a
    resume from any step is exact."""
    kind = "torch"

    def __init__(self, image_root, files, labels, plan, img_size, device, dtype=torch.float32, workers=2,
                 channels_last=True, hw_decoder_load=None):  # hw_decoder_load: DALI's decoder only
        self.plan, self.device, self.dtype, self.channels_last = plan, device, dtype, channels_last
        self.num_images = plan.num_local
        self.batches = PlanBatches(plan, img_size)
        self.epoch, self.batches_done = 0, 0
        self.loader = torch.utils.data.DataLoader(
            PlanDataset(image_root, files, labels, img_size), batch_sampler=self.batches, num_workers=workers,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0, worker_init_fn=ignore_sigint)

    def __iter__(self):
        self.batches.epoch, self.batches.start = self.epoch, self.batches_done
        try:
            for images, labels in self.loader:
                self.epoch, self.batches_done = splits.next_position(self.epoch, self.batches_done, self.plan.steps)
                yield splits.to_model_input(images, labels, self.device, self.dtype, self.channels_last)
        except errors.DataError as e:  # from a worker, its message carries the worker's traceback: keep the last line
            raise errors.DataError(str(e).strip().splitlines()[-1].split("errors.DataError: ", 1)[-1]) from None


# name -> loader class (a splits.PlanPosition). presets.CHOICES["loader"] lists the names and "auto"; a test keeps
# them equal.
LOADERS = {"dali": dali_loader.DaliLoader, "torch": TorchLoader}


def choose_loader(loader, device, prefer=None):
    """(loader name, why) for a --loader setting on a device: auto is DALI where it imports and decodes a JPEG there
    (CUDA or the CPU's operators: doctor.py's check), else the torch loader; `prefer` (a resumed run's own loader)
    wins where it runs. An explicit dali that cannot run is a errors.DataError."""
    if loader == "auto":
        if prefer == "torch":
            return "torch", "the run being resumed used it"
        if not dali_loader.HAVE_DALI:
            return "torch", f"DALI is not installed here ({dali_loader.INSTALL})"
        if device.type not in ("cuda", "cpu"):
            return "torch", f"DALI does not run on {device.type}"
        decodes, what = dali_loader.decodes_a_jpeg(device)
        if not decodes:
            return "torch", f"DALI {dali_loader.VERSION} is installed but cannot decode here ({what})"
        return "dali", f"DALI {dali_loader.VERSION} runs on {device.type}"
    if loader == "dali" and dali_loader.HAVE_DALI and device.type not in ("cuda", "cpu"):
        raise errors.DataError(f"--loader dali: DALI does not run on {device.type}; use --loader torch (or auto)")
    return loader, "asked for"


def build_loader(data_root, split, img_size, batch_size, device, dtype=torch.float32, loader="dali", workers=4,
                 seed=0, rank=0, world=1, drop_last=False, crop_scale_min=splits.RRC_SCALE[0], cache=False,
                 channels_last=True, train=None, hw_decoder_load=dali_loader.HW_DECODER_LOAD, out_sizes=None,
                 balanced=False):
    """One loader over one split of a prepared root. `batch_size` is per rank. Train (by default the train split)
    augments and reshuffles every epoch; val/test, or train=False, is the deterministic val transform.
    cache=True decodes the rank's images once (with `loader`'s decoder) and keeps them on the device.
    out_sizes: progressive resizing, the train crop size of every epoch (item 0: the first; None: img_size).
    balanced: train draws with replacement, every class equally likely (--class_balance sampler)."""
    files, labels = splits.read_split(data_root, split)
    return loader_over(splits.image_root(data_root), files, labels, img_size, batch_size, device, dtype=dtype,
                       loader=loader, workers=workers, seed=seed, rank=rank, world=world, drop_last=drop_last,
                       crop_scale_min=crop_scale_min, cache=cache, channels_last=channels_last,
                       train=split == "train" if train is None else train, hw_decoder_load=hw_decoder_load,
                       what=f"the {split} split", out_sizes=out_sizes, balanced=balanced)


def loader_over(root, files, labels, img_size, batch_size, device, dtype=torch.float32, loader="dali", workers=4,
                seed=0, rank=0, world=1, drop_last=False, crop_scale_min=splits.RRC_SCALE[0], cache=False,
                channels_last=True, train=True, hw_decoder_load=dali_loader.HW_DECODER_LOAD, what="the list",
                out_sizes=None, balanced=False):
    """build_loader over a list of files under `root` (paths relative to it) instead of a split."""
    loader = choose_loader(loader, device)[0]
    if loader not in LOADERS:
        raise errors.DataError(f"unknown loader '{loader}': choose one of auto, {', '.join(LOADERS)}")
    # Every header read (and over-limit images refused) before any decoder sees the files: DALI decodes them
    # itself; train crops need the sizes too.
    sizes = splits.image_sizes(root, files)
    plan = splits.SamplePlan(len(files), batch_size, train, seed=seed, rank=rank, world=world,
                             drop_last=drop_last and train, sizes=sizes if train else None,
                             crop_scale=(crop_scale_min, 1.0), fixed_shard=cache,
                             out_sizes=out_sizes if train else None, balance_labels=labels if balanced and train
                             else None)
    if plan.num_local == 0 or plan.steps == 0:
        raise errors.DataError(f"{what} ({len(files)} images) is too small for {world} rank(s) with "
                               f"{batch_size} images each per step")
    common = dict(device=device, dtype=dtype, workers=workers, channels_last=channels_last)
    if cache:
        return cache_loader.CacheLoader(root, files, labels, plan, img_size,
                                        use_dali=loader == "dali" and dali_loader.HAVE_DALI, **common)
    return LOADERS[loader](root, files, labels, plan, img_size, hw_decoder_load=hw_decoder_load, **common)


def build_loaders(data_root, img_size, batch_size, device, dtype=torch.float32, loader="dali", workers=4, seed=0,
                  eval_batch_size=None, rank=0, world=1, drop_last=False, crop_scale_min=splits.RRC_SCALE[0],
                  cache=False, channels_last=True, hw_decoder_load=dali_loader.HW_DECODER_LOAD):
    """(train_loader, val_loader, classes) for a prepared data root; batch sizes are per rank."""
    classes = splits.read_classes(data_root)
    common = dict(img_size=img_size, device=device, dtype=dtype, loader=loader, workers=workers, seed=seed,
                  rank=rank, world=world, cache=cache, channels_last=channels_last, hw_decoder_load=hw_decoder_load)
    train = build_loader(data_root, "train", batch_size=batch_size, drop_last=drop_last,
                         crop_scale_min=crop_scale_min, **common)
    val = build_loader(data_root, "val", batch_size=eval_batch_size or batch_size, **common)
    return train, val, classes


def loader_from_settings(cfg, split, batch_size, device, dtype, rank=0, world=1, train=None, cache=None):
    """build_loader with a run's data settings: the one place each setting of the data path is passed on (a new
    one is added here and in presets.SETTINGS). cache=None: the run's --cache; evaluations of a finished run pass
    False (one pass over a split gains nothing from caching it)."""
    train = split == "train" if train is None else train
    img_size = cfg["img_size"] if train else presets.eval_size(cfg)
    return build_loader(cfg["data_root"], split, img_size, batch_size, device, dtype=dtype,
                        loader=cfg["loader"], workers=cfg["workers"], seed=cfg["seed"], rank=rank, world=world,
                        drop_last=cfg["drop_last"] or cfg["compile"],  # static shapes for torch.compile
                        crop_scale_min=cfg["crop_scale_min"], cache=cfg["cache"] if cache is None else cache,
                        channels_last=cfg["channels_last"], train=train, hw_decoder_load=cfg["hw_decoder_load"],
                        out_sizes=resolution.train_sizes(cfg) if train and cfg.get("img_size_start") else None,
                        balanced=train and cfg.get("class_balance") == "sampler")
