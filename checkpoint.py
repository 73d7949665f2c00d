"""Run state on disk: atomic writes, metrics.csv, RNG state, the graceful-stop handler, resuming from last.pth, and
reading a run folder back (its checkpoint, config and metrics).

    checkpoint.save_atomic(obj, "checkpoints/run/last.pth")    # temp file, fsync, rename: never a partial file
    state = checkpoint.load_checkpoint(path, cfg, model, optimizer, scheduler, scaler, mixer, train_loader)
"""
import csv
import errno
import io
import json
import os
import random
import signal
import sys

import numpy as np
import torch

import model_utils
import presets
from engine import TrainingError


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


def resolve_checkpoint(path):
    """(checkpoint file, run folder) for a .pth or a run folder (its best.pth)."""
    if os.path.isdir(path):
        path = os.path.join(path, "best.pth")
    if not os.path.isfile(path):
        raise model_utils.ModelError(f"no checkpoint at {path}")
    return path, os.path.dirname(os.path.abspath(path))


def read_run_config(run_dir):
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise presets.ConfigError(f"no config.json in {run_dir}: pass --arch, --img_size and --data_root") from None
    except ValueError as e:
        raise presets.ConfigError(f"{path} is not valid JSON: {e}") from None


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.csv")
    try:
        with open(path) as f:
            return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
                    for row in csv.DictReader(f)]
    except FileNotFoundError:
        raise presets.ConfigError(f"no metrics.csv in {run_dir}: is it a training run folder?") from None

