"""Evaluate a trained run, plot its curves, or compare runs.

    python evaluate.py --checkpoint checkpoints/r18_pretrain_lowwd_mix02            # best.pth of a run folder
    python evaluate.py --checkpoint checkpoints/cpu_smoke/last.pth --tta flip
    python evaluate.py --checkpoint checkpoints/cpu_smoke --split test              # needs --test_per_class
    python evaluate.py --curves checkpoints/cpu_smoke                               # curves.png of a run
    python evaluate.py --compare checkpoints/*                                      # markdown table of runs

The architecture, image size, data root, loader and AMP mode come from the run's config.json (beside the
checkpoint), so no training flag has to be repeated. Evaluation uses the training loaders (DALI by default), AMP
and channels_last, so it reproduces the training run's own evaluation of the same weights.
Writes into <run>/eval_<split>[_flip]/: report.json, per_class.csv, confusion.png, wrong.png.
"""
import argparse
import csv
import json
import math
import os
import sys

import torch

import data_utils
import model_utils
import presets
import train_caltech101 as train


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


def write_per_class(m, classes, path):
    rows = [{"index": i, "class": c, "support": m["support"][i], "correct": m["correct"][i],
             "accuracy": m["recall"][i], "precision": m["precision"][i], "recall": m["recall"][i],
             "predicted": m["predicted"][i]} for i, c in enumerate(classes)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_confusion(confusion, classes, path):
    """Row-normalised confusion matrix, sized so that 101 class names stay legible."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    rates = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
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
    ax.set_title("confusion matrix (each row sums to 1)")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_wrong(logits, pred, labels, files, image_root, classes, path, count=16):
    """A grid of the most confidently wrong images with their true and predicted labels (`pred`: split_metrics'
    top-1, so the grid and the figures count the same mistakes); returns their list."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = logits.softmax(1).gather(1, pred[:, None])[:, 0]
    wrong = (pred != labels).nonzero().flatten()
    order = wrong[conf[wrong].argsort(descending=True)][:count].tolist()
    listed = [{"file": files[i], "true": classes[labels[i]], "predicted": classes[pred[i]],
               "confidence": conf[i].item()} for i in order]
    cols = 4
    rows = max(1, math.ceil(len(order) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.2, rows * 3.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, listed):
        ax.imshow(data_utils.load_rgb(os.path.join(image_root, item["file"])))
        ax.set_title(f"true: {item['true']}\npred: {item['predicted']} ({item['confidence']:.2f})", fontsize=8)
    if not listed:
        axes.flat[0].text(0.5, 0.5, "no wrong predictions", ha="center")
    fig.suptitle("most confidently wrong")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return listed


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.csv")
    try:
        with open(path) as f:
            return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
                    for row in csv.DictReader(f)]
    except FileNotFoundError:
        raise presets.ConfigError(f"no metrics.csv in {run_dir}: is it a training run folder?") from None


def plot_curves(run_dir, path=None):
    """curves.png: train/val loss, accuracies and the LR of every parameter group, per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    path = path or os.path.join(run_dir, "curves.png")
    epochs = [r["epoch"] for r in rows]

    def series(key):
        points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(16, 4.5))
    ax_loss.plot(*series("train_loss"), label="train (mixed targets)")
    ax_loss.plot(*series("val_loss"), "o-", label="val")
    ax_loss.set_title("loss")
    ax_acc.plot(*series("train_acc"), label="train top-1")
    ax_acc.plot(*series("val_top1"), "o-", label="val top-1")
    ax_acc.plot(*series("val_mean_class_acc"), "s-", label="val mean per-class")
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare_runs(run_dirs):
    """A markdown table of training runs: preset, init, epochs, best val top-1 and its mean per-class accuracy."""
    lines = ["| run | preset | arch | init | epochs | best val top-1 | mean per-class | best epoch | wall time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run_dir in run_dirs:
        if not os.path.isfile(os.path.join(run_dir, "metrics.csv")):
            continue  # not a run folder (e.g. checkpoints/README.md)
        cfg = read_run_config(run_dir)
        rows = read_metrics(run_dir)
        evaluated = [r for r in rows if r.get("val_top1") is not None]
        best = max(evaluated, key=lambda r: r["val_top1"]) if evaluated else None
        init = "local weights" if cfg.get("weights") else ("ImageNet" if cfg.get("pretrained") else "scratch")
        wall = rows[-1].get("wall_time_s") or 0.0
        lines.append(f"| {os.path.basename(os.path.normpath(run_dir))} | {cfg.get('exp')} | {cfg.get('arch')} | {init} "
                     f"| {int(rows[-1]['epoch'])}/{cfg.get('epochs')} | "
                     + (f"{best['val_top1']:.4f} | {best['val_mean_class_acc']:.4f} | {int(best['epoch'])}"
                        if best else "- | - | -") + f" | {wall / 60:.1f} min |")
    return "\n".join(lines)


def get_args_parser():
    p = argparse.ArgumentParser(description="Evaluate a run, plot its curves, or compare runs.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", help="best.pth / last.pth, or a run folder (uses its best.pth)")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--tta", default="none", choices=("none", "flip"), help="flip: mean of image and mirror logits")
    p.add_argument("--data_root", default=None, help="override the run's data root")
    p.add_argument("--loader", default=None, choices=("dali", "torch"), help="override the run's loader")
    p.add_argument("--device", default=None, choices=("auto", "cuda", "cpu"), help="override the run's device")
    p.add_argument("--batch_size", type=int, default=None, help="images per step (default: the run's eval batch)")
    p.add_argument("--workers", type=int, default=None, help="loader threads (default: the run's)")
    p.add_argument("--out_dir", default=None, help="where reports go (default: <run>/eval_<split>[_flip])")
    p.add_argument("--curves", metavar="RUN_DIR", help="only write RUN_DIR/curves.png")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="only print a markdown table of these runs")
    return p


def evaluate_checkpoint(args):
    path, run_dir = resolve_checkpoint(args.checkpoint)
    cfg = read_run_config(run_dir)
    for key in ("data_root", "loader", "device", "workers"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    device = train.resolve_device(cfg["device"])
    amp_dtype, _ = train.resolve_amp(cfg["amp"], device)
    classes = data_utils.read_classes(cfg["data_root"])
    model = model_utils.load_trained(path, len(classes), cfg["arch"])
    memory_format = torch.channels_last if cfg.get("channels_last", True) else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    loader = data_utils.build_loader(cfg["data_root"], args.split, cfg["img_size"],
                                     args.batch_size or cfg["eval_batch_size"], device,
                                     dtype=amp_dtype or torch.float32, loader=cfg["loader"], workers=cfg["workers"],
                                     seed=cfg["seed"])
    files, _ = data_utils.read_split(cfg["data_root"], args.split)
    logits, labels = train.collect_logits(model, loader, amp_dtype, args.tta)
    logits, labels = logits.cpu(), labels.cpu()
    m = train.split_metrics(logits, labels, len(classes))
    out_dir = args.out_dir or os.path.join(run_dir, f"eval_{args.split}" + ("_flip" if args.tta == "flip" else ""))
    os.makedirs(out_dir, exist_ok=True)
    write_per_class(m, classes, os.path.join(out_dir, "per_class.csv"))
    plot_confusion(m["confusion"], classes, os.path.join(out_dir, "confusion.png"))
    wrong = plot_wrong(logits, m["pred"], labels, files, os.path.join(cfg["data_root"], data_utils.IMAGES_DIR),
                       classes, os.path.join(out_dir, "wrong.png"))
    report = {"checkpoint": os.path.abspath(path), "split": args.split, "tta": args.tta, "arch": cfg["arch"],
              "img_size": cfg["img_size"], "amp": str(amp_dtype), **{k: m[k] for k in
                                                                     ("top1", "top5", "mean_class_acc", "loss",
                                                                      "images")},
              "per_class": {c: {"support": m["support"][i], "accuracy": m["recall"][i],
                                "precision": m["precision"][i]} for i, c in enumerate(classes)},
              "most_confident_wrong": wrong}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"{path} on {args.split} ({m['images']} images, tta={args.tta}): top-1 {m['top1']:.4f}  "
          f"top-5 {m['top5']:.4f}  mean per-class {m['mean_class_acc']:.4f}  loss {m['loss']:.4f}")
    worst = sorted((i for i in range(len(classes)) if m["support"][i]), key=lambda i: m["recall"][i])[:10]
    print("| worst classes | accuracy | precision | support |\n|---|---|---|---|")
    for i in worst:
        print(f"| {classes[i]} | {m['recall'][i]:.3f} | {m['precision'][i]:.3f} | {m['support'][i]} |")
    print(f"reports: {out_dir}/ (report.json, per_class.csv, confusion.png, wrong.png)")
    return report


def main(args):
    if args.compare:
        print(compare_runs(args.compare))
    elif args.curves:
        print(plot_curves(args.curves))
    elif args.checkpoint:
        return evaluate_checkpoint(args)
    else:
        raise presets.ConfigError("give --checkpoint, --curves RUN_DIR or --compare RUN_DIR...")


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (presets.ConfigError, data_utils.DataError, model_utils.ModelError) as e:
        sys.exit(f"error: {e}")
