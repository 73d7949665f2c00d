"""Pictures of a run: training curves, the confusion matrix and the most confidently wrong images.

    plots.plot_curves("checkpoints/cpu_smoke")          # -> checkpoints/cpu_smoke/curves.png
"""
import functools
import io
import math
import os

from kit.base import fileio
from kit.data import splits
from kit.training import metrics, runs


def plain_text(plot):
    """Draw with every label as plain text: class names and run folders are never mathtext (matplotlib would parse
    'a$\\foo$' as TeX and fail), in every plot of the kit."""
    @functools.wraps(plot)
    def drawn_as_text(*args, **kwargs):
        import matplotlib
        matplotlib.use("Agg")
        with matplotlib.rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)
    return drawn_as_text


@plain_text
def plot_confusion(confusion, classes, path=None, title="confusion matrix (each row sums to 1)", dpi=110,
                   row_totals=None):
    """Row-normalised confusion matrix, sized so that 101 class names stay legible; PNG bytes when path is None.
    row_totals: each row's image count when the matrix shows some classes only (a row's share of all its images)."""
    import matplotlib.pyplot as plt
    import torch

    n = len(classes)
    confusion = torch.as_tensor(confusion)
    totals = confusion.sum(1, keepdim=True) if row_totals is None else torch.as_tensor(row_totals)[:, None]
    rates = confusion.double() / totals.clamp(min=1)
    side = max(6.0, 0.16 * n + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(rates.numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    font = 9 if n <= 30 else 5
    ax.set_xticklabels(classes, rotation=90, fontsize=font)
    ax.set_yticklabels(classes, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi)
    plt.close(fig)
    if path is None:
        return png.getvalue()
    fileio.write_atomic(png.getvalue(), path)
    return path


@plain_text
def plot_wrong(logits, pred, labels, files, image_root, classes, path, count=16):
    """A grid of the most confidently wrong images with their true and predicted labels (`pred`: split_metrics'
    top-1, so the grid and the figures count the same mistakes); returns their list."""
    import matplotlib.pyplot as plt

    listed = metrics.most_confident_wrong(logits, pred, labels, files, classes, count)
    cols = 4
    rows = max(1, math.ceil(len(listed) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.2, rows * 3.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, listed):
        ax.imshow(splits.load_rgb(os.path.join(image_root, item["file"])))
        ax.set_title(f"true: {item['true']}\npred: {item['predicted']} ({item['confidence']:.2f})", fontsize=8)
    if not listed:
        axes.flat[0].text(0.5, 0.5, "no wrong predictions", ha="center")
    fig.suptitle("most confidently wrong")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return listed


@plain_text
def plot_curves(run_dir, path=None):
    """curves.png: train/val loss, accuracies and the LR of every parameter group, per epoch."""
    import matplotlib.pyplot as plt

    rows = runs.read_metrics(run_dir)
    path = path or os.path.join(run_dir, "curves.png")
    epochs = [r["epoch"] for r in rows]

    def series(key):
        points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(16, 4.5))
    ax_loss.plot(*series("train_loss"), label="train (mixed targets)")
    ax_acc.plot(*series("train_acc"), label="train top-1")
    for name, (label, goal) in metrics.METRICS.items():  # losses beside the train loss, the rest as accuracies
        ax = ax_loss if goal == "min" else ax_acc
        ax.plot(*series(f"val_{name}"), "o-", label=f"val {label}")
    ax_loss.set_title("loss")
    ax_acc.set_title("accuracy")
    for key in (k for k in rows[0] if k.startswith("lr_")):
        ax_lr.plot(*series(key), label=key[3:])
    ax_lr.set_title("learning rate (end of epoch)")
    if all(r[k] > 0 for r in rows for k in r if k.startswith("lr_") and r[k] is not None):
        ax_lr.set_yscale("log")  # a schedule that ends at 0 stays linear
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)) + f" ({len(epochs)} epochs)")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    fileio.write_atomic(png.getvalue(), path)  # whole or not at all: a kill mid-write leaves no half picture
    return path


@plain_text
def plot_compare(run_dirs):
    """PNG bytes: the runs' val top-1 and val loss overlaid, against epoch and against wall time."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for run_dir in run_dirs:
        rows = [r for r in runs.read_metrics(run_dir) if r.get("val_top1") is not None]
        label = os.path.basename(os.path.normpath(run_dir))
        axes[0].plot([r["epoch"] for r in rows], [r["val_top1"] for r in rows], "o-", ms=3, label=label)
        axes[1].plot([r["wall_time_s"] / 60 for r in rows], [r["val_top1"] for r in rows], "o-", ms=3, label=label)
        axes[2].plot([r["epoch"] for r in rows], [r["val_loss"] for r in rows], "o-", ms=3, label=label)
    for ax, (title, xlabel) in zip(axes, (("val top-1", "epoch"), ("val top-1 against time", "wall time (min)"),
                                          ("val loss", "epoch"))):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    plt.close(fig)
    return png.getvalue()


@plain_text
def plot_lr_find(records, suggestions, head_lr, path):
    """lr_find.png: loss (raw and smoothed) against the head's LR, log scale, the suggestions marked."""
    import matplotlib.pyplot as plt

    lrs = [r[0] * head_lr for r in records]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, [r[1] for r in records], alpha=0.3, label="loss")
    ax.plot(lrs, [r[2] for r in records], label="smoothed (beta 0.98)")
    for (rule, mult), colour in zip(suggestions.items(), ("tab:red", "tab:green")):
        ax.axvline(mult * head_lr, color=colour, linestyle="--", label=f"{rule}: head lr {mult * head_lr:.2g}")
    ax.axvline(head_lr, color="grey", linestyle=":", label=f"the run's head lr {head_lr:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("head learning rate (every group scaled alike)")
    ax.set_ylabel("training loss")
    low = min(r[2] for r in records)
    ax.set_ylim(top=max(r[2] for r in records[: max(3, len(records) * 3 // 4)]) * 1.1, bottom=low * 0.9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
