"""Side-by-side throughput of the kit against the plain way of doing the same job, in one run.

    python bench.py --data_root data/Caltech101                                  # every section, all images
    python bench.py --data_root data/Caltech101 --images 384 --compile           # a few minutes on a CPU
    python bench.py --data_root data/Caltech101 --only step,e2e --device cuda --json bench.json

Sections (each prints images/s for the kit and the plain baseline, and their ratio):
  data  the DALI train pipeline (random-resized-crop, flip, normalize), and the --cache path after its one
        decode pass, against a torchvision ImageFolder + PIL DataLoader with RandomResizedCrop + flip +
        normalize, same image size and threads/workers, over the train split. A ceiling row times the DALI
        pipeline's first step alone (decode of the random crop): what no DALI pipeline here can beat.
  step  one training step of the kit (AMP + channels_last, MixUp/CutMix, fused AdamW; --compile adds a
        torch.compile row) against plain fp32 NCHW with the same model, optimizer, batch and image size, on a
        fixed batch (no data loading).
  e2e   a whole training epoch: the kit's train_one_epoch fed by DALI and by the cache, against
        bench_baselines.reference_epoch() (ImageFolder + PIL DataLoader, fp32 NCHW, same model, optimizer and
        batch). The cache row also
        gives the share of the epoch spent producing batches.
  eval  the kit's evaluate() (DALI val pipeline, AMP, channels_last) against a plain fp32 NCHW loop over an
        ImageFolder + PIL DataLoader with Resize + CenterCrop.
  infer onnxruntime (CPU) on the exported model, and eager PyTorch in the kit's precision, against eager fp32 at
        batch 1 and 64 over the same 64 real val images (deployment speed).
  overhead  what an epoch pays besides its steps, as a share of them: writing last.pth (synchronously, and the
        training thread's stall with the background writer), and one val evaluation.
  recipes  (asked for by name, not in the default: it trains whole runs) two training recipes, one after the
        other on the same data: the wall time each needs to first reach --target val top-1 (from its evaluations;
        a recipe's --eval_every sets how finely that is seen), and their ratio.
        python bench.py --only recipes --data_root DATA --target 0.65 \
            --recipes "--exp cpu_smoke --img_size_start 0" "--exp cpu_smoke"
  serve  (by name) serve.py with dynamic batching against one model call per request, both started here on
        localhost ports, at 1, 8 and 32 concurrent clients: requests/s, and latency p50/p95/p99 (kit/serving).
        python bench.py --only serve --data_root DATA --serve_checkpoint checkpoints/cpu_smoke
--images N uses a fixed random subset of N images of each split (0: all of them); the data section always uses
the whole train split. Rounds alternate kit and baseline so that machine noise hits both alike; the median round
is reported. Timing synchronises CUDA before reading the clock.
"""
import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import augment
import data_utils
import model_utils
import presets
from kit.base import devices, errors
from kit.data import cache_loader, sampling, splits
from kit.reporting.bench_baselines import (
    DecodeOnly,
    PlainLoader,
    RepeatBatch,
    plain_model,
    reference_epoch,
    sync,
    time_images,
)
from kit.serving import loadgen
from kit.settings import settings_cli
from kit.training import checkpoint, engine, metrics

SECTIONS = ("data", "step", "e2e", "eval", "infer", "overhead")  # the default: throughput
BY_NAME = ("recipes", "serve")  # only when asked for: whole training runs; the HTTP service under load


def split_subset(data_root, split, images):
    """(files, labels) of a split, or a fixed random subset of `images` of them (0: all)."""
    files, labels = splits.read_split(data_root, split)
    if 0 < images < len(files):
        keep = np.sort(np.random.default_rng(0).permutation(len(files))[:images])
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    return files, labels


def kit_settings(args):
    """The settings the kit's own builders get here: the bench's flags over the defaults, from scratch."""
    return presets.resolve(overrides=dict(arch=args.arch, img_size=args.img_size, amp=args.amp, workers=args.workers,
                                          data_root=args.data_root, pretrained=False, optimizer="adamw",
                                          lr_backbone=1e-4, lr_fc=1e-3, weight_decay=1e-4))


def kit_loader(args, device, files, labels, train_split, cache, batch_size):
    """The kit's DALI or cache loader (data_utils' own builder) over a list of files (the data section uses the
    whole train split)."""
    return data_utils.loader_over(splits.image_root(args.data_root), files, labels, batch_size, device,
                                  bench_data_settings(args, device, cache), train=train_split)


def bench_data_settings(args, device, cache):
    amp_dtype, _ = devices.resolve_amp(args.amp, device)
    return sampling.DataSettings(img_size=args.img_size, loader="dali", cache=cache, workers=args.workers,
                                 dtype=amp_dtype or torch.float32)


def median_rounds(rounds, **variants):
    """Run each variant once per round, alternating; {name: median result}."""
    results = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            results[name].append(fn())
    return {name: statistics.median(values) for name, values in results.items()}


def row(name, kit_name, kit, plain_name, plain, **extra):
    return dict(section=name, kit_name=kit_name, kit=kit, plain_name=plain_name, plain=plain, ratio=kit / plain,
                **extra)


def path(cache):
    """Which of the cache's two train paths a CacheLoader takes, and whether it is this device's default."""
    default = cache.per_image == (cache.device.type == "cpu")
    return ("crops one by one (uint8 resize)" if cache.per_image else "fixed ops per batch (pyramid)") + \
        ("" if default else ", not this device's default")


def bench_data(args, device):
    files, labels = split_subset(args.data_root, "train", args.images)
    dali = kit_loader(args, device, files, labels, True, False, args.batch_size)
    cache = kit_loader(args, device, files, labels, True, True, args.batch_size)
    # The kit's other cache path, timed where it is not the default: on a CPU the fixed-ops batch path a GPU runs,
    # on a GPU the one-by-one path a CPU runs.
    other = cache_loader.CacheLoader(splits.image_root(args.data_root), files, labels, cache.plan, device,
                                     bench_data_settings(args, device, True), per_image=not cache.per_image)
    decode = DecodeOnly(args.data_root, files, args.batch_size, args.workers, device)
    with PlainLoader(args.data_root, files, args.img_size, args.batch_size, args.workers, True,
                     pin_memory=device.type == "cuda") as plain:
        def plain_on_device():  # the reference loop's copy to the device, as a training loop makes it
            return time_images(((x.to(device, non_blocking=True), y) for x, y in plain), device)

        for loader in (dali, cache, other, decode):  # warm-up pass: worker start-up, page cache, allocator
            time_images(loader, device)
        plain_on_device()
        def settled(timed):
            """DALI pipelines decode ahead (their prefetch queue) after a timed pass ends, on the same cores: a
            pause lets that finish before the next loader's clock starts (a cached epoch takes tens of ms)."""
            def run():
                time.sleep(0.5)
                return timed()
            return run

        rates = median_rounds(args.rounds, dali=settled(lambda: time_images(dali, device)),
                              cache=settled(lambda: time_images(cache, device)),
                              other=settled(lambda: time_images(other, device)),
                              decode=settled(lambda: time_images(decode, device)), plain=settled(plain_on_device))
    plain_name = f"ImageFolder + PIL DataLoader, {args.workers} workers"
    where = "mixed" if device.type == "cuda" else "CPU"
    return [row("data", f"DALI pipeline ({where}), {args.workers} threads", rates["dali"], plain_name, rates["plain"],
                images=len(files)),
            *(row("data", f"--cache, {path(c)} (after a {c.decode_seconds:.1f}s decode pass, "
                          f"{c.nbytes / 2**20:.0f} MiB)", rates[name], plain_name, rates["plain"], images=len(files),
                  decode_seconds=c.decode_seconds, cache_mib=c.nbytes / 2 ** 20)
              for name, c in (("cache", cache), ("other", other))),
            row("data", "ceiling: the DALI pipeline's decode step alone (no resize/flip/normalise)", rates["decode"],
                plain_name, rates["plain"], images=len(files))]


def make_model(args, device):
    """(model, optimizer) from the kit's own builder (engine.build_model): channels_last, fused AdamW."""
    torch.manual_seed(0)
    return engine.build_model(kit_settings(args), 101, device, quiet=True)[:2]


def kit_trainer(args, device, compile_model=False, guard_bn=True):
    """A function(loader) -> train_one_epoch statistics, with the kit's model, optimizer, AMP and mixing
    (guard_bn=False: without the BatchNorm restore that makes a skipped step leave no trace)."""
    amp_dtype, use_scaler = devices.resolve_amp(args.amp, device)
    model, optimizer = make_model(args, device)
    step_model = torch.compile(model) if compile_model else model
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    mixer = augment.MixupCutmix(101, 0.2, 1.0, seed=0)
    cfg = dict(grad_clip=0.0, log_every=10 ** 9, progress=False)
    return lambda loader: engine.train_one_epoch(checkpoint.Parts(model, optimizer, scheduler, scaler, mixer, loader),
                                                amp_dtype, cfg, 0, step_model, guard_bn=guard_bn)


def bench_step(args, device):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=generator)
    labels = torch.randint(0, 101, (args.batch_size,), generator=generator).to(device)
    amp_dtype, _ = devices.resolve_amp(args.amp, device)
    kit_images = images.to(device, dtype=amp_dtype or torch.float32, memory_format=torch.channels_last)
    baseline, baseline_opt = plain_model(args.arch, device)
    plain_batches = RepeatBatch(images.to(device), labels, args.steps)
    variants = {"kit": kit_trainer(args, device), "unguarded": kit_trainer(args, device, guard_bn=False)}
    if args.compile:
        variants["compiled"] = kit_trainer(args, device, compile_model=True)
    rounds = {name: (lambda t=trainer: t(RepeatBatch(kit_images, labels, args.steps))["train_images_per_s"])
              for name, trainer in variants.items()}
    rounds["plain"] = lambda: reference_epoch(baseline, baseline_opt, plain_batches, device)
    for fn in rounds.values():  # warm-up: allocator, oneDNN/cuDNN algorithm choice, compilation
        fn()
    rates = median_rounds(args.rounds, **rounds)
    kit_name = f"kit step ({amp_dtype}, channels_last, MixUp/CutMix)"
    rows = [row("step", kit_name, rates["kit"], "plain fp32 NCHW step", rates["plain"]),
            row("step", "kit step (BatchNorm statistics restored on a skipped step)", rates["kit"],
                "kit step without that restore", rates["unguarded"])]
    if args.compile:
        rows.append(row("step", kit_name + " + torch.compile", rates["compiled"], "plain fp32 NCHW step",
                        rates["plain"]))
    return rows


def bench_e2e(args, device):
    files, labels = split_subset(args.data_root, "train", args.images)
    dali = kit_loader(args, device, files, labels, True, False, args.batch_size)
    cache = kit_loader(args, device, files, labels, True, True, args.batch_size)
    kit_dali, kit_cache = kit_trainer(args, device), kit_trainer(args, device)
    baseline, baseline_opt = plain_model(args.arch, device)
    with PlainLoader(args.data_root, files, args.img_size, args.batch_size, args.workers, True,
                     pin_memory=device.type == "cuda") as plain:
        rounds = dict(dali=lambda: kit_dali(dali)["train_images_per_s"],
                      cache=lambda: kit_cache(cache)["train_images_per_s"],
                      cache_data=lambda: time_images(cache, device),
                      plain=lambda: reference_epoch(baseline, baseline_opt, plain, device))
        rates = median_rounds(args.rounds, **rounds)
    plain_name = "reference loop (ImageFolder + PIL, fp32 NCHW)"
    data_share = rates["cache"] / rates["cache_data"]  # data-only time over whole-epoch time
    return [row("e2e", "kit epoch, DALI", rates["dali"], plain_name, rates["plain"], images=len(files),
                epoch_s=len(files) / rates["dali"], plain_epoch_s=len(files) / rates["plain"]),
            row("e2e", f"kit epoch, --cache (data path {100 * data_share:.1f}% of the epoch)", rates["cache"],
                plain_name, rates["plain"], images=len(files), epoch_s=len(files) / rates["cache"],
                plain_epoch_s=len(files) / rates["plain"], cache_data_share=data_share)]


def bench_eval(args, device):
    files, labels = split_subset(args.data_root, "val", args.images)
    amp_dtype, _ = devices.resolve_amp(args.amp, device)
    val = kit_loader(args, device, files, labels, False, False, args.eval_batch_size)
    kit_model, _ = make_model(args, device)
    baseline, _ = plain_model(args.arch, device)

    @torch.no_grad()
    def plain_eval(loader):
        baseline.eval()
        sync(device)
        start, seen = time.perf_counter(), 0
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            baseline(images).argmax(1).eq(labels).sum()
            seen += images.shape[0]
        sync(device)
        return seen / (time.perf_counter() - start)

    with PlainLoader(args.data_root, files, args.img_size, args.eval_batch_size, args.workers, False,
                     pin_memory=device.type == "cuda") as plain:
        kit_eval = lambda: engine.evaluate(kit_model, val, 101, amp_dtype)["val_images_per_s"]  # noqa: E731
        rates = median_rounds(args.rounds, kit=kit_eval, plain=lambda: plain_eval(plain))
    return [row("eval", f"kit evaluate (DALI val, {amp_dtype}, channels_last)", rates["kit"],
                "plain fp32 NCHW, ImageFolder + PIL", rates["plain"], images=len(files))]


def bench_infer(args, device):
    """Deployment inference on the CPU: onnxruntime on the exported model against eager PyTorch (fp32 NCHW, and the
    kit's bf16 channels_last), at batch 1 and 64, over the same real val images."""
    import onnxruntime

    from kit.models import exporter

    files, _ = split_subset(args.data_root, "val", 64)
    root = splits.image_root(args.data_root)
    transform = splits.val_transform(args.img_size)
    images = torch.stack([transform(splits.load_rgb(os.path.join(root, f))) for f in files])
    torch.manual_seed(0)
    model = model_utils.get_model(101, arch=args.arch).eval()
    kit = model_utils.get_model(101, arch=args.arch).eval().to(memory_format=torch.channels_last)
    kit.load_state_dict(model.state_dict())
    amp_dtype, _ = devices.resolve_amp(args.amp, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as folder:
        path = exporter.write_onnx(model, args.img_size, os.path.join(folder, "model.onnx"))
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def rate(fn, batch):
        start, seen = time.perf_counter(), 0
        with torch.inference_mode():
            for i in range(0, len(images), batch):
                fn(images[i:i + batch])
                seen += len(images[i:i + batch])
        return seen / (time.perf_counter() - start)

    def kit_forward(x):
        with devices.autocast(torch.device("cpu"), amp_dtype):
            return kit(x.contiguous(memory_format=torch.channels_last))

    rows = []
    for batch in (1, 64):
        variants = dict(onnx=lambda b=batch: rate(lambda x: session.run(None, {"images": x.numpy()}), b),
                        kit=lambda b=batch: rate(kit_forward, b), eager=lambda b=batch: rate(model, b))
        for fn in variants.values():  # warm-up: thread pools, kernel choice
            fn()
        rates = median_rounds(args.rounds, **variants)
        plain = f"eager PyTorch fp32 NCHW, batch {batch}"
        rows += [row("infer", f"onnxruntime CPU, batch {batch}", rates["onnx"], plain, rates["eager"],
                     images=len(files)),
                 row("infer", f"eager PyTorch {amp_dtype} channels_last, batch {batch}", rates["kit"], plain,
                     rates["eager"], images=len(files))]
    return rows


def bench_overhead(args, device):
    """What a training epoch pays besides its steps: writing last.pth (synchronously, and the training thread's
    share with the background writer), and a val evaluation, relative to the steps of one train epoch."""
    from kit.training import checkpoint

    model, optimizer = make_model(args, device)
    amp_dtype, _ = devices.resolve_amp(args.amp, device)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device).to(
        memory_format=torch.channels_last, dtype=amp_dtype or torch.float32)
    labels = torch.randint(0, 101, (args.batch_size,), device=device)
    mixer = augment.MixupCutmix(101, seed=0)
    scaler = torch.amp.GradScaler(device.type, enabled=False)

    def steps():
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.train_step(model, images, labels, optimizer, scaler, mixer, amp_dtype)
        sync(device)
        return (time.perf_counter() - start) / args.steps / args.batch_size

    def forward():
        model.eval()
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode(), devices.autocast(device, amp_dtype):
            for _ in range(args.steps):
                model(images)
        sync(device)
        model.train()
        return (time.perf_counter() - start) / args.steps / args.batch_size

    steps(), forward()  # warm-up
    train_s, eval_s = statistics.median(steps() for _ in range(args.rounds)), \
        statistics.median(forward() for _ in range(args.rounds))
    state = {"model": model_utils.export_state_dict(model), "optimizer": optimizer.state_dict()}
    writer = checkpoint.BackgroundWriter()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "last.pth")

        def sync_write():
            start = time.perf_counter()
            checkpoint.save_atomic(state, path)
            return time.perf_counter() - start

        def background_stall():
            start = time.perf_counter()
            writer.submit(state, path)
            stall = time.perf_counter() - start
            writer.wait()
            return stall

        write_s = statistics.median(sync_write() for _ in range(args.rounds))
        stall_s = statistics.median(background_stall() for _ in range(args.rounds))
        size_mb = os.path.getsize(path) / 1e6
    train_epoch = train_s * 3030  # Caltech-101's default split: 3,030 train and 5,647 val images
    val_epoch = eval_s * 5647
    return [dict(section="overhead", kit_name=f"last.pth ({size_mb:.0f} MB): write + fsync, s", kit=write_s,
                 plain_name="train epoch steps, s", plain=train_epoch, ratio=write_s / train_epoch),
            dict(section="overhead", kit_name="last.pth, background writer: training thread's stall, s", kit=stall_s,
                 plain_name="train epoch steps, s", plain=train_epoch, ratio=stall_s / train_epoch),
            dict(section="overhead", kit_name="val evaluation (5,647 images), s", kit=val_epoch,
                 plain_name="train epoch steps (3,030 images), s", plain=train_epoch, ratio=val_epoch / train_epoch)]


def bench_recipes(args, device):
    """Recipe A (the baseline) then recipe B, each a whole training run from its own flags (train_caltech101's);
    --data_root fills in a recipe's data unless it names its own. Device and precision are the recipes'."""
    from kit.training import runs, training

    parser = settings_cli.settings_parser("a training recipe")
    seconds, names = [], []
    with tempfile.TemporaryDirectory() as out_dir:
        for k, flags in enumerate(args.recipes):
            exp, config, overrides, _ = settings_cli.settings_from_args(parser.parse_args(shlex.split(flags)))
            overrides = {"data_root": args.data_root, **overrides, "out_dir": out_dir, "name": f"recipe_{k}",
                         "progress": False}
            cfg = presets.resolve(exp, overrides, config=config)
            print(f"recipe {'AB'[k]}: {flags}", flush=True)
            result = training.main(cfg)
            records = metrics.time_to_reach(runs.read_metrics(result["out_dir"]))
            print(f"recipe {'AB'[k]}: {metrics.describe_time_to_reach(records)}", flush=True)
            reached = [r["wall_time_s"] for r in records if r["val_top1"] >= args.target]
            seconds.append(reached[0] if reached else float("inf"))
            names.append(f"recipe {'AB'[k]} ({flags}): s to val top-1 {args.target}"
                         + ("" if reached else f" (not reached; best {records[-1]['val_top1']:.4f})"
                            if records else " (never evaluated)"))
    return [dict(section="recipes", kit_name=names[1], kit=seconds[1], plain_name=names[0], plain=seconds[0],
                 ratio=seconds[0] / seconds[1])]


def bench_serve(args, device):
    """serve.py's requests/s with dynamic batching against one model call per request (loadgen.compare_batching), on
    64 real val images sent one per request, at concurrency 1, 8 and 32; latency percentiles printed below."""
    if not args.serve_checkpoint:
        raise errors.ConfigError("--only serve needs --serve_checkpoint (a run folder, a .safetensors file or a "
                                 "model.onnx)")
    root = splits.image_root(args.data_root)
    bodies = [(open(os.path.join(root, f), "rb").read(), "image/jpeg") for f in split_subset(args.data_root, "val",
                                                                                             64)[0]]
    table = loadgen.compare_batching(args.serve_checkpoint, bodies, requests=args.serve_requests)
    for r in table:
        print(f"serve: {r['service']}, concurrency {r['concurrency']}: {r['requests_per_s']:.1f} requests/s, latency "
              f"p50 {r['p50_ms']:.0f} / p95 {r['p95_ms']:.0f} / p99 {r['p99_ms']:.0f} ms, {r['errors']} errors",
              flush=True)
    by = {(r["service"], r["concurrency"]): r for r in table}
    return [row("serve", f"dynamic batching, {c} concurrent clients (requests/s)", by["batching", c]["requests_per_s"],
                "one model call per request", by["no batching", c]["requests_per_s"], batching=by["batching", c],
                no_batching=by["no batching", c]) for c in sorted({r["concurrency"] for r in table})]


def get_args_parser():
    p = argparse.ArgumentParser(description="Side-by-side throughput of the kit against plain baselines.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_root", default="data/Caltech101", help="prepared by download.py")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help="comma-separated sections: " + ", ".join(SECTIONS + BY_NAME))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="the kit's AMP mode")
    p.add_argument("--arch", default="resnet18", choices=model_utils.ARCHS)
    p.add_argument("--img_size", type=int, default=224, help="pixels")
    p.add_argument("--batch_size", type=int, default=None,
                   help="images per training batch/step (default: 32 on a CPU, 256 on a GPU)")
    p.add_argument("--eval_batch_size", type=int, default=None, help="images per evaluation batch (default: twice "
                                                                     "--batch_size)")
    p.add_argument("--workers", type=int, default=None,
                   help="DALI threads and DataLoader workers alike (default: 2 on a CPU, up to 8 on a GPU)")
    p.add_argument("--steps", type=int, default=5, help="train steps per timed round of the step section")
    p.add_argument("--images", type=int, default=0,
                   help="e2e/eval: a fixed random subset of this many images per split (0: the whole split)")
    p.add_argument("--rounds", type=int, default=3, help="alternating kit/baseline rounds; the median is reported")
    p.add_argument("--compile", action="store_true", help="also time the kit's step with torch.compile")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--recipes", nargs=2, metavar=("A", "B"),
                   default=["--exp cpu_smoke --img_size_start 0", "--exp cpu_smoke"],
                   help="recipes: the baseline's and the contender's training flags, each one quoted string")
    p.add_argument("--target", type=float, default=0.65, help="recipes: the val top-1 to reach")
    p.add_argument("--serve_checkpoint", default=None, help="serve: what serve.py serves (run folder, .safetensors, "
                                                            "model.onnx)")
    p.add_argument("--serve_requests", type=int, default=200, help="serve: requests per service and concurrency")
    return p


def main(args):
    device = devices.resolve_device(args.device)
    on_gpu = device.type == "cuda"  # defaults that feed a GPU: a big batch and more decoder threads
    args.batch_size = args.batch_size or (256 if on_gpu else 32)
    args.eval_batch_size = args.eval_batch_size or 2 * args.batch_size
    args.workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 2) if on_gpu else 2)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS + BY_NAME]
    if unknown:
        raise errors.ConfigError(f"unknown section(s) {', '.join(unknown)}; choose from "
                                  f"{', '.join(SECTIONS + BY_NAME)}")
    for name in ("img_size", "batch_size", "eval_batch_size", "workers", "steps", "rounds", "serve_requests"):
        if getattr(args, name) < 1:
            raise errors.ConfigError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"device {device} ({where}), torch {torch.__version__}, {args.arch}, {args.img_size} px, "
          f"batch {args.batch_size} (eval {args.eval_batch_size}), {args.workers} workers/threads, "
          f"median of {args.rounds} rounds")
    print("| section | kit | kit images/s | baseline | baseline images/s | ratio |\n|---|---|---|---|---|---|")
    results = []
    for name in wanted:
        for r in globals()[f"bench_{name}"](args, device):
            results.append(r)
            print(f"| {name} | {r['kit_name']} | {r['kit']:.4g} | {r['plain_name']} | {r['plain']:.4g} | "
                  f"{r['ratio']:.2f}x |", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": str(device), "where": where, "torch": torch.__version__, "args": vars(args),
                       "results": results}, f, indent=2)
    return results


def cli(argv=None):
    return errors.run_cli(lambda args: main(args) and 0, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
