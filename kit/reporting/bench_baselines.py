"""What bench.py measures the kit against, and how it times: the plain ways of doing the same jobs (a torchvision
ImageFolder + PIL DataLoader, the plain fp32 NCHW training epoch), the ceiling it reports beside them (the DALI
pipeline's decode step alone), a fixed-batch loader for timing the step without data, and synchronised timing.
Run bench.py; this module only supplies it.
"""
import os
import shutil
import tempfile
import time

import torch
import torch.nn.functional as F

import model_utils
from kit.data import dali_loader, sampling, splits


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_images(batches, device):
    """images/s over an iterable of (images, labels), timed with synchronisation."""
    sync(device)
    start, seen = time.perf_counter(), 0
    for images, _ in batches:
        seen += len(images)
    sync(device)
    return seen / (time.perf_counter() - start)


class PlainLoader:
    """The reference scripts' way: torchvision ImageFolder (over a folder of links to the listed files) + PIL
    transforms + DataLoader. Use as a context manager; the links are removed at exit."""

    def __init__(self, data_root, files, img_size, batch_size, workers, train, pin_memory=False):
        import torchvision

        self.link_root = tempfile.mkdtemp(prefix="bench-imagefolder-")
        image_root = os.path.abspath(splits.image_root(data_root))
        for name in files:
            os.makedirs(os.path.join(self.link_root, os.path.dirname(name)), exist_ok=True)
            os.symlink(os.path.join(image_root, name), os.path.join(self.link_root, name))
        T = torchvision.transforms
        spatial = [T.RandomResizedCrop(img_size, antialias=True), T.RandomHorizontalFlip()] if train else \
            [T.Resize(splits.resize_size(img_size), antialias=True), T.CenterCrop(img_size)]
        transform = T.Compose(spatial + [T.ToTensor(), T.Normalize(splits.IMAGENET_MEAN, splits.IMAGENET_STD)])
        dataset = torchvision.datasets.ImageFolder(self.link_root, transform)
        # pin_memory: the reference scripts' setting, so the baseline's copies to a GPU do not block either.
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=train, num_workers=workers,
                                                  persistent_workers=workers > 0, pin_memory=pin_memory)
        self.num_images = len(dataset)

    def __iter__(self):
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.link_root, ignore_errors=True)


class DecodeOnly:
    """The DALI train pipeline's first step alone (JPEG decode of the plan's crop boxes, variable-size uint8, no
    resize, flip or normalise): a ceiling for the whole pipeline on this device. Iterates one epoch of (images,
    None); the stream runs on into the next epoch, as the kit's does."""

    def __init__(self, data_root, files, batch_size, workers, device):
        root = splits.image_root(data_root)
        plan = sampling.SamplePlan(len(files), batch_size, True, sizes=splits.image_sizes(root, files))
        self.pipe = dali_loader.first_step_pipe(root, files, plan, device, workers, train=True)
        self.root, self.files, self.steps, self.num_images = root, files, plan.steps, len(files)

    def __iter__(self):
        for images in dali_loader.epoch_batches(self.pipe, self.steps, self.root, self.files):
            yield images, None


class RepeatBatch:
    """A loader that yields one fixed batch `steps` times: the step is measured without the data path."""

    def __init__(self, images, labels, steps):
        self.images, self.labels, self.steps = images, labels, steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.images, self.labels


def plain_model(arch, device):
    """The baseline's model and optimizer: plain fp32 NCHW, the unfused AdamW, the same initialisation and LRs as
    bench.make_model."""
    torch.manual_seed(0)
    model = model_utils.get_model(101, arch=arch).to(device)
    return model, torch.optim.AdamW(model_utils.param_groups(model, 1e-4, 1e-3, 1e-4), fused=False)


def reference_epoch(model, optimizer, loader, device):
    """The plain loop the kit is measured against: fp32, NCHW, host batches copied in, no AMP. images/s."""
    model.train()
    sync(device)
    start, seen = time.perf_counter(), 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += images.shape[0]
    sync(device)
    return seen / (time.perf_counter() - start)
