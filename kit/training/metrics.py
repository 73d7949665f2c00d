"""The kit's figures of a split, in one place: what each metric is, which way is better, how it is printed.

Training's evaluation, best.pth and early stopping (--monitor), the run's summary table, evaluate.py's report and
the epoch log all read the metric list from here, so a new metric is one entry in METRICS and its line in
split_metrics.

    from kit.training import metrics
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


def describe(m):
    """'top-1 0.9123  top-5 0.9876  mean per-class 0.9001  loss 0.3456'."""
    return "  ".join(f"{METRICS[name][0]} {m[name]:.4f}" for name in METRICS)


def time_to_reach(rows, monitor="val_top1"):
    """When a run first reached each value it evaluated: [{monitor: value, "epoch", "wall_time_s"}] for every
    evaluation that beat all earlier ones (any evaluated value v was first reached at the first record >= v).
    Rows are metrics.csv's, whose wall time is taken after the epoch's evaluation."""
    sign = -1 if minimized(monitor) else 1
    records, best = [], None
    for row in rows:
        value = row.get(monitor)
        if value is None or value != value:  # not evaluated, or NaN
            continue
        if best is None or sign * value > sign * best:
            best = value
            records.append({monitor: value, "epoch": row["epoch"], "wall_time_s": row["wall_time_s"]})
    return records


def describe_time_to_reach(records, monitor="val_top1"):
    """'val_top1 first reached 0.4512 at 3.1 min (epoch 8), 0.6217 at 9.3 min (epoch 24), ...'."""
    return f"{monitor} first reached " + ", ".join(
        f"{r[monitor]:.4f} at {r['wall_time_s'] / 60:.1f} min (epoch {int(r['epoch'])})" for r in records)


def most_confident_wrong(logits, pred, labels, files, classes, count=24):
    """The split's mistakes, highest softmax confidence in the (wrong) top-1 first: [{file, true, predicted,
    confidence}], at most `count`. `pred` is split_metrics' top-1, so the list and the figures count the same
    mistakes; rows are in split-list order (`files`), as collect_logits returns them under torchrun too."""
    conf = logits.float().softmax(1).gather(1, pred[:, None])[:, 0]
    wrong = (pred != labels).nonzero().flatten()
    order = wrong[conf[wrong].argsort(descending=True, stable=True)][:count].tolist()
    return [{"file": files[i], "true": classes[labels[i]], "predicted": classes[pred[i]],
             "confidence": conf[i].item()} for i in order]


def confusions(m, classes, pairs=15, per_class=3, cap=60):
    """What a split's confusion matrix says, small enough for a page of 1,000 classes: each class's most frequent
    wrong predictions (`per_class`), the most confused (true, predicted) pairs, and the matrix restricted to the
    `cap` classes with the most mistakes (in or out) when there are more classes than that."""
    confusion = m["confusion"].clone()
    confusion.fill_diagonal_(0)
    top = {}
    for i, name in enumerate(classes):
        counts, idx = confusion[i].topk(min(per_class, len(classes)))
        top[name] = [[classes[j], c] for c, j in zip(counts.tolist(), idx.tolist()) if c > 0]
    flat = confusion.flatten()
    counts, idx = flat.topk(min(pairs, flat.numel()))
    pair_list = [{"true": classes[j // len(classes)], "predicted": classes[j % len(classes)], "count": c}
                 for c, j in zip(counts.tolist(), idx.tolist()) if c > 0]
    shown = list(range(len(classes)))
    if len(classes) > cap:
        errors = confusion.sum(0) + confusion.sum(1)
        shown = sorted(errors.argsort(descending=True, stable=True)[:cap].tolist())  # ties: lower index first
    keep = torch.tensor(shown)
    return {"per_class": top, "pairs": pair_list,
            "matrix": {"classes": [classes[i] for i in shown], "counts": m["confusion"][keep][:, keep].tolist(),
                       "row_totals": [m["support"][i] for i in shown], "shown": len(shown),
                       "of_classes": len(classes)}}
