"""The training engine: device and precision choice, optimizer and LR schedule, one training epoch, and the one
evaluation loop and metrics definition that training, evaluate.py and bench.py all use.

    import engine
    device = engine.resolve_device("auto"); amp_dtype, use_scaler = engine.resolve_amp("auto", device)
    stats = engine.train_one_epoch(model, loader, optimizer, scheduler, scaler, mixer, amp_dtype, cfg, epoch=1)
    metrics = engine.evaluate(model, val_loader, num_classes, amp_dtype)

Plain functions, no trainer object: train_caltech101.py tells the story of a run with them.
"""
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import augment
import model_utils
import presets


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise presets.ConfigError("device=cuda but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def resolve_amp(amp, device):
    """(autocast dtype or None, use GradScaler)."""
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:  # bf16 pays off only where the CPU has native bf16 instructions
            native_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
            amp = "bf16" if native_bf16 else "off"
    if amp == "fp16" and device.type != "cuda":
        raise presets.ConfigError("amp=fp16 needs CUDA; on CPU use --amp bf16 or --amp off")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp], amp == "fp16"


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(total_steps, warmup_steps, schedule, min_lr_ratio):
    """Multiplier of the peak LR at each step: linear warmup, then cosine/linear/constant decay."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 1.0
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay
    return factor


class TrainingError(Exception):
    """The run cannot go on (too many non-finite losses, a checkpoint that cannot be written): one line."""


def optimizer_step(optimizer, scaler, loss_is_finite):
    """Apply the update unless the loss was non-finite, without waiting on the device: fp16's GradScaler and, for
    bf16/fp32, the fused optimizers' own found_inf input both skip the update inside the kernel."""
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
        return
    if not getattr(optimizer, "_step_supports_amp_scaling", False):  # a caller's unfused optimizer: must ask
        if loss_is_finite.item():
            optimizer.step()
        return
    optimizer.found_inf = (~loss_is_finite).float()  # the same hand-off GradScaler uses with fused optimizers
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def train_one_epoch(model, loader, optimizer, scheduler, scaler, mixer, amp_dtype, cfg, epoch, start_step=0,
                    stop=None, on_step=None):
    """One pass over the loader (the rest of it when resuming at start_step).

    Returns the epoch's statistics plus 'steps_done' (in this epoch, counting start_step) and 'completed'
    (False when `stop` asked to end early). `on_step(steps_done)` runs after every optimizer step.
    Nothing here waits on the device except at log points: sums, counts and the non-finite-loss streak
    live in device tensors until then.
    """
    from tqdm import tqdm

    device = next(model.parameters()).device
    model_utils.set_train_mode(model, cfg["freeze"])
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    good_images = torch.zeros((), device=device, dtype=torch.long)
    bad_streak = torch.zeros((), device=device, dtype=torch.long)  # consecutive non-finite losses
    skipped = torch.zeros((), device=device, dtype=torch.long)
    seen, steps_done, warned = 0, start_step, 0
    max_bad = cfg.get("max_bad_steps", 10)
    start = time.perf_counter()
    bar = tqdm(total=len(loader), initial=start_step, desc=f"epoch {epoch}", unit="step", leave=False,
               dynamic_ncols=True, disable=not cfg.get("progress", True) or os.environ.get("CI") == "true")
    for images, labels in loader:
        images, targets = mixer(images, labels)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
        loss = augment.soft_target_cross_entropy(logits, targets)
        finite = torch.isfinite(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer_step(optimizer, scaler, finite)
        scheduler.step()
        steps_done += 1
        n = labels.shape[0]
        bad_streak = (bad_streak + 1) * (~finite)
        skipped += ~finite
        loss_sum += torch.where(finite, loss.detach().float(), 0.0) * n
        correct += ((logits.detach().argmax(1) == labels) & finite).sum()
        good_images += finite * n
        seen += n
        if steps_done % cfg["log_every"] == 0 or steps_done == len(loader):
            if device.type == "cuda":
                torch.cuda.synchronize()
            rate = seen / (time.perf_counter() - start)
            streak, n_skipped, n_good = bad_streak.item(), skipped.item(), max(good_images.item(), 1)
            if n_skipped > warned:
                warned = n_skipped
                print(f"\nwarning: {n_skipped} non-finite losses so far in epoch {epoch} (step {steps_done}); "
                      f"their updates were skipped", file=sys.stderr, flush=True)
            if streak >= max_bad:
                raise TrainingError(f"{streak} non-finite losses in a row (epoch {epoch}, step {steps_done}): "
                                    f"stopping; the last good checkpoint is kept (lower the LR, or --amp off)")
            bar.set_postfix(loss=f"{loss_sum.item() / n_good:.3f}", acc=f"{correct.item() / n_good:.3f}",
                            img_s=f"{rate:.0f}")
            bar.update(steps_done - bar.n)
        if on_step is not None:
            on_step(steps_done)
        if stop is not None and stop.requested:
            break
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    n_good = max(good_images.item(), 1)
    return {"train_loss": loss_sum.item() / n_good, "train_acc": correct.item() / n_good,
            "train_images_per_s": seen / elapsed, "train_time_s": elapsed, "skipped_steps": skipped.item(),
            "steps_done": steps_done, "completed": steps_done >= len(loader)}


@torch.inference_mode()
def collect_logits(model, loader, amp_dtype, tta="none"):
    """float32 logits (N, C) and labels (N,) of a whole split, in split-list order, on the model's device.
    tta="flip" averages the logits of each image and its mirror."""
    device = next(model.parameters()).device
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images).float()
            if tta == "flip":
                logits = (logits + model(images.flip(3)).float()) / 2
        all_logits.append(logits)
        all_labels.append(labels)
    return torch.cat(all_logits), torch.cat(all_labels)


def split_metrics(logits, labels, num_classes):
    """Overall and per-class figures of a split (per-class accuracy is per-class recall). The one definition
    that training's evaluation and evaluate.py both use, so their figures agree exactly."""
    top5 = logits.topk(min(5, num_classes), dim=1).indices
    pred = top5[:, 0]  # not argmax: bf16 logits tie, and argmax and topk may break ties differently
    support = torch.bincount(labels, minlength=num_classes)
    correct = torch.bincount(labels[pred == labels], minlength=num_classes)
    predicted = torch.bincount(pred, minlength=num_classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=labels.device)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    present = support > 0
    recall = correct.double() / support.clamp(min=1)
    precision = correct.double() / predicted.clamp(min=1)
    return {
        "top1": (pred == labels).double().mean().item(),
        "top5": (top5 == labels[:, None]).any(1).double().mean().item(),
        "mean_class_acc": recall[present].mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
        "images": int(labels.numel()),
        "support": support.tolist(), "correct": correct.tolist(), "predicted": predicted.tolist(),
        "recall": recall.tolist(), "precision": precision.tolist(), "confusion": confusion.cpu(), "pred": pred,
    }


def evaluate(model, loader, num_classes, amp_dtype):
    """Loss, top-1, top-5 and mean per-class accuracy over a whole split (the short last batch included)."""
    device = next(model.parameters()).device
    start = time.perf_counter()
    logits, labels = collect_logits(model, loader, amp_dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    m = split_metrics(logits, labels, num_classes)
    return {"val_loss": m["loss"], "val_top1": m["top1"], "val_top5": m["top5"],
            "val_mean_class_acc": m["mean_class_acc"], "val_images": m["images"],
            "val_images_per_s": m["images"] / elapsed}


def build_optimizer(groups, cfg):
    """AdamW or SGD in their fused form: one kernel per step, and a device-side skip of non-finite steps."""
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, betas=(cfg["momentum"], 0.999), fused=True)
    optimizer = torch.optim.SGD(groups, momentum=cfg["momentum"], nesterov=True, fused=True)
    # Fused SGD creates its momentum buffer on the first step even when that step is skipped, and leaves it
    # unset; zeros give exactly the usual first step (buffer = gradient) and make a skipped first step safe.
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer

