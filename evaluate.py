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
import os
import sys

import torch

import data_utils
import engine
import model_utils
import plots
import presets
from checkpoint import read_metrics, read_run_config, resolve_checkpoint


def write_per_class(m, classes, path):
    rows = [{"index": i, "class": c, "support": m["support"][i], "correct": m["correct"][i],
             "accuracy": m["recall"][i], "precision": m["precision"][i], "recall": m["recall"][i],
             "predicted": m["predicted"][i]} for i, c in enumerate(classes)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


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
    device = engine.resolve_device(cfg["device"])
    amp_dtype, _ = engine.resolve_amp(cfg["amp"], device)
    classes = data_utils.read_classes(cfg["data_root"])
    model = model_utils.load_trained(path, len(classes), cfg["arch"])
    memory_format = torch.channels_last if cfg.get("channels_last", True) else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    loader = data_utils.build_loader(cfg["data_root"], args.split, cfg["img_size"],
                                     args.batch_size or cfg["eval_batch_size"], device,
                                     dtype=amp_dtype or torch.float32, loader=cfg["loader"], workers=cfg["workers"],
                                     seed=cfg["seed"])
    files, _ = data_utils.read_split(cfg["data_root"], args.split)
    logits, labels = engine.collect_logits(model, loader, amp_dtype, args.tta)
    logits, labels = logits.cpu(), labels.cpu()
    m = engine.split_metrics(logits, labels, len(classes))
    out_dir = args.out_dir or os.path.join(run_dir, f"eval_{args.split}" + ("_flip" if args.tta == "flip" else ""))
    os.makedirs(out_dir, exist_ok=True)
    write_per_class(m, classes, os.path.join(out_dir, "per_class.csv"))
    plots.plot_confusion(m["confusion"], classes, os.path.join(out_dir, "confusion.png"))
    wrong = plots.plot_wrong(logits, m["pred"], labels, files, os.path.join(cfg["data_root"], data_utils.IMAGES_DIR),
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
        print(plots.plot_curves(args.curves))
    elif args.checkpoint:
        return evaluate_checkpoint(args)
    else:
        raise presets.ConfigError("give --checkpoint, --curves RUN_DIR or --compare RUN_DIR...")


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (presets.ConfigError, data_utils.DataError, model_utils.ModelError) as e:
        sys.exit(f"error: {e}")
