"""The training engine: optimizer and LR schedule, one training epoch, weight EMA,
early stopping, and the one evaluation loop that training, evaluate.py and bench.py use (its figures: metrics.py).

    from kit.training import engine
    stats = engine.train_one_epoch(parts, amp_dtype, cfg, epoch=1)   # parts: a checkpoint.Parts
    metrics = engine.evaluate(model, val_loader, num_classes, amp_dtype)

Plain functions and two small state holders (ModelEma, EarlyStopping), no trainer object: training.py
tells the story of a run with them. Under torchrun the same functions run on every rank (distributed.py).
"""
import copy
import math
import random
import sys
import time

import numpy as np
import torch

import augment
import data_utils
import model_utils
import presets
from kit.base import devices, distributed, errors
from kit.settings import resolution
from kit.training import metrics


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Decay after warmup: progress through the decay phase (0 to 1) -> fraction of the way from min_lr_ratio to the
# peak. A new schedule is an entry here; presets.CHOICES["schedule"] lists the names (a test keeps them equal).
SCHEDULES = {
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "linear": lambda progress: 1.0 - progress,
    "constant": lambda progress: 1.0,
}


def lr_lambda(total_steps, warmup_steps, schedule, min_lr_ratio, start_step=0):
    """Multiplier of a group's peak LR at each step: 0 before start_step (a frozen stage), then a linear warmup
    over warmup_steps, then the schedule's decay to min_lr_ratio at total_steps."""
    if schedule not in SCHEDULES:
        raise errors.ConfigError(f"unknown schedule '{schedule}': choose one of {', '.join(SCHEDULES)}")
    decay = SCHEDULES[schedule]

    def factor(step):
        if step < start_step:
            return 0.0
        step -= start_step
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - start_step - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay(progress)
    return factor


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


def step_model_for(model, cfg, device, world):
    """What the training step calls: the model, under DDP with several processes, compiled with --compile."""
    wrapped = model
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        wrapped = compiled(wrapped, cfg)
    return wrapped


def compiled(model, cfg):
    """torch.compile with one graph per input shape: each train size of a progressive-resizing schedule and
    evaluation's get their own static graph (and CUDA graph under reduce-overhead), rather than one dynamic-shape
    graph from the second size on, and the recompile limit leaves room for all of them."""
    graphs = len(set(resolution.train_sizes(cfg))) + 1
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, graphs + 1)
    return torch.compile(model, mode=None if cfg["compile_mode"] == "default" else cfg["compile_mode"],
                         dynamic=False)


def build_model(cfg, num_classes, device, quiet=False):
    """(model on the device, optimizer, stages frozen until freeze_epochs): the run's initialisation, trainable
    parts, memory layout and parameter groups (layer-wise LRs, no decay on BatchNorm and bias)."""
    model = model_utils.get_model(num_classes, pretrained=cfg["pretrained"] and not cfg["weights"],
                                  arch=cfg["arch"], weights=cfg["weights"], quiet=quiet)
    frozen_phase = cfg["freeze_epochs"] > 0
    model_utils.apply_freeze(model, cfg["trainable"])
    if cfg["sync_bn"]:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=model_utils.memory_format(cfg["channels_last"]))
    stage_lrs = presets.parse_stage_lrs(cfg["stage_lrs"]) if cfg["stage_lrs"] else None
    groups = model_utils.param_groups(model, cfg["lr_backbone"], cfg["lr_fc"], cfg["weight_decay"],
                                      cfg["layer_decay"], stage_lrs, per_stage=frozen_phase or None,
                                      include_frozen=frozen_phase)
    frozen_stages = {g["stage"] for g in groups if not any(p.requires_grad for p in g["params"])}
    return model, build_optimizer(groups, cfg), frozen_stages


def build_schedule(optimizer, cfg, steps_per_epoch, frozen_stages):
    """One LR lambda per group: warmup then decay; stages frozen for the first freeze_epochs start at 0 and get
    their own warmup from the unfreeze step, then follow the schedule to the end of the run."""
    total = steps_per_epoch * cfg["epochs"]
    warmup = int(round(cfg["warmup_epochs"] * steps_per_epoch))
    unfreeze_step = cfg["freeze_epochs"] * steps_per_epoch
    lambdas = [lr_lambda(total, warmup, cfg["schedule"], cfg["min_lr_ratio"],
                                start_step=unfreeze_step if g["stage"] in frozen_stages else 0)
               for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas), total, warmup


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


class ModelEma:
    """Exponential moving average of a model's weights and buffers (BatchNorm running statistics included), as
    timm's ModelEmaV3 and torchvision's reference scripts keep it: every `every` optimizer steps,
    ema = d * ema + (1 - d) * model with d = decay ** every; with `warmup`, decay is min(decay, (1 + n) / (10 + n))
    at the n-th update, so the first updates mostly copy the model. One fused lerp per update, no host sync."""

    def __init__(self, model, decay, every=1, warmup=True):
        self.module = copy.deepcopy(model_utils.unwrap(model)).eval().requires_grad_(False)
        self.decay, self.every, self.warmup, self.updates = decay, every, warmup, 0

    def current_decay(self):
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        return decay ** self.every

    @torch.no_grad()
    def update(self, model):
        decay = self.current_decay()
        ema = self.module.state_dict()
        live = model_utils.unwrap(model).state_dict()
        floats = [k for k, v in ema.items() if v.is_floating_point()]
        torch._foreach_lerp_([ema[k] for k in floats], [live[k] for k in floats], 1.0 - decay)
        for k, v in ema.items():
            if not v.is_floating_point():
                v.copy_(live[k])
        self.updates += 1

    def window_steps(self):
        """Optimizer steps over which the average reaches 1 - 1/e of a change: about every / (1 - decay**every)."""
        return self.every / max(1e-12, 1.0 - self.decay ** self.every)

    def state_dict(self):
        return {"module": model_utils.export_state_dict(self.module), "updates": self.updates}

    def load_state_dict(self, state):
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]


class EarlyStopping:
    """Lightning's EarlyStopping semantics: `patience` counts evaluations without improvement, an improvement must
    beat the best by more than min_delta, val_loss is minimised and accuracies maximised, and a non-finite
    monitored value stops the run. The same monitor picks best.pth (patience 0: only that)."""

    def __init__(self, monitor="val_top1", patience=0, min_delta=0.0):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.minimize = metrics.minimized(monitor)
        self.best, self.best_epoch, self.wait, self.reason = (math.inf if self.minimize else -math.inf), 0, 0, None

    def improves(self, value):
        if self.minimize:
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def step(self, value, epoch):
        """Record one evaluation; returns (is the new best, should the run stop)."""
        if not math.isfinite(value):
            if self.patience:
                self.reason = f"{self.monitor} is {value} at epoch {epoch}"
            return False, bool(self.patience)
        if self.improves(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            return True, False
        self.wait += 1
        if self.patience and self.wait >= self.patience:
            self.reason = (f"{self.monitor} did not improve by more than {self.min_delta} for {self.wait} "
                           f"evaluations (best {self.best:.4f} at epoch {self.best_epoch})")
            return False, True
        return False, False

    def state_dict(self):
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait, "reason": self.reason}

    def load_state_dict(self, state):
        self.best, self.best_epoch, self.wait, self.reason = (state["best"], state["best_epoch"], state["wait"],
                                                              state["reason"])


def batchnorm_stats(model):
    """Every BatchNorm running statistic of the model (mean, var, num_batches_tracked): what a forward pass in
    training mode changes besides the activations."""
    return [buf for module in model_utils.unwrap(model).modules()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None
            for buf in (module.running_mean, module.running_var, module.num_batches_tracked)]


def train_step(model, images, labels, optimizer, scaler, mixer, amp_dtype, grad_clip=0.0, loss_weight=1.0,
               bn_stats=None):
    """One optimizer step on one batch: mix, forward under autocast, soft-target loss, backward, clip, update.

    Returns (this rank's mean loss, a device bool that is true when the loss was finite on every rank, logits); a
    non-finite step is skipped on the device (optimizer_step), never with a host read, and leaves the model
    exactly as it was: the forward pass has already moved BatchNorm's running statistics (a NaN pixel makes them
    NaN, and every later evaluation with them), so they are put back from a copy taken before it. `bn_stats`:
    batchnorm_stats(model), computed once by a caller that takes many steps ([] turns the restore off).
    """
    bn_stats = batchnorm_stats(model) if bn_stats is None else bn_stats
    saved = [buf.clone() for buf in bn_stats]
    images, targets = mixer(images, labels)
    with devices.autocast(images.device, amp_dtype):
        logits = model(images)
    loss = augment.soft_target_cross_entropy(logits, targets)
    loss_value = loss.detach()
    finite = distributed.all_finite(torch.isfinite(loss_value))
    if loss_weight != 1.0:
        loss = loss * loss_weight
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer_step(optimizer, scaler, finite)
    for buf, before in zip(bn_stats, saved):  # one select per buffer, decided on the device
        torch.where(finite, buf, before, out=buf)
    return loss_value, finite, logits


class EpochTally:
    """An epoch's running figures: loss sum, correct and counted images, skipped steps and the non-finite streak
    on the device (read only at log points), images seen and seconds spent on the host. last.pth carries it, so
    the epoch a run resumes in reports the whole epoch, as an uninterrupted run does."""

    def __init__(self, device):
        zero = dict(device=device, dtype=torch.long)
        self.loss_sum = torch.zeros((), device=device)
        self.correct, self.good_images = torch.zeros((), **zero), torch.zeros((), **zero)
        self.skipped, self.bad_streak = torch.zeros((), **zero), torch.zeros((), **zero)
        self.seen, self.seconds_before, self.started = 0, 0.0, time.perf_counter()

    def add(self, loss_value, finite, logits, labels):
        n = labels.shape[0]
        self.bad_streak = (self.bad_streak + 1) * (~finite)
        self.skipped += ~finite
        self.loss_sum += torch.where(finite, loss_value.float(), 0.0) * n
        self.correct += ((logits.detach().argmax(1) == labels) & finite).sum()
        self.good_images += finite * n
        self.seen += n

    def seconds(self):
        return self.seconds_before + time.perf_counter() - self.started

    TENSORS = ("loss_sum", "correct", "good_images", "skipped", "bad_streak")

    def state_dict(self):
        return {**{k: getattr(self, k).detach().cpu() for k in self.TENSORS}, "seen": self.seen,
                "seconds": self.seconds()}

    def load_state_dict(self, state):
        for k in self.TENSORS:
            getattr(self, k).copy_(state[k])
        self.seen, self.seconds_before, self.started = state["seen"], state["seconds"], time.perf_counter()


def phase(cfg, epoch):
    """What trains in an epoch: `trainable`, or everything after freeze_epochs (gradual unfreezing)."""
    if cfg.get("freeze_epochs", 0) > 0 and epoch > cfg["freeze_epochs"]:
        return "all"
    return cfg.get("trainable", "all")


def train_one_epoch(parts, amp_dtype, cfg, epoch, step_model=None, start_step=0, tally=None, stop=None,
                    on_step=None, guard_bn=True):
    """One pass over parts.loader (the rest of it when resuming at start_step, with that epoch's `tally` so far),
    stepping parts' optimizer, scheduler, scaler, mixer and EMA (a checkpoint.Parts). step_model: what runs the
    steps (the DDP or compiled wrapper of parts.model; None: parts.model).

    Returns the epoch's statistics (summed over ranks) plus 'steps_done' (in this epoch, counting start_step) and
    'completed' (False when `stop` ended it before its last step). `on_step(steps_done)` runs after every
    optimizer step; `tally` (an EpochTally, updated in place) is what a mid-epoch checkpoint saves.
    What is frozen in this epoch (phase()) keeps its BatchNorm as cfg["frozen_bn"] says.
    Nothing here waits on the device except at log points: sums, counts and the non-finite-loss streak live in
    device tensors until then. Under torchrun every rank skips the same non-finite steps and stops at the same
    log point, and a short last step's loss is weighted so the update is the mean over the whole global batch.
    guard_bn=False skips train_step's BatchNorm restore (bench.py measures its cost with it).
    """
    from tqdm import tqdm

    model = parts.model if step_model is None else step_model
    loader, optimizer, scheduler, ema = parts.loader, parts.optimizer, parts.scheduler, parts.ema
    device = next(model.parameters()).device
    world = distributed.world()
    model_utils.set_train_mode(model, phase(cfg, epoch), cfg.get("frozen_bn", "eval"))
    bn_stats = batchnorm_stats(model) if guard_bn else []
    tally = EpochTally(device) if tally is None else tally
    tally.started = time.perf_counter()
    steps_done, warned, seen_before = start_step, 0, tally.seen
    max_bad, every_ema = cfg.get("max_bad_steps", 10), cfg.get("ema_every", 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # A bar only on a terminal: in a redirected log (nohup, a cluster job, > train.log) its redraws would bury the
    # one line per epoch.
    show = cfg.get("progress", True) and sys.stderr.isatty() and distributed.is_main()
    bar = tqdm(total=len(loader), initial=start_step, desc=f"epoch {epoch}", unit="step", leave=False,
               dynamic_ncols=True, disable=not show)
    stopping = False
    for images, labels in loader:
        n = labels.shape[0]
        # DDP averages over ranks: a short last step's ranks weight their mean by their share of the global batch.
        weight = 1.0 if world == 1 else n * world / loader.plan.global_images(steps_done)
        loss_value, finite, logits = train_step(model, images, labels, optimizer, parts.scaler, parts.mixer,
                                                amp_dtype, cfg["grad_clip"], weight, bn_stats)
        scheduler.step()
        steps_done += 1
        if ema is not None and steps_done % every_ema == 0:
            ema.update(model)
        tally.add(loss_value, finite, logits, labels)
        log_point = steps_done % cfg["log_every"] == 0 or steps_done == len(loader)
        if log_point:
            if device.type == "cuda":
                torch.cuda.synchronize()
            rate = (tally.seen - seen_before) * world / (time.perf_counter() - tally.started)
            streak, n_skipped = tally.bad_streak.item(), tally.skipped.item()
            n_good = max(tally.good_images.item(), 1)
            if n_skipped > warned and distributed.is_main():
                print(f"\nwarning: {n_skipped} non-finite losses so far in epoch {epoch} (step {steps_done}); "
                      f"their updates were skipped", file=sys.stderr, flush=True)
            warned = n_skipped
            if streak >= max_bad:
                raise errors.TrainingError(f"{streak} non-finite losses in a row (epoch {epoch}, step {steps_done}): "
                                           f"stopping; the last good checkpoint is kept (lower the LR, or --amp off)")
            bar.set_postfix(loss=f"{tally.loss_sum.item() / n_good:.3f}",
                            acc=f"{tally.correct.item() / n_good:.3f}", img_s=f"{rate:.0f}")
            bar.update(steps_done - bar.n)
        if on_step is not None:
            on_step(steps_done)
        if stop is not None:
            # One process stops right after the step; ranks agree at log points (one tiny all-reduce there).
            stopping = stop.requested if world == 1 else (log_point and distributed.any_rank(stop.requested, device))
            if stopping:
                break
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = tally.seconds()
    totals = distributed.sum_(torch.stack([tally.loss_sum, tally.correct.float(), tally.good_images.float(),
                                           tally.skipped.float()]))
    n_good = max(totals[2].item(), 1)
    stats = {"train_loss": totals[0].item() / n_good, "train_acc": totals[1].item() / n_good,
             "train_images_per_s": tally.seen * world / elapsed, "train_time_s": elapsed,
             "skipped_steps": int(totals[3].item()) // world, "steps_done": steps_done,
             "completed": steps_done >= len(loader)}
    if device.type == "cuda":
        stats["gpu_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return stats


@torch.inference_mode()
def collect_logits(model, loader, amp_dtype, tta="none", static_batch=None):
    """float32 logits (N, C) and labels (N,) of a whole split, in split-list order, on the model's device; under
    torchrun every rank's part, gathered (each image once). tta="flip" averages the logits of each image and its
    mirror. static_batch pads a short batch to that size (torch.compile: no recompilation for the last batch)."""
    device = next(model.parameters()).device
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        n = images.shape[0]
        if static_batch and n < static_batch:
            images = torch.cat([images, images.new_zeros((static_batch - n,) + images.shape[1:])])
            images = images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images
        with devices.autocast(device, amp_dtype):
            # clone(): under torch.compile's CUDA graphs an output is overwritten by the next call.
            logits = model(images).float().clone()
            if tta == "flip":
                logits = (logits + model(images.flip(3)).float()) / 2
        all_logits.append(logits[:n])
        all_labels.append(labels)
    return distributed.gather_rows(torch.cat(all_logits)), distributed.gather_rows(torch.cat(all_labels))


def evaluate(model, loader, num_classes, amp_dtype, prefix="val", static_batch=None):
    """Every metrics.METRICS figure of a whole split (the short last batch included), as {prefix}_top1, ...;
    under torchrun every rank returns the figures of the whole split."""
    device = next(model.parameters()).device
    start = time.perf_counter()
    logits, labels = collect_logits(model, loader, amp_dtype, static_batch=static_batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    m = metrics.split_metrics(logits, labels, num_classes)
    return {**metrics.prefixed(m, prefix), f"{prefix}_images_per_s": m["images"] / elapsed}


def evaluate_weights(path, cfg, split, num_classes, device, amp_dtype, batch_size, tta="none", rank=0, world=1):
    """(logits, labels, figures) of a weights file (best.pth, last.pth, released weights) on one split of cfg's
    data root, evaluated as the run evaluates: its arch, memory layout, val transform, loader and AMP. Training's
    end-of-run table and evaluate.py both call it; logits and labels come back on the CPU."""
    model = model_utils.load_trained(path, num_classes, cfg["arch"])
    model = model.to(device, memory_format=model_utils.memory_format(cfg["channels_last"]))
    loader = data_utils.build_loader(cfg["data_root"], split, batch_size, device,
                                     data_utils.data_settings(cfg, amp_dtype or torch.float32, cache=False), rank,
                                     world, train=False)
    logits, labels = collect_logits(model, loader, amp_dtype, tta)
    logits, labels = logits.cpu(), labels.cpu()
    return logits, labels, metrics.split_metrics(logits, labels, num_classes)
