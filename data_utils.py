"""Loaders for the split download.py writes: DALI by default, torchvision/PIL as fallback, or the decoded --cache.

All three yield `(images, labels)` ready for the model: ImageNet-normalized, NCHW shape in channels_last memory
layout (or contiguous with channels_last=False), on the training device, in the AMP dtype; labels are int64.
They follow one sampling.SamplePlan, so they draw the same order, crops and flips for the same seed, and under
torchrun each rank gets its part of every step (see sampling.step_sizes for what happens to a short last step).
Every data setting travels as one record, a sampling.DataSettings (a run's: data_settings(cfg, dtype)).

    import data_utils
    from kit.data.sampling import DataSettings
    train_loader, val_loader, classes = data_utils.build_loaders("data/Caltech101", 128, torch.device("cuda"),
                                                                 DataSettings(img_size=224))

Train: random-resized crop (scale crop_scale_min-1, ratio 3/4-4/3, as torchvision), resize to img_size (or to the
epoch's size of a progressive-resizing schedule: SamplePlan.out_size), random horizontal flip, normalize.
Val/test: resize the shorter side to img_size*256/224, centre crop, normalize.
"""
import dataclasses
import os

import torch

import presets
from kit.base import errors
from kit.data import cache_loader, dali_loader, sampling, splits
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


class TorchLoader(sampling.PlanPosition):
    """A torch DataLoader over the plan (PIL decode and torchvision resize in worker processes), with the DALI
    loader's interface and output. Every image's crop and flip come from the plan, not from worker RNGs, so a
    resume from any step is exact."""
    kind = "torch"

    def __init__(self, image_root, files, labels, plan, device, data=sampling.DataSettings()):
        img_size, workers = data.size(plan.train), data.workers
        self.plan, self.device, self.dtype, self.channels_last = plan, device, data.dtype, data.channels_last
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
                self.epoch, self.batches_done = sampling.next_position(self.epoch, self.batches_done, self.plan.steps)
                yield splits.to_model_input(images, labels, self.device, self.dtype, self.channels_last)
        except errors.DataError as e:  # from a worker, its message carries the worker's traceback: keep the last line
            raise errors.DataError(str(e).strip().splitlines()[-1].split("errors.DataError: ", 1)[-1]) from None


# name -> loader class (a sampling.PlanPosition). presets.CHOICES["loader"] lists the names and "auto"; a test keeps
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


def data_settings(cfg, dtype=torch.float32, cache=None):
    """The run's data settings as one record: the one place each setting of the data path is read from the run's
    settings (a new one is a field of sampling.DataSettings, a line here and an entry in presets.SETTINGS).
    cache=None: the run's --cache; evaluations of a finished run pass False (one pass over a split gains nothing
    from caching it)."""
    return sampling.DataSettings(
        img_size=cfg["img_size"], eval_size=presets.eval_size(cfg),
        out_sizes=tuple(resolution.train_sizes(cfg)) if cfg.get("img_size_start") else (),
        crop_scale_min=cfg["crop_scale_min"], balanced=cfg.get("class_balance") == "sampler",
        drop_last=cfg["drop_last"] or cfg["compile"],  # static shapes for torch.compile
        seed=cfg["seed"], loader=cfg["loader"], cache=cfg["cache"] if cache is None else cache,
        workers=cfg["workers"], hw_decoder_load=cfg["hw_decoder_load"], dtype=dtype,
        channels_last=cfg["channels_last"])


def build_loader(data_root, split, batch_size, device, data=sampling.DataSettings(), rank=0, world=1, train=None):
    """One loader over one split of a prepared root. `batch_size` is per rank. Train (by default the train split)
    augments and reshuffles every epoch; val/test, or train=False, is the deterministic val transform at
    data.size(False). data.cache decodes the rank's images once (with data.loader's decoder) and keeps them on
    the device."""
    files, labels = splits.read_split(data_root, split)
    return loader_over(splits.image_root(data_root), files, labels, batch_size, device, data, rank, world,
                       train=split == "train" if train is None else train, what=f"the {split} split")


def loader_over(root, files, labels, batch_size, device, data=sampling.DataSettings(), rank=0, world=1, train=True,
                what="the list"):
    """build_loader over a list of files under `root` (paths relative to it) instead of a split."""
    loader = choose_loader(data.loader, device)[0]
    if loader not in LOADERS:
        raise errors.DataError(f"unknown loader '{loader}': choose one of auto, {', '.join(LOADERS)}")
    data = dataclasses.replace(data, loader=loader)
    # Every header read (and over-limit images refused) before any decoder sees the files: DALI decodes them
    # itself; train crops need the sizes too.
    sizes = splits.image_sizes(root, files)
    plan = sampling.SamplePlan(len(files), batch_size, train, data, rank, world, sizes=sizes if train else None,
                               labels=labels)
    if plan.num_local == 0 or plan.steps == 0:
        raise errors.DataError(f"{what} ({len(files)} images) is too small for {world} rank(s) with "
                               f"{batch_size} images each per step")
    kind = cache_loader.CacheLoader if data.cache else LOADERS[loader]
    return kind(root, files, labels, plan, device, data)


def build_loaders(data_root, batch_size, device, data=sampling.DataSettings(), eval_batch_size=None, rank=0, world=1):
    """(train_loader, val_loader, classes) for a prepared data root; batch sizes are per rank."""
    train = build_loader(data_root, "train", batch_size, device, data, rank, world)
    val = build_loader(data_root, "val", eval_batch_size or batch_size, device, data, rank, world)
    return train, val, splits.read_classes(data_root)
