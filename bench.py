"""Side-by-side throughput of the kit against the plain way of doing the same job, in one run.

    python bench.py --data_root data/Caltech101                         # data path + train step
    python bench.py --data_root data/Caltech101 --only step --device cuda --json bench.json

Sections (each prints images/s for the kit and the plain baseline, and their ratio):
  data  the DALI train pipeline (random-resized-crop, flip, normalize) against a torchvision ImageFolder + PIL
        DataLoader with RandomResizedCrop + flip + normalize, same image size and threads/workers, over the
        real train split.
  step  one training step of the kit's loop (AMP + channels_last, MixUp/CutMix, AdamW) against plain fp32 NCHW
        with the same model, optimizer, batch and image size, on a fixed batch (no data loading).
Rounds alternate kit and baseline so that machine noise hits both alike; the median round is reported.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

import augment
import data_utils
import model_utils
import train_caltech101 as train


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_images(batches, device):
    """images/s over an iterable of (images, labels), timed with synchronisation."""
    sync(device)
    start, seen = time.perf_counter(), 0
    for images, _ in batches:
        seen += images.shape[0]
    sync(device)
    return seen / (time.perf_counter() - start)


def imagefolder_loader(data_root, img_size, batch_size, workers):
    """The reference scripts' way: ImageFolder over the train split (as a folder of links) + PIL transforms."""
    import torchvision

    files, labels = data_utils.read_split(data_root, "train")
    link_root = tempfile.mkdtemp(prefix="bench-imagefolder-")
    image_root = os.path.abspath(os.path.join(data_root, data_utils.IMAGES_DIR))
    for name in files:
        os.makedirs(os.path.join(link_root, os.path.dirname(name)), exist_ok=True)
        os.symlink(os.path.join(image_root, name), os.path.join(link_root, name))
    T = torchvision.transforms
    transform = T.Compose([T.RandomResizedCrop(img_size, antialias=True), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(data_utils.IMAGENET_MEAN, data_utils.IMAGENET_STD)])
    dataset = torchvision.datasets.ImageFolder(link_root, transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0)
    return loader, link_root


def bench_data(args, device):
    kit = data_utils.build_loader(args.data_root, "train", args.img_size, args.batch_size, device, workers=args.workers,
                                  seed=0)
    plain, link_root = imagefolder_loader(args.data_root, args.img_size, args.batch_size, args.workers)
    kit_rates, plain_rates = [], []
    try:
        for _ in range(args.rounds):
            kit_rates.append(time_images(kit, device))
            plain_rates.append(time_images(plain, device))
    finally:
        shutil.rmtree(link_root, ignore_errors=True)
    return {"kit": statistics.median(kit_rates), "plain": statistics.median(plain_rates),
            "kit_name": f"DALI pipeline ({'mixed' if device.type == 'cuda' else 'CPU'}), {args.workers} threads",
            "plain_name": f"ImageFolder + PIL DataLoader, {args.workers} workers", "images": kit.num_images}


class RepeatBatch:
    """A loader that yields one fixed batch `steps` times: the step is measured without the data path."""

    def __init__(self, images, labels, steps):
        self.images, self.labels, self.steps = images, labels, steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.images, self.labels


def bench_step(args, device):
    amp_dtype, use_scaler = train.resolve_amp(args.amp, device)
    cfg = dict(freeze="none", grad_clip=0.0, log_every=args.steps, progress=False)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=generator)
    labels = torch.randint(0, 101, (args.batch_size,), generator=generator).to(device)

    def setup(channels_last):
        torch.manual_seed(0)
        model = model_utils.get_model(101, arch=args.arch).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model_utils.param_groups(model, 1e-4, 1e-3, 1e-4))
        return model, optimizer

    kit_model, kit_opt = setup(True)
    kit_sched = torch.optim.lr_scheduler.LambdaLR(kit_opt, lambda s: 1.0)
    kit_images = images.to(device, dtype=amp_dtype or torch.float32, memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    mixer = augment.MixupCutmix(101, 0.2, 1.0, seed=0)

    plain_model, plain_opt = setup(False)
    plain_images = images.to(device)

    def kit_round():
        stats = train.train_one_epoch(kit_model, RepeatBatch(kit_images, labels, args.steps), kit_opt, kit_sched,
                                      scaler, mixer, amp_dtype, cfg, epoch=0)
        return stats["train_images_per_s"]

    def plain_round():
        plain_model.train()
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = torch.nn.functional.cross_entropy(plain_model(plain_images), labels)
            plain_opt.zero_grad(set_to_none=True)
            loss.backward()
            plain_opt.step()
        sync(device)
        return args.steps * args.batch_size / (time.perf_counter() - start)

    kit_round(), plain_round()  # warm-up: allocator, oneDNN/cuDNN algorithm selection
    kit_rates, plain_rates = [], []
    for _ in range(args.rounds):
        kit_rates.append(kit_round())
        plain_rates.append(plain_round())
    return {"kit": statistics.median(kit_rates), "plain": statistics.median(plain_rates),
            "kit_name": f"kit step ({amp_dtype}, channels_last, MixUp/CutMix)", "plain_name": "plain fp32 NCHW step"}


def get_args_parser():
    p = argparse.ArgumentParser(description="Side-by-side throughput of the kit against plain baselines.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_root", default="data/Caltech101", help="prepared by download.py")
    p.add_argument("--only", default="data,step", help="comma-separated sections: data, step")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="the kit's AMP mode")
    p.add_argument("--arch", default="resnet18", choices=model_utils.ARCHS)
    p.add_argument("--img_size", type=int, default=224, help="pixels")
    p.add_argument("--batch_size", type=int, default=32, help="images per batch/step")
    p.add_argument("--workers", type=int, default=2, help="DALI threads and DataLoader workers alike")
    p.add_argument("--steps", type=int, default=5, help="train steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="alternating kit/baseline rounds; the median is reported")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p


def main(args):
    device = train.resolve_device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sections = {"data": bench_data, "step": bench_step}
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in sections]
    if unknown:
        raise train.presets.ConfigError(f"unknown section(s) {', '.join(unknown)}; choose from data, step")
    cpu = os.cpu_count()
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{cpu} CPU cores'}), "
          f"torch {torch.__version__}, {args.arch}, {args.img_size} px, batch {args.batch_size}")
    results = {}
    print(f"| section | kit | kit images/s | baseline | baseline images/s | ratio |\n|---|---|---|---|---|---|")
    for name in wanted:
        r = sections[name](args, device)
        r["ratio"] = r["kit"] / r["plain"]
        results[name] = r
        print(f"| {name} | {r['kit_name']} | {r['kit']:.1f} | {r['plain_name']} | {r['plain']:.1f} | "
              f"{r['ratio']:.2f}x |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "args": vars(args), "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (train.presets.ConfigError, data_utils.DataError, model_utils.ModelError) as e:
        sys.exit(f"error: {e}")
