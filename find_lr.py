"""Find a learning rate before a long run, the way fastai's lr_find and Lightning's LR finder do, for any preset.

    python find_lr.py --exp cpu_smoke                          # sweep, plot and suggestion for a preset
    python find_lr.py --exp r18_pretrain_main --lr_fc 3e-3     # every training flag works here too

One multiplier sweeps exponentially from 1e-7 to 10 over about 100 real training batches (augmented, mixed and in
the run's precision), scaling every parameter group's peak LR, so the backbone/head (or layer-wise) ratios stay
as the run has them. The loss is smoothed (beta 0.98, debiased) and the sweep stops once it exceeds 4x its
minimum. Suggestions: the multiplier at the steepest descent of the smoothed loss, and the one at its minimum / 10;
each is printed as the LR of every group. Writes <out_dir>/<name>_lr_find/lr_find.png and lr_find.csv. The
model's weights and BatchNorm statistics and the optimizer's state are restored afterwards: the sweep leaves
nothing behind.
"""
import copy
import csv
import math
import os
import sys

import numpy as np
import torch

import augment
import data_utils
import model_utils
import presets
from kit.base import devices, errors
from kit.data import dali_loader, splits
from kit.reporting import plots
from kit.settings import settings_cli
from kit.training import engine


def lr_find(model, loader, optimizer, scaler, mixer, amp_dtype, cfg, start=1e-7, end=10.0, steps=100, beta=0.98,
            diverge=4.0):
    """The sweep: a list of (multiplier, loss, smoothed loss) per step. Model and optimizer come back unchanged."""
    saved_model = copy.deepcopy(model_utils.unwrap(model).state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    peaks = [group["lr"] for group in optimizer.param_groups]
    growth = (end / start) ** (1 / max(1, steps - 1))
    records, average, lowest = [], 0.0, math.inf
    model_utils.set_train_mode(model, cfg["trainable"], cfg["frozen_bn"])

    def batches():
        while True:
            yield from loader

    try:
        for step, (images, labels) in zip(range(steps), batches()):
            multiplier = start * growth ** step
            for group, peak in zip(optimizer.param_groups, peaks):
                group["lr"] = peak * multiplier
            loss, finite, _ = engine.train_step(model, images, labels, optimizer, scaler, mixer, amp_dtype,
                                                cfg["grad_clip"])
            value = loss.item()  # a finder reads every step: it is short and the reads are the point
            average = beta * average + (1 - beta) * value
            smoothed = average / (1 - beta ** (step + 1))
            records.append((multiplier, value, smoothed))
            lowest = min(lowest, smoothed)
            if not bool(finite) or not math.isfinite(smoothed) or smoothed > diverge * lowest:
                break
    finally:
        model_utils.unwrap(model).load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)  # the groups' LRs too
    return records


def suggestions(records, skip_start=10):
    """{'steepest': multiplier, 'minimum/10': multiplier} of a sweep (fastai's two rules). The steepest descent is
    the most negative slope of the smoothed loss against log(LR), fitted over a window of neighbouring points (a
    from-scratch model's batch-to-batch noise makes point-to-point slopes meaningless), before the minimum."""
    mults = np.array([r[0] for r in records])
    smoothed = np.array([r[2] for r in records])
    lowest = int(np.argmin(smoothed))
    out = {"minimum/10": float(mults[lowest] / 10)}
    half = max(1, len(records) // 20)
    log_lr = np.log(mults)
    candidates = range(min(skip_start, lowest), max(lowest, 1))
    slopes = [np.polyfit(log_lr[max(0, i - half):i + half + 1], smoothed[max(0, i - half):i + half + 1], 1)[0]
              for i in candidates]
    out["steepest"] = float(mults[list(candidates)[int(np.argmin(slopes))]]) if slopes else float(mults[0])
    return out


def main(cfg, steps=100, start=1e-7, end=10.0):
    device = devices.resolve_device(cfg["device"])
    amp_dtype, use_scaler = devices.resolve_amp(cfg["amp"], device)
    engine.seed_everything(cfg["seed"])
    train_loader = data_utils.build_loader(cfg["data_root"], "train", cfg["batch_size"], device,
                                           data_utils.data_settings(cfg, amp_dtype or torch.float32))
    classes = splits.read_classes(cfg["data_root"])
    model, optimizer, _ = engine.build_model(cfg, len(classes), device, quiet=False)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    mixer = augment.MixupCutmix(len(classes), cfg["mixup_alpha"], cfg["cutmix_alpha"], cfg["mix_switch_prob"],
                                cfg["label_smoothing"], seed=cfg["seed"])
    records = lr_find(model, train_loader, optimizer, scaler, mixer, amp_dtype, cfg, start, end, steps)
    if len(records) < 3:
        raise errors.ConfigError(f"the loss diverged within {len(records)} steps: nothing to suggest (start lower)")
    found = suggestions(records)
    out_dir = os.path.join(cfg["out_dir"], f"{cfg['name'] or cfg['exp']}_lr_find")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "lr_find.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["multiplier", *[f"lr_{g['name']}" for g in optimizer.param_groups], "loss", "smoothed"])
        for mult, loss, smooth in records:
            writer.writerow([mult, *[g["lr"] * mult for g in optimizer.param_groups], loss, smooth])
    head = next(g for g in optimizer.param_groups if g["stage"] == "head")
    plot = plots.plot_lr_find(records, found, head["lr"], os.path.join(out_dir, "lr_find.png"))
    print(f"swept {len(records)} steps (multiplier {records[0][0]:.1e} to {records[-1][0]:.1e}); the preset's own "
          f"peak LRs are multiplier 1")
    for rule, mult in found.items():
        lrs = ", ".join(f"{g['name']} {g['lr'] * mult:.3g}" for g in optimizer.param_groups)
        print(f"suggestion ({rule}): multiplier {mult:.3g} -> {lrs}")
    print(f"plot {plot}, table {os.path.join(out_dir, 'lr_find.csv')}")
    return {"records": records, "suggestions": found, "out_dir": out_dir}


def get_args_parser():
    parser = settings_cli.settings_parser("LR finder: sweep a multiplier on every group's peak LR over real batches, "
                                          "plot, suggest. Takes every training flag.")
    parser.add_argument("--steps", type=int, default=100, help="sweep length in training steps (default: 100)")
    parser.add_argument("--start", type=float, default=1e-7, help="first multiplier (default: 1e-7)")
    parser.add_argument("--end", type=float, default=10.0, help="last multiplier (default: 10)")
    return parser


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    steps, start, end = args.steps, args.start, args.end
    del args.steps, args.start, args.end
    exp, config, overrides, _ = settings_cli.settings_from_args(args)

    def run():
        if steps < 3 or not 0 < start < end:
            raise errors.ConfigError("--steps must be at least 3 and 0 < --start < --end")
        with dali_loader.QuietDecoderErrors():
            main(presets.resolve(exp, overrides, config=config), steps, start, end)

    return errors.run_cli(run)


if __name__ == "__main__":
    sys.exit(cli())
