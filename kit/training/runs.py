"""Run folders: what one holds, the rule that a new run never reuses one (claimed atomically), finding the newest
run of a preset, and reading a run back for evaluation, prediction and export (its weights, config, classes,
training list, metrics). Nothing here imports the training engine or the data loaders.

    run_dir = runs.new_run_dir("checkpoints", "cpu_smoke")     # never an existing run's folder
    run = runs.open_run("checkpoints/cpu_smoke")                # weights path, settings, class names, split
    rows = runs.read_metrics("checkpoints/cpu_smoke")           # metrics.csv, numbers as floats

A run folder holds: best.pth (released weights), best_loss.pth (lowest val loss), last.pth (everything to resume),
config.json (the resolved settings, the split's identity, the world size), classes.txt, train_list.txt (the
training images, so evaluation can refuse an overlapping split), metrics.csv, summary.json, tb/, curves.png,
run.claim, and with --keep_checkpoints epoch_XXX.pth.
"""
import csv
import json
import os
import re
import shutil
import socket
import time

import model_utils
import presets
from kit.base import errors
from kit.data import splits
from kit.models import weights_file

CLAIM_FILE = "run.claim"  # created exclusively: the one step that makes a folder this run's
RUN_MARKERS = (CLAIM_FILE, "config.json", "last.pth", "best.pth", "metrics.csv")


def holds_run(folder):
    return any(os.path.exists(os.path.join(folder, name)) for name in RUN_MARKERS)


def run_folders(out_dir, exp):
    """Existing run folders of `exp` in out_dir, oldest first: exp, exp_2, exp_3, ..."""
    try:
        names = os.listdir(out_dir)
    except FileNotFoundError:
        return []
    pattern = re.compile(re.escape(exp) + r"(?:_(\d+))?$")
    found = [(int(m.group(1) or 1), name) for name in names if (m := pattern.match(name))
             and os.path.isdir(os.path.join(out_dir, name))]
    return [os.path.join(out_dir, name) for _, name in sorted(found)]


def new_run_dir(out_dir, exp):
    """Claim out_dir/exp, or the first of exp_2, exp_3, ... that holds no run, for a new run: a new run never
    overwrites an old one, and runs started at the same moment (a sweep's workers, a job array) never share a
    folder. The claim is one exclusive, atomic step (O_CREAT | O_EXCL of the folder's run.claim): of two
    processes that reach the same folder together, exactly one creates it; the other moves on to the next name."""
    for n in range(1, 10_000):
        folder = os.path.join(out_dir, exp if n == 1 else f"{exp}_{n}")
        if holds_run(folder):
            continue
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(os.path.join(folder, CLAIM_FILE), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue  # claimed by another run between the check and here
        except OSError as e:
            raise errors.ConfigError(f"cannot write to the output folder {folder}: {e.strerror}") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"pid {os.getpid()} on {socket.gethostname()} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        return folder
    raise errors.ConfigError(f"{out_dir} holds 9,999 runs of {exp}: clean it up")


def auto_resume_path(out_dir, exp):
    """--resume auto: the last.pth of the newest run folder of exp (None: start fresh)."""
    for folder in reversed(run_folders(out_dir, exp)):
        if os.path.isfile(os.path.join(folder, "last.pth")):
            return os.path.join(folder, "last.pth")
    return None


def resolve_checkpoint(path):
    """(checkpoint file, run folder) for a .pth or a run folder (its best.pth)."""
    if os.path.isdir(path):
        path = os.path.join(path, "best.pth")
    if not os.path.isfile(path):
        raise errors.ModelError(f"no checkpoint at {path}")
    return path, os.path.dirname(os.path.abspath(path))


def kit_version():
    """'commit 1a2b3c4' (with '-dirty' when the checkout has local changes) of the kit's own folder, or 'unknown'
    when it is not a git checkout (a copied folder, a wheel)."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "describe", "--always",
                              "--dirty", "--abbrev=10"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"commit {out.stdout.strip()}" if out.returncode == 0 and out.stdout.strip() else "unknown (not a git " \
        "checkout)"


def read_run_config(run_dir, required=True):
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        if not required:
            return None
        raise errors.ConfigError(f"no config.json in {run_dir}: not a run folder (for bare weights pass --arch, "
                                  f"--img_size and --classes)") from None
    except ValueError as e:
        raise errors.ConfigError(f"{path} is not valid JSON: {e}") from None


def read_summary(run_dir):
    """summary.json's content, or None: a run that has not finished (or bare weights, run_dir None)."""
    if run_dir is None:
        return None
    try:
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise errors.ConfigError(f"{os.path.join(run_dir, 'summary.json')} is not valid JSON: {e}") from None


def _number(text):
    if text in ("", None):
        return None
    try:
        return float(text)
    except ValueError:
        return text


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.csv")
    try:
        with open(path, encoding="utf-8") as f:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except FileNotFoundError:
        raise errors.ConfigError(f"no metrics.csv in {run_dir}: is it a training run folder?") from None


def copy_into_run(src, run_dir, name):
    shutil.copyfile(src, os.path.join(run_dir, name))


class Run:
    """A trained model's context for evaluation and prediction: where its weights are, its settings, its class
    names and (for a run folder) the identity of its split and its training list."""

    def __init__(self, path, run_dir, cfg, classes, split=None, train_files=None):
        self.path, self.run_dir, self.cfg, self.classes = path, run_dir, cfg, classes
        self.split, self.train_files = split, train_files

    @property
    def arch(self):
        return self.cfg["arch"]

    @property
    def img_size(self):
        """The resolution the run is evaluated and deployed at (predict, export): presets.eval_size."""
        return presets.eval_size(self.cfg)


def safetensors_run(path, run_dir, arch, img_size, classes, data_root):
    """A Run of a .safetensors file with no run folder around it: its metadata gives the architecture, the
    evaluation size and the class names (flags that disagree with it are refused; --classes may rename them)."""
    meta = weights_file.read_metadata(path)
    for flag, given, recorded in (("--arch", arch, meta["arch"]), ("--img_size", img_size, meta["eval_size"])):
        if given is not None and given != recorded:
            raise errors.ConfigError(f"{flag} {given}: {path} is {flag[2:]}={recorded} (its metadata)")
    names = splits.read_class_file(classes) if classes else meta["classes"]
    if len(names) != meta["num_classes"]:
        raise errors.ConfigError(f"--classes {classes} names {len(names)} classes; {path} has {meta['num_classes']}")
    cfg = presets.resolve("r18_pretrain_main", {"arch": meta["arch"], "img_size": meta["eval_size"],
                                                "pretrained": False, **({"data_root": data_root} if data_root else {})})
    return Run(path, run_dir, cfg, names)


def add_weight_flags(parser, img_size_help="bare weights: the training image size"):
    """--arch, --img_size and --classes: what bare released weights (a state dict with no run folder) need, for
    the scripts that read a run back (evaluate, predict, export)."""
    parser.add_argument("--arch", default=None, choices=model_utils.ARCHS, help="bare weights: the architecture")
    parser.add_argument("--img_size", type=int, default=None, help=img_size_help)
    parser.add_argument("--classes", default=None, help="bare weights: class names, one per line (label order)")


def open_run(path, arch=None, img_size=None, classes=None, data_root=None, any_size=False):
    """A Run from a run folder, a .pth in one, or bare released weights (then arch, img_size and a class file are
    needed, and the missing ones are named). any_size=True (evaluate.py): img_size on a run folder is the
    resolution to evaluate it at instead of a check. The class names come from the run folder itself, so a copied run
    folder predicts without its data root; an older run without classes.txt reads the data root's, and refuses
    them if they are not the ones it was trained on."""
    path, run_dir = resolve_checkpoint(path)
    cfg = read_run_config(run_dir, required=False)
    if cfg is None and weights_file.is_safetensors(path):
        return safetensors_run(path, run_dir, arch, img_size, classes, data_root)
    if cfg is None:
        missing = [flag for flag, value in (("--arch", arch), ("--img_size", img_size), ("--classes", classes))
                   if value is None]
        if missing:
            raise errors.ConfigError(f"{path} has no config.json beside it (bare weights): pass "
                                      f"{', '.join(missing)}")
        cfg = presets.resolve("r18_pretrain_main", {"arch": arch, "img_size": img_size, "pretrained": False,
                                                    **({"data_root": data_root} if data_root else {})})
        return Run(path, run_dir, cfg, splits.read_class_file(classes))
    if arch is not None and arch != cfg["arch"]:
        raise errors.ConfigError(f"--arch {arch}: the run in {run_dir} is arch={cfg['arch']}")
    sizes = {cfg["img_size"], presets.eval_size(cfg)}  # its training and evaluation resolutions
    if img_size is not None and not any_size and img_size not in sizes:
        raise errors.ConfigError(f"--img_size {img_size}: the run in {run_dir} is img_size={cfg['img_size']}"
                                  + (f", eval_img_size={cfg['eval_img_size']}" if len(sizes) > 1 else ""))
    split = cfg.get("split")
    if classes:
        names = splits.read_class_file(classes)
    elif os.path.isfile(os.path.join(run_dir, "classes.txt")):
        names = splits.read_class_file(os.path.join(run_dir, "classes.txt"))
    else:
        root = data_root or cfg["data_root"]
        names = splits.read_classes(root)
        recorded = (split or {}).get("classes")
        if recorded and splits.file_digest(os.path.join(root, "classes.txt")) != recorded:
            raise errors.ConfigError(f"{root}/classes.txt is not the class list {run_dir} was trained with; pass "
                                      f"the right one with --classes FILE")
    cfg = {**presets.DEFAULTS, **cfg}  # a run from an older kit: settings added since take their defaults
    if any_size and img_size is not None:
        cfg["eval_img_size"] = img_size
    train_list = os.path.join(run_dir, "train_list.txt")
    train_files = splits.read_split_lines(train_list)[0] if os.path.isfile(train_list) else None
    return Run(path, run_dir, cfg, names, split, train_files)
