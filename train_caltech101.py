"""Fine-tune (or train from scratch) a ResNet on Caltech-101 with AMP, channels_last and a DALI data path.

    python download.py                                            # once: data/Caltech101 + split lists
    python train_caltech101.py --exp r18_pretrain_lowwd_mix02     # the report's best run
    python train_caltech101.py --exp cpu_smoke                    # no GPU: learns the real data in ~15 min
    python train_caltech101.py --exp r18_pretrain_main --lr_fc 3e-3 --epochs 100   # flags beat the preset
    python train_caltech101.py --help                             # every flag, its default, every preset

Writes checkpoints/<exp>/: best.pth (plain state dict of the best-val model), last.pth (everything --resume
needs), config.json, metrics.csv, tb/ (TensorBoard).
"""
import argparse
import csv
import errno
import io
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import augment
import data_utils
import model_utils
import presets


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional_str(text):
    return None if text.lower() in ("", "none", "null") else text


def get_args_parser():
    epilog = "presets (--exp):\n" + "\n".join(
        f"  {name}: " + ", ".join(f"{k}={v}" for k, v in p.items()) for name, p in presets.PRESETS.items())
    parser = ArgumentParser(description="Train a ResNet on Caltech-101. Flags override the preset chosen by --exp.",
                            epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", default=presets.DEFAULT_EXP, choices=list(presets.PRESETS), metavar="NAME",
                        help=f"preset name (default: {presets.DEFAULT_EXP}); see the list below")
    for key, default in presets.DEFAULTS.items():
        kind = {bool: _bool, int: int, float: float}.get(type(default), _optional_str)
        choices = presets.CHOICES.get(key)
        # SUPPRESS: only flags given on the command line appear in args, so they (and only they) beat the preset.
        extra = dict(nargs="?", const=True) if kind is _bool else {}  # a bare --cache means --cache true
        parser.add_argument(f"--{key}", type=kind, default=argparse.SUPPRESS, choices=choices,
                            metavar=None if choices else ("BOOL" if kind is _bool else key.upper()),
                            help=f"(default: {default})", **extra)
    return parser


# ---------------------------------------------------------------------------------------------
# set-up helpers

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


def save_atomic(obj, path):
    """torch.save via a temporary file in the same folder, flushed and fsynced, then renamed into place.

    A failure or interruption at any point leaves the previous file byte-identical and no partial file behind.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise TrainingError(f"cannot write {path}: {reason}; the previous checkpoint is intact (free space, then "
                            f"--resume auto)") from None
    except RuntimeError as e:
        if isinstance(e.__context__, KeyboardInterrupt):  # torch's zip writer reports a Ctrl-C mid-write so
            raise KeyboardInterrupt from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(text, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_metrics(rows, path):
    if not rows:
        return
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[-1].keys()))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out.getvalue(), path)


# ---------------------------------------------------------------------------------------------
# train / evaluate

class GracefulStop:
    """First SIGINT/SIGTERM: finish the current step, save, exit. A second SIGINT interrupts at once."""

    def __init__(self):
        self.signum = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C raises KeyboardInterrupt
        print(f"\n{signal.Signals(signum).name}: stopping after this step (Ctrl-C again to abort now)",
              file=sys.stderr, flush=True)

    @property
    def requested(self):
        return self.signum is not None

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


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


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


# ---------------------------------------------------------------------------------------------

def main(cfg):
    out_dir = os.path.join(cfg["out_dir"], cfg["exp"])
    try:
        os.makedirs(out_dir, exist_ok=True)
        write_text_atomic(json.dumps(cfg, indent=2) + "\n", os.path.join(out_dir, "config.json"))
    except OSError as e:
        raise presets.ConfigError(f"cannot write to the output folder {out_dir}: {e.strerror}") from None
    print("config: " + json.dumps(cfg))
    device = resolve_device(cfg["device"])
    amp_dtype, use_scaler = resolve_amp(cfg["amp"], device)
    seed_everything(cfg["seed"])
    if cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # autotuned kernels: fastest, not bit-reproducible

    input_dtype = amp_dtype or torch.float32
    train_loader, val_loader, classes = data_utils.build_loaders(
        cfg["data_root"], cfg["img_size"], cfg["batch_size"], device, dtype=input_dtype, loader=cfg["loader"],
        workers=cfg["workers"], seed=cfg["seed"], eval_batch_size=cfg["eval_batch_size"], drop_last=cfg["drop_last"],
        crop_scale_min=cfg["crop_scale_min"], cache=cfg["cache"])
    num_classes = len(classes)
    if cfg["cache"]:
        print(f"cache: {train_loader.num_images + val_loader.num_images} images decoded once in "
              f"{train_loader.decode_seconds + val_loader.decode_seconds:.1f}s, "
              f"{(train_loader.nbytes + val_loader.nbytes) / 2**20:.0f} MiB of uint8 on {device}")

    model = model_utils.get_model(num_classes, pretrained=cfg["pretrained"], arch=cfg["arch"], weights=cfg["weights"])
    model_utils.apply_freeze(model, cfg["freeze"])
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    # The compiled wrapper shares the parameters; checkpoints are taken from `model`, so no _orig_mod. prefix.
    step_model = torch.compile(model) if cfg["compile"] else model
    groups = model_utils.param_groups(model, cfg["lr_backbone"], cfg["lr_fc"], cfg["weight_decay"])
    optimizer = build_optimizer(groups, cfg)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg["epochs"]
    warmup_steps = int(round(cfg["warmup_epochs"] * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup_steps, cfg["schedule"], cfg["min_lr_ratio"]))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    mixer = augment.MixupCutmix(num_classes, cfg["mixup_alpha"], cfg["cutmix_alpha"], cfg["mix_switch_prob"],
                                cfg["label_smoothing"], seed=cfg["seed"])

    state = {"next_epoch": 1, "next_step": 0, "best_top1": -1.0, "best_epoch": 0, "rows": []}
    last_path, best_path = os.path.join(out_dir, "last.pth"), os.path.join(out_dir, "best.pth")
    resume = last_path if cfg["resume"] == "auto" else cfg["resume"]
    if resume:
        state = load_checkpoint(resume, cfg, model, optimizer, scheduler, scaler, mixer, train_loader)
        print(f"resumed from {resume}: continuing at epoch {state['next_epoch']} step {state['next_step']} "
              f"(best val top-1 so far {state['best_top1']:.4f})")

    def save_last(next_epoch, next_step):
        save_atomic({"model": model_utils.export_state_dict(model), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": next_epoch - 1 if next_step == 0 else next_epoch, "next_epoch": next_epoch,
                     "next_step": next_step, "best_top1": state["best_top1"], "best_epoch": state["best_epoch"],
                     "rows": state["rows"], "rng": rng_state(), "mixer_rng": mixer.rng.bit_generator.state,
                     "loader": train_loader.state_dict(), "loader_kind": train_loader.kind, "arch": cfg["arch"],
                     "num_classes": num_classes,
                     "config": cfg}, last_path)

    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"device {device}, amp {amp_dtype}, grad scaler {use_scaler}, channels_last {cfg['channels_last']}, "
          f"loader {train_loader.kind}, torch.compile {cfg['compile']}")
    print(f"data: {num_classes} classes, {train_loader.num_images} train / {val_loader.num_images} val images")
    init = cfg["weights"] or ("ImageNet" if cfg["pretrained"] else "scratch")
    print(f"model: {cfg['arch']} ({init} init), {n_params / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable "
          f"(freeze={cfg['freeze']})")
    print(f"schedule: {steps_per_epoch} steps/epoch, {total_steps} steps total, {warmup_steps} warmup steps, "
          f"{cfg['schedule']} decay to {cfg['min_lr_ratio']} x peak")
    for g in optimizer.param_groups:
        print(f"  group {g['name']}: {len(g['params'])} tensors, peak lr {g['initial_lr']:.3g}, "
              f"weight decay {g['weight_decay']:.3g}")

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(os.path.join(out_dir, "tb"))
    run_start = time.perf_counter()
    rows = state["rows"]
    resumed_wall_time = rows[-1]["wall_time_s"] if rows else 0.0  # time spent before a resume
    save_every = cfg["save_every_steps"]
    stop = GracefulStop()
    try:
        for epoch in range(state["next_epoch"], cfg["epochs"] + 1):
            start_step = state["next_step"] if epoch == state["next_epoch"] else 0
            on_step = (lambda done, e=epoch: save_last(e, done) if done % save_every == 0 and done < steps_per_epoch
                       else None) if save_every else None
            stats = train_one_epoch(step_model, train_loader, optimizer, scheduler, scaler, mixer, amp_dtype, cfg,
                                    epoch, start_step=start_step, stop=stop, on_step=on_step)
            if not stats["completed"]:  # stopped by a signal mid-epoch: keep exactly where we are
                save_last(epoch, stats["steps_done"])
                return stopped(stop, cfg, epoch, stats["steps_done"], last_path)
            row = {"epoch": epoch, **{k: v for k, v in stats.items() if k not in ("steps_done", "completed")},
                   **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}}
            if epoch % cfg["eval_every"] == 0 or epoch == cfg["epochs"]:
                metrics = evaluate(step_model, val_loader, num_classes, amp_dtype)
                row.update(metrics)
                if math.isfinite(metrics["val_top1"]) and metrics["val_top1"] > state["best_top1"]:
                    state["best_top1"], state["best_epoch"] = metrics["val_top1"], epoch
                    save_atomic(model_utils.export_state_dict(model), best_path)
            row["wall_time_s"] = resumed_wall_time + time.perf_counter() - run_start
            rows.append(row)
            for key, value in row.items():  # train_loss -> train/loss, lr_head_decay -> lr/head_decay, ...
                if key != "epoch":
                    writer.add_scalar(key.replace("_", "/", 1), value, epoch)
            writer.flush()
            write_metrics(normalize_rows(rows), os.path.join(out_dir, "metrics.csv"))
            save_last(epoch + 1, 0)
            summary = f"epoch {epoch}/{cfg['epochs']}: train loss {stats['train_loss']:.4f} " \
                      f"acc {stats['train_acc']:.4f} ({stats['train_images_per_s']:.0f} img/s)"
            if "val_top1" in row:
                summary += f" | val top1 {row['val_top1']:.4f} top5 {row['val_top5']:.4f} " \
                           f"mean-class {row['val_mean_class_acc']:.4f} " \
                           f"(best {state['best_top1']:.4f} @ {state['best_epoch']})"
            print(summary + f" | {row['wall_time_s']:.0f}s", flush=True)
            if stop.requested and epoch < cfg["epochs"]:
                return stopped(stop, cfg, epoch + 1, 0, last_path)
    finally:
        stop.restore()
        writer.close()
    from evaluate import plot_curves  # late: evaluate.py imports this module

    print(f"done: best val top-1 {state['best_top1']:.4f} at epoch {state['best_epoch']}; weights {best_path}; "
          f"curves {plot_curves(out_dir)}")
    return {"best_top1": state["best_top1"], "best_epoch": state["best_epoch"], "rows": rows, "out_dir": out_dir,
            "exit_code": 0}


def stopped(stop, cfg, next_epoch, next_step, last_path):
    name = signal.Signals(stop.signum).name
    print(f"{name}: state saved to {last_path} (next: epoch {next_epoch}, step {next_step}). Resume with:\n"
          f"  python train_caltech101.py --exp {cfg['exp']} --resume auto [the same flags as before]", flush=True)
    return {"exit_code": 128 + stop.signum, "out_dir": os.path.dirname(last_path)}


def normalize_rows(rows):
    """Every row with every column (evaluation columns are empty on epochs without an evaluation)."""
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    return [{k: row.get(k, "") for k in keys} for row in rows]


def load_checkpoint(path, cfg, model, optimizer, scheduler, scaler, mixer, train_loader):
    """Restore every piece of training state from a last.pth; returns the loop state."""
    ckpt = model_utils.safe_load(path)
    if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "next_epoch" not in ckpt:
        raise presets.ConfigError(f"--resume {path}: not a last.pth training checkpoint of this kit")
    if ckpt["arch"] != cfg["arch"] or ckpt["num_classes"] != model.fc.out_features:
        raise presets.ConfigError(f"--resume {path}: it is a {ckpt['arch']} with {ckpt['num_classes']} classes, "
                                  f"this run is a {cfg['arch']} with {model.fc.out_features}")
    model_utils.unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    mixer.rng.bit_generator.state = ckpt["mixer_rng"]
    if ckpt.get("loader_kind") == train_loader.kind:
        train_loader.load_state_dict(ckpt["loader"])
    else:
        print(f"note: {path} was written with the {ckpt.get('loader_kind')} loader, this run uses the "
              f"{train_loader.kind} loader: the data order restarts")
    return {k: ckpt[k] for k in ("next_epoch", "next_step", "best_top1", "best_epoch", "rows")}


if __name__ == "__main__":
    args = vars(get_args_parser().parse_args())
    exp = args.pop("exp")
    try:
        result = main(presets.resolve(exp, args))
    except (presets.ConfigError, data_utils.DataError, model_utils.ModelError, TrainingError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: stopped at once; the last checkpoint written is intact (--resume auto)")
    sys.exit(result["exit_code"])
