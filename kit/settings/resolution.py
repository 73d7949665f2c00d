"""The train-resolution schedule of progressive resizing: which size each epoch's train crops take, how it is
printed, and how a preset's schedule follows other img_size / epochs settings.

    sizes = resolution.train_sizes(cfg)        # [64, 64, ..., 80, ..., 96]: item 0 is epoch 1
    print(resolution.describe_sizes(sizes))    # 64 px epochs 1-15, 80 px epochs 16-23, 96 px epochs 24-32

presets.py holds the settings (img_size_start, img_size_ramp, img_size_step) and calls fit_size_schedule while it
resolves them; every loader takes its epoch's size from sampling.SamplePlan.out_size, built from train_sizes.
"""
import os

from kit.base import errors


def parse_ramp(text, epochs):
    """'A,B' -> (A, B), the epochs between which the train size rises; None: a quarter and three quarters of the run."""
    if text is None:
        return epochs // 4, (3 * epochs) // 4
    try:
        first, last = (int(part) for part in str(text).split(","))
    except ValueError:
        raise errors.ConfigError(f"img_size_ramp={text!r}: expected two epochs 'A,B', e.g. 8,24") from None
    if not 0 <= first < last <= epochs:
        raise errors.ConfigError(f"img_size_ramp={text!r}: needs 0 <= A < B <= epochs ({epochs})")
    return first, last


def train_sizes(cfg):
    """The train crop size of every epoch (item 0: epoch 1). Without img_size_start, img_size throughout; with it,
    img_size_start up to epoch A of img_size_ramp, then the linear rise to img_size at epoch B rounded down to a
    multiple of img_size_step (never below the start), and img_size from epoch B on, so BatchNorm and the head
    settle at the final size."""
    final, start, epochs = cfg["img_size"], cfg.get("img_size_start", 0), cfg["epochs"]
    if not start:
        return [final] * epochs
    first, last = parse_ramp(cfg.get("img_size_ramp"), epochs)
    step = cfg.get("img_size_step", 16)
    sizes = []
    for epoch in range(1, epochs + 1):
        if epoch >= last:  # also a run too short for a ramp (the default one of 1-3 epochs: A = B)
            sizes.append(final)
            continue
        rising = start + (final - start) * max(epoch - first, 0) // (last - first)
        sizes.append(max(start, rising // step * step))
    return sizes


def describe_sizes(sizes):
    """'64 px epochs 1-8, 80 px epochs 9-16, 96 px epochs 17-32'."""
    spans, begin = [], 1
    for epoch in range(2, len(sizes) + 2):
        if epoch > len(sizes) or sizes[epoch - 1] != sizes[begin - 1]:
            epochs = f"epoch {begin}" if begin == epoch - 1 else f"epochs {begin}-{epoch - 1}"
            spans.append(f"{sizes[begin - 1]} px {epochs}")
            begin = epoch
    return ", ".join(spans)


def fit_size_schedule(cfg, schedule_from, where):
    """A resolution schedule set before img_size or epochs were changed (a preset's, under `--img_size 32 --epochs
    1`): another final size drops it (its start size was chosen for the preset's); other epochs scale its ramp
    (a ramp left to its default is a share of the run already), or drop it where no ramp is left. Said in one
    line on stdout (a user error after it stays one line on stderr), never an error. `schedule_from`: the settings
    as they stood when the schedule was last set."""
    if not cfg["img_size_start"]:
        return
    before = f"img_size_start {cfg['img_size_start']}" + (f", img_size_ramp {cfg['img_size_ramp']}"
                                                           if cfg["img_size_ramp"] else "")
    if cfg["img_size"] != schedule_from["img_size"]:
        cfg["img_size_start"], cfg["img_size_ramp"] = 0, None
        after = f"dropped for img_size {cfg['img_size']} (pass --img_size_start to ramp up to it)"
    elif cfg["img_size_ramp"] is not None and cfg["epochs"] != schedule_from["epochs"]:
        first, last = parse_ramp(cfg["img_size_ramp"], schedule_from["epochs"])
        first, last = first * cfg["epochs"] // schedule_from["epochs"], -(-last * cfg["epochs"] //
                                                                         schedule_from["epochs"])
        if first < last:
            cfg["img_size_ramp"] = f"{first},{last}"
            after = f"img_size_ramp {cfg['img_size_ramp']} for {cfg['epochs']} epochs"
        else:
            cfg["img_size_start"], cfg["img_size_ramp"] = 0, None
            after = f"dropped: no ramp left in {cfg['epochs']} epochs"
    else:
        return
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {where}'s resolution schedule ({before}) {after}")  # stdout: stderr is for errors
