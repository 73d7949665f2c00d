"""The training state on disk: last.pth written (training_state) and read back (restore) side by side, atomic and
background writes, metrics.csv, RNG state, the graceful-stop handler and the second-Ctrl-C exit.

    checkpoint.save_atomic(obj, "checkpoints/run/last.pth")    # temp file, fsync, rename: never a partial file
    state = checkpoint.training_state(parts, cfg, split_id, num_classes, rows, position)   # what last.pth holds
    loop_state, notes = checkpoint.restore(ckpt, path, parts, rank, world)                # and back

What a run folder holds and how it is read back for evaluation and prediction: runs.py.
"""
import csv
import dataclasses
import errno
import io
import os
import random
import re
import shutil
import signal
import sys
import threading

import numpy as np
import torch

import model_utils
import presets
from kit.base import distributed, errors, fileio

# ---------------------------------------------------------------------------------------------
# writing

def save_atomic(obj, path):
    """torch.save written whole or not at all (fileio.replacing); a full disk is a one-line errors.TrainingError."""
    try:
        with fileio.replacing(path) as f:
            torch.save(obj, f)
    except OSError as e:
        reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise errors.TrainingError(f"cannot write {path}: {reason}; the previous checkpoint is intact (free space, "
                                   f"then --resume auto)") from None
    except RuntimeError as e:
        if isinstance(e.__context__, KeyboardInterrupt):  # torch's zip writer reports a Ctrl-C mid-write so
            raise KeyboardInterrupt from None
        raise


def cpu_copy(obj):
    """A snapshot of a checkpoint: every tensor copied to the host, the rest shared (it is not mutated)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class BackgroundWriter:
    """Writes checkpoints from a host snapshot in a background thread, so training goes on during the disk write
    (about 140 MB for ResNet-18 with AdamW state). One write in flight; each is still save_atomic's temp file,
    fsync and rename. A failed write surfaces as its errors.TrainingError at the next submit() or wait()."""

    def __init__(self):
        self.thread, self.error = None, None

    def submit(self, obj, path, after=None):
        """Write obj to path, then call after() (e.g. keep an epoch's copy, now that the new file is safe)."""
        self.wait()
        snapshot = cpu_copy(obj)  # taken now: the training step that follows changes the live tensors
        self.thread = threading.Thread(target=self._write, args=(snapshot, path, after), name=errors.WRITER_THREAD)
        self.thread.start()

    def _write(self, obj, path, after):
        try:
            save_atomic(obj, path)
            if after is not None:
                after()
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self.error = e

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def normalize_rows(rows):
    """Every row with every column (evaluation columns are empty on epochs without an evaluation)."""
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    return [{k: row.get(k, "") for k in keys} for row in rows]


def write_metrics(rows, path):
    if not rows:
        return
    rows = normalize_rows(rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[-1].keys()))
    writer.writeheader()
    writer.writerows(rows)
    fileio.write_atomic(out.getvalue(), path)


# ---------------------------------------------------------------------------------------------
# signals and RNG

class GracefulStop:
    """First SIGINT/SIGTERM: finish the current step, save, exit. A second SIGINT interrupts at once."""

    def __init__(self, quiet=False):
        self.signum, self.quiet = None, quiet
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C raises KeyboardInterrupt
        if not self.quiet:
            print(f"\n{signal.Signals(signum).name}: stopping after this step"
                  + (" (Ctrl-C again to abort now)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)

    @property
    def requested(self):
        return self.signum is not None

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():  # as many GPUs as are visible now
        for index, gpu_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, index)


# ---------------------------------------------------------------------------------------------
# run folders

def format_flag(key, value):
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"--{key} {'none' if value is None else value}"


def resume_command(cfg, last_path):
    """The command that continues this run: its preset, every setting that differs from it, and its last.pth."""
    flags = [format_flag(k, cfg[k]) for k in presets.differing_keys(cfg) if k != "resume"]
    return " ".join(["python train_caltech101.py", f"--exp {cfg['exp']}", *flags, f"--resume {last_path}"])


def stopped(signum, cfg, next_epoch, next_step, last_path, main_rank=True):
    name = signal.Signals(signum).name
    if main_rank:
        print(f"{name}: state saved to {last_path} (next: epoch {next_epoch}, step {next_step}). Resume with:\n"
              f"  {resume_command(cfg, last_path)}\n  (under torchrun: the same torchrun command with these flags)",
              flush=True)
    return {"exit_code": 128 + signum, "out_dir": os.path.dirname(last_path)}


# ---------------------------------------------------------------------------------------------
# resuming

def read_training_checkpoint(path):
    ckpt = model_utils.safe_load(path)
    if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "next_epoch" not in ckpt or "config" not in ckpt:
        raise errors.ConfigError(f"--resume {path}: not a last.pth training checkpoint of this kit")
    return ckpt


def resume_settings(ckpt, cfg, explicit, path):
    """The settings of a resumed run: the checkpoint's, except where the command line asked otherwise; a
    run-defining setting (presets.RUN_DEFINING) that differs is refused, any other is applied with a note; the run
    folder (output settings) is last.pth's. `explicit`: the keys the user set (None: every key of cfg counts as set).
    The loader is this machine's choice (every loader follows the run's one sampling plan)."""
    saved, notes = {**presets.DEFAULTS, **ckpt["config"]}, []  # settings added since the file was written: defaults
    merged = dict(saved)
    for key in presets.DEFAULTS:
        if presets.SETTINGS[key].kind in (presets.OUTPUT, presets.LAUNCH) or cfg.get(key) == saved.get(key):
            continue
        if key == "loader":  # this machine's choice; training.main says when it is not the run's own
            merged[key] = cfg[key]
            continue
        if explicit is not None and key not in explicit:
            continue  # not asked for: the run's own value
        if key in presets.RUN_DEFINING:
            raise errors.ConfigError(
                f"--resume {path}: {key} was {saved.get(key)!r} in this run, the command asks {cfg.get(key)!r}; a "
                f"resumed run keeps the settings that define it (to change it, start a new run with --weights)")
        merged[key] = cfg[key]
        notes.append(f"{key} {saved.get(key)!r} -> {cfg[key]!r}")
    merged["resume"] = cfg["resume"]
    return merged, notes


@dataclasses.dataclass
class Parts:
    """Every stateful piece of a training run: what last.pth saves and --resume puts back."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    mixer: object  # augment.MixupCutmix: its random draws
    loader: object  # the train loader: its stream position
    ema: object = None  # engine.ModelEma or None
    stopper: object = None  # engine.EarlyStopping: best value, wait count, stop reason


def training_state(parts, cfg, split_id, num_classes, rows, position):
    """The last.pth dict. `position`: next_epoch, next_step (0 at an epoch end), tally (the unfinished epoch's
    engine.EpochTally, or None), wall_time_s (of the run so far), finished (the run is over: its last epoch or an
    early stop). Every rank must call it (the gathers)."""
    tally = position["tally"]
    ranks = distributed.gather_objects({"rng": rng_state(), "mixer_rng": parts.mixer.rng.bit_generator.state,
                                        "tally": tally.state_dict() if tally is not None else None})
    distributed.broadcast_buffers(parts.model)
    if parts.ema is not None:
        distributed.broadcast_buffers(parts.ema.module)
    next_epoch, next_step = position["next_epoch"], position["next_step"]
    return {"model": model_utils.export_state_dict(parts.model), "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
            "ema": parts.ema.state_dict() if parts.ema is not None else None,
            "early_stopping": parts.stopper.state_dict(), "loader": parts.loader.state_dict(),
            "epoch": next_epoch - 1 if next_step == 0 else next_epoch, "next_epoch": next_epoch,
            "next_step": next_step, "rows": rows, "ranks": ranks, "wall_time_s": position["wall_time_s"],
            "finished": position["finished"], "arch": cfg["arch"], "num_classes": num_classes, "config": cfg,
            "split": split_id, "world_size": distributed.world()}


class LastCheckpoint:
    """Writes a run's last.pth (training_state) through the background writer, with --keep_checkpoints' epoch files.
    Every rank calls save() (the state gathers); rank 0 writes."""

    def __init__(self, parts, cfg, split_id, num_classes, rows, run_dir, main_rank):
        self.parts, self.cfg, self.split_id, self.num_classes, self.rows = parts, cfg, split_id, num_classes, rows
        self.path, self.run_dir, self.main_rank = os.path.join(run_dir, "last.pth"), run_dir, main_rank
        self.writer = BackgroundWriter()

    def save(self, next_epoch, next_step, wall_time_s, tally=None, wait=False, finished=False):
        snapshot = training_state(self.parts, self.cfg, self.split_id, self.num_classes, self.rows, dict(
            next_epoch=next_epoch, next_step=next_step, tally=tally, wall_time_s=wall_time_s, finished=finished))
        if self.main_rank:
            keep = self.cfg["keep_checkpoints"] if next_step == 0 else 0
            epoch_path = os.path.join(self.run_dir, f"epoch_{next_epoch - 1:03d}.pth")
            self.writer.submit(snapshot, self.path, after=(lambda: keep_epoch_checkpoints(
                self.path, epoch_path, keep)) if keep else None)
            if wait:
                self.writer.wait()

    def wait(self):
        if self.main_rank:
            self.writer.wait()


def restore(ckpt, path, parts, rank, world):
    """Put every piece of training state back from a last.pth; returns (loop state, notes). The loop state:
    next_epoch, next_step, rows, wall_time_s and tally (this rank's unfinished-epoch sums, or None)."""
    notes = []
    model_utils.unwrap(parts.model).load_state_dict(ckpt["model"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    parts.scaler.load_state_dict(ckpt["scaler"])
    if parts.ema is not None and ckpt.get("ema") is not None:
        parts.ema.load_state_dict(ckpt["ema"])
    parts.stopper.load_state_dict(ckpt["early_stopping"])
    parts.loader.load_state_dict(ckpt["loader"])
    ranks = ckpt["ranks"]
    tallies = [r.get("tally") for r in ranks]
    if len(ranks) == world:
        set_rng_state(ranks[rank]["rng"])
        parts.mixer.rng.bit_generator.state = ranks[rank]["mixer_rng"]
        tally = tallies[rank]
    else:
        notes.append(f"{path} was written by {len(ranks)} process(es), this run has {world}: the data order and crops "
                     f"continue exactly, each rank's MixUp/CutMix draws and BatchNorm batches start afresh")
        tally = moved_tally(tallies, rank)
    rows = ckpt["rows"]
    return {"next_epoch": ckpt["next_epoch"], "next_step": ckpt["next_step"], "rows": rows,
            "wall_time_s": ckpt.get("wall_time_s", rows[-1]["wall_time_s"] if rows else 0.0),
            "tally": tally if ckpt["next_step"] else None}, notes


def moved_tally(tallies, rank):
    """This rank's share of an unfinished epoch's tally written by another number of ranks: rank 0 takes the sums
    (loss, correct, images, images seen: counted once, as the epoch's all-reduce adds ranks up); every rank keeps
    the skipped-step count and the non-finite streak, which every rank shares (ranks skip together)."""
    if tallies[0] is None:
        return None
    shared = {k: tallies[0][k] for k in ("skipped", "bad_streak", "seconds")}
    if rank == 0:
        return {**{k: sum(t[k] for t in tallies) for k in ("loss_sum", "correct", "good_images", "seen")}, **shared}
    return {**{k: tallies[0][k] * 0 for k in ("loss_sum", "correct", "good_images", "seen")}, **shared}


def is_finished(ckpt):
    """A last.pth of a run that is over: its last epoch done, or stopped early (older files: inferred)."""
    if "finished" in ckpt:
        return ckpt["finished"]
    return ckpt["next_epoch"] > ckpt["config"]["epochs"] or ckpt["early_stopping"].get("reason") is not None


def keep_epoch_checkpoints(last_path, epoch_path, keep):
    """After last.pth is safely written: epoch_path becomes the same file (a hard link: last.pth is only ever
    replaced, never rewritten in place, so the link keeps this epoch's state), then all but the newest `keep` epoch
    files are removed."""
    tmp = f"{epoch_path}.tmp.{os.getpid()}"
    try:
        os.link(last_path, tmp)
        os.replace(tmp, epoch_path)
    except OSError:  # a file system without hard links: write it again
        if os.path.exists(tmp):
            os.remove(tmp)
        shutil.copyfile(last_path, tmp)
        os.replace(tmp, epoch_path)
    run_dir = os.path.dirname(epoch_path)
    found = sorted((int(m.group(1)), name) for name in os.listdir(run_dir)
                   if (m := re.fullmatch(r"epoch_(\d+)\.pth", name)))
    for _, name in found[:-keep]:
        os.remove(os.path.join(run_dir, name))
