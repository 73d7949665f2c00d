"""The kit's figures of a split, in one place: what each metric is, which way is better, how it is printed.

Training's evaluation, best.pth and early stopping (--monitor), the run's summary table, evaluate.py's report and
the epoch log all read the metric list from here, so a new metric is one entry in METRICS and its line in
split_metrics.

    import metrics
    m = metrics.split_metrics(logits, labels, num_classes)      # {"top1": ..., "top5": ..., ..., "confusion": ...}
    print(metrics.describe(m))                                  # top-1 0.9123  top-5 0.9876  ...
    row = metrics.prefixed(m, "val")                            # {"val_top1": ..., "val_images": ...}
"""
import torch
import torch.nn.functional as F

# name -> (how it is printed, "max" if higher is better else "min"). Every one is reported for every split and can
# be monitored as val_<name>.
METRICS = {
    "top1": ("top-1", "max"),
    "top5": ("top-5", "max"),
    "mean_class_acc": ("mean per-class", "max"),  # the mean of per-class accuracies (recalls): balanced accuracy
    "loss": ("loss", "min"),  # cross-entropy against the hard labels
}
SUMMARY = ("top1", "mean_class_acc")  # the columns of the run's summary table and of evaluate.py --compare
MONITORS = tuple(f"val_{name}" for name in METRICS)


def minimized(monitor):
    """Whether a monitored figure (val_<metric>) improves by going down."""
    return METRICS[monitor.split("_", 1)[1]][1] == "min"


def split_metrics(logits, labels, num_classes):
    """Every METRICS figure of a split, its image count and the per-class figures (per-class accuracy is per-class
    recall). The one definition that training's evaluation and evaluate.py both use, so their figures agree."""
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


def prefixed(m, prefix):
    """A split's figures as metrics.csv columns: {prefix}_<metric> and {prefix}_images."""
    return {f"{prefix}_{name}": m[name] for name in (*METRICS, "images")}


def of_split(row, prefix):
    """The figures of one split back out of a metrics row ({} when the row has no evaluation of it)."""
    if f"{prefix}_{next(iter(METRICS))}" not in row:
        return {}
    return {name: row.get(f"{prefix}_{name}") for name in (*METRICS, "images")}


def describe(m, names=METRICS):
    """'top-1 0.9123  top-5 0.9876  mean per-class 0.9001  loss 0.3456' (names: which metrics, in that order)."""
    return "  ".join(f"{METRICS[name][0]} {m[name]:.4f}" for name in names)
