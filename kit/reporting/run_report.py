"""What a run tells its user: the model printout (--print_model), the derived quantities at start-up, a duration
estimate, the epoch line with its ETA, and the final train / val / test table of best.pth (summary.json).

    run_report.describe(cfg, rt, parts, val_loader, total_steps, warmup_steps, run_dir, print)   # world size,
                                       # batches, steps, every parameter group's peak LR
    summary = run_report.summary(...)  # best.pth's figures on train (val transform), val and test -> summary.json
"""
import copy
import math
import sys
import time

import numpy as np
import torch

import model_utils
import presets
from kit.base import devices, distributed
from kit.data import splits
from kit.models import archs
from kit.settings import resolution
from kit.training import metrics


def print_model(cfg, num_classes):
    base = model_utils.torchvision.models.get_model(cfg["arch"], weights=None)
    adapted = model_utils.get_model(num_classes, pretrained=False, arch=cfg["arch"])
    model_utils.apply_freeze(adapted, cfg["trainable"])
    anatomy = archs.anatomy_of(adapted)
    print(f"base model ({cfg['arch']}, ImageNet-shaped):\n{base}\n")
    print(f"adapted model ({num_classes} classes):\n{adapted}\n")
    old, new = anatomy.head_linear(base), anatomy.head_linear(adapted)
    print(f"the head: {anatomy.classifier} {old.in_features} -> {old.out_features} replaced by {anatomy.classifier} "
          f"{new.in_features} -> {new.out_features}" + (f" (the head is all of {anatomy.head}, trained at lr_fc)"
                                                        if anatomy.head != anatomy.classifier else ""))
    trains = sorted({anatomy.stage_of(n) for n, p in adapted.named_parameters() if p.requires_grad},
                    key=anatomy.stages.index)
    count = sum(p.numel() for p in adapted.parameters())
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    print(f"trainable={cfg['trainable']}: {', '.join(trains)} train; {trainable:,} of {count:,} parameters "
          f"({100 * trainable / count:.1f}%); base model {sum(p.numel() for p in base.parameters()):,} parameters")
    return {"exit_code": 0}


def epoch_line(cfg, epoch, stats, row, stopper, ema, run_start, state):
    line = (f"epoch {epoch}/{cfg['epochs']}: train loss {stats['train_loss']:.4f} acc {stats['train_acc']:.4f} "
            f"({stats['train_images_per_s']:.0f} img/s)")
    if "gpu_peak_mem_gib" in stats:
        line += f" peak mem {stats['gpu_peak_mem_gib']:.2f} GiB"
    val = metrics.of_split(row, "val")
    if val:
        line += (f" | val{' (EMA)' if ema is not None else ''} {metrics.describe(val)}"
                 + (f" (raw top-1 {row['raw_val_top1']:.4f})" if "raw_val_top1" in row else "")
                 + f" (best {cfg['monitor']} {stopper.best:.4f} @ {stopper.best_epoch})")
    remaining = eta_seconds(cfg, epoch, state["rows"], state["next_epoch"], time.perf_counter() - run_start)
    return line + f" | {row['wall_time_s']:.0f}s, ETA {format_duration(remaining)}"


def eta_seconds(cfg, epoch, rows, first_epoch, elapsed):
    """What the rest of the run will take, from this process's epochs so far (first_epoch on; `elapsed` seconds):
    training time per unit of pixels (an epoch's cost follows its train size under progressive resizing) times
    the pixels to come, plus the evaluations to come at the mean time of those so far, plus the rest (saving,
    start-up) per epoch."""
    cost = [(size / cfg["img_size"]) ** 2 for size in resolution.train_sizes(cfg)]
    mine = [r for r in rows if r["epoch"] >= first_epoch]
    train_s = sum(r["train_time_s"] for r in mine)
    evals = [r["val_images"] / r["val_images_per_s"] for r in mine if r.get("val_images_per_s")]
    evals_left = sum(1 for e in range(epoch + 1, cfg["epochs"] + 1) if e % cfg["eval_every"] == 0
                     or e == cfg["epochs"])
    rest_per_epoch = max(elapsed - train_s - sum(evals), 0.0) / max(len(mine), 1)
    return (train_s / max(sum(cost[r["epoch"] - 1] for r in mine), 1e-9) * sum(cost[epoch:])
            + (sum(evals) / len(evals) if evals else 0.0) * evals_left + rest_per_epoch * (cfg["epochs"] - epoch))


def format_duration(seconds):
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe(cfg, rt, parts, val_loader, total_steps, warmup_steps, run_dir, log):
    """The derived quantities of the run, printed once: rt is the process's devices.Runtime, parts the run's
    checkpoint.Parts (model, optimizer, train loader, EMA)."""
    model, train_loader, ema, world = parts.model, parts.loader, parts.ema, rt.world
    steps_per_epoch = len(train_loader)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"run folder {run_dir}")
    log(f"device {rt.device}, amp {rt.amp_dtype}, grad scaler {rt.use_scaler}, channels_last {cfg['channels_last']}, "
        f"loader {train_loader.kind}, torch.compile {cfg['compile']}"
        + (f" ({cfg['compile_mode']}; {len(set(resolution.train_sizes(cfg))) + 1} graphs: one per train size and one "
           f"for evaluation; the short last train step is dropped for static shapes)" if cfg["compile"] else ""))
    log(f"processes: world size {world}, per-rank batch {rt.batch}, global batch {rt.batch * world}")
    plain = model_utils.unwrap(model)
    log(f"data: {archs.anatomy_of(plain).head_linear(plain).out_features} classes, "
        f"{train_loader.num_images * world} train ({train_loader.num_images} per rank) / "
        f"{val_loader.plan.num_images} val images; train crops {cfg['img_size']} px, val centre crops "
        f"{presets.eval_size(cfg)} px")
    plan = train_loader.plan
    left_out = plan.num_images - int(plan.sizes.sum())
    if left_out:
        log(f"each epoch leaves out {left_out} of its {plan.num_images} train draws: the short last step "
            + ("(drop_last)" if cfg["drop_last"] else "would give a rank fewer than 2 images, which BatchNorm cannot "
                                                      "train on"))
    if plan.class_shares is not None and np.ptp(plan.class_shares) > 1e-3:
        log(f"note: --class_balance sampler with --cache on {world} ranks: each rank draws from the images it holds, "
            f"which give the classes shares of {plan.class_shares.min():.3f} to {plan.class_shares.max():.3f} "
            f"instead of {1 / len(plan.class_shares):.3f} each")
    sizes = resolution.train_sizes(cfg)
    if len(set(sizes)) > 1:
        share = sum(size ** 2 for size in sizes) / (cfg["img_size"] ** 2 * len(sizes))
        log(f"progressive resizing: train crops {resolution.describe_sizes(sizes)} ({share:.0%} of the pixels of "
            f"{cfg['img_size']} px throughout)")
    init = cfg["weights"] or ("ImageNet" if cfg["pretrained"] else "scratch")
    log(f"model: {cfg['arch']} ({init} init), {n_params / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable "
        f"(trainable={cfg['trainable']}" + (f" for {cfg['freeze_epochs']} epochs, then all" if cfg["freeze_epochs"]
                                           else "") + ")")
    log(f"schedule: {steps_per_epoch} steps/epoch, {total_steps} steps total, {warmup_steps} warmup steps, "
        f"{cfg['schedule']} decay to {cfg['min_lr_ratio']} x peak")
    for g in parts.optimizer.param_groups:
        log(f"  group {g['name']}: {len(g['params'])} tensors, peak lr {g['initial_lr']:.3g}, "
            f"weight decay {g['weight_decay']:.3g}")
    if cfg["warmup_epochs"] > cfg["epochs"]:
        log(f"warning: warmup_epochs {cfg['warmup_epochs']} is longer than the run ({cfg['epochs']} epochs): the LR "
            f"never reaches its peak", file=sys.stderr)
    if ema is not None:
        window = ema.window_steps()
        log(f"EMA: decay {cfg['ema_decay']} every {cfg['ema_every']} step(s): a window of about {window:.0f} steps "
            f"= {window / steps_per_epoch:.1f} epochs")


def describe_balance(cfg, log, labels, classes, class_weights):
    """The train split's images per class, and what --class_balance does about it."""
    line = splits.describe_per_class(splits.per_class_range(labels, classes))
    if class_weights is not None:
        present = class_weights[torch.bincount(torch.as_tensor(labels), minlength=len(classes)) > 0]
        line += f"; class_balance loss: weights {present.min():.3g} to {present.max():.3g}"
    elif cfg["class_balance"] == "sampler":
        line += "; class_balance sampler: each epoch draws every class equally often (with replacement)"
    log(line)


def time_step(probe, images, amp_dtype, device):
    """Seconds of one forward + backward of the probe: the faster of two timed calls after a warm-up call (which
    pays for kernel selection and allocation)."""
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        with devices.autocast(device, amp_dtype):
            probe(images).float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return min(timings[1:])


def estimate_duration(cfg, rt, model, steps_per_epoch, val_images, log):
    """Time training steps on a copy of the model with a synthetic batch (with what trains in each phase: frozen
    epochs, then everything), and print what the run will take. Under progressive resizing, steps are timed at the
    smallest and the final size, and an epoch's step time is the straight line between them at its pixel count."""
    probe = copy.deepcopy(model_utils.unwrap(model)).train()
    device, batch = rt.device, rt.batch
    sizes = resolution.train_sizes(cfg)
    frozen_epochs = cfg["freeze_epochs"] or (cfg["epochs"] if cfg["trainable"] != "all" else 0)

    def step_times(trains):
        """{size: seconds per step} at the smallest and the final train size."""
        model_utils.apply_freeze(probe, trains)
        times = {}
        for size in sorted({min(sizes), cfg["img_size"]}):
            images = torch.zeros(batch, 3, size, size, device=device)
            images = images.to(memory_format=model_utils.memory_format(cfg["channels_last"]))
            times[size] = time_step(probe, images, rt.amp_dtype, device)
        return times

    def epoch_seconds(times, size):
        (small, t_small), (big, t_big) = min(times.items()), max(times.items())
        return steps_per_epoch * (t_big if big == small else t_small + (t_big - t_small) * (size ** 2 - small ** 2)
                                  / (big ** 2 - small ** 2))

    frozen_times = step_times(cfg["trainable"]) if frozen_epochs else {}
    all_times = step_times("all") if frozen_epochs < cfg["epochs"] else {}
    step_frozen, step_all = frozen_times.get(cfg["img_size"], 0.0), all_times.get(cfg["img_size"], 0.0)
    evals = math.ceil(cfg["epochs"] / cfg["eval_every"])
    total = sum(epoch_seconds(frozen_times if epoch <= frozen_epochs else all_times, size)
                for epoch, size in enumerate(sizes, 1)) \
        + max(step_all, step_frozen) / batch / 3 * val_images * evals  # a forward is about a third of a step
    steps = ", ".join(f"{s:.2f}s per step {what}" for s, what in ((step_frozen, "frozen"), (step_all, "training "
                      "everything")) if s) if frozen_epochs else f"{step_all:.2f}s per step"
    if min(sizes) < cfg["img_size"]:
        smallest = (all_times or frozen_times)[min(sizes)]
        steps += f" at {cfg['img_size']} px ({smallest:.2f}s at {min(sizes)} px)"
    # Short or partly frozen runs spend much of their time outside the model (data, evaluation, start-up).
    rough = "; rough: a short or partly frozen run spends much of its time loading data and evaluating" \
        if frozen_epochs or steps_per_epoch * cfg["epochs"] < 200 else ""
    log(f"estimate: {steps} on {device} -> about {format_duration(total)} for {cfg['epochs']} epochs (model time "
        f"only{rough})")
    if device.type == "cpu" and cfg["exp"] != "cpu_smoke" and total > 3600:
        log(f"note: preset {cfg['exp']} is meant for a GPU; on this CPU it would take about {format_duration(total)}: "
            f"try --exp cpu_smoke (about 12 minutes on 2 cores)")
    return total


def summary(cfg, rows, stopper, ema, stop_reason, evaluated):
    """summary.json's content, and its table printed: the best epoch and the train / val / test figures of best.pth
    (`evaluated`: {split: metrics} of the splits evaluated at the end; val is the best epoch's own evaluation, the
    same loader and precision)."""
    best = {"epoch": stopper.best_epoch, "monitor": cfg["monitor"], "value": stopper.best}
    best_rows = [r for r in rows if r.get("epoch") == stopper.best_epoch and metrics.of_split(r, "val")]
    table = {split: {name: m[name] for name in (*metrics.METRICS, "images")} for split, m in evaluated.items()}
    val = metrics.of_split(best_rows[-1], "val") if best_rows else {}
    best.update({f"val_{name}": val.get(name, -1.0 if name == "top1" else None) for name in metrics.METRICS})
    if val:
        table["val"] = val
    table = {split: table[split] for split in ("train", "val", "test") if split in table}
    if distributed.is_main():
        names = [metrics.METRICS[name][0] for name in metrics.SUMMARY]
        print(f"| split | {' | '.join(names)} | images |\n|---|{'---|' * len(names)}---|")
        for split, m in table.items():
            print(f"| {split} | {' | '.join(f'{m[name]:.4f}' for name in metrics.SUMMARY)} | {m['images']} |")
    return {"best": best, "splits": table, "epochs_run": rows[-1]["epoch"] if rows else 0,
            "early_stop": stop_reason, "wall_time_s": rows[-1]["wall_time_s"] if rows else 0.0, "ema": ema,
            "time_to_val_top1": metrics.time_to_reach(rows, "val_top1")}
