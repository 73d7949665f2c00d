"""Evaluate a trained run, plot its curves, or compare runs.

    python evaluate.py --checkpoint checkpoints/r18_pretrain_lowwd_mix02            # best.pth of a run folder
    python evaluate.py --checkpoint checkpoints/cpu_smoke/last.pth --tta flip
    python evaluate.py --checkpoint checkpoints/cpu_smoke --split test              # needs --test_per_class
    python evaluate.py --curves checkpoints/cpu_smoke                               # curves.png of a run
    python evaluate.py --compare checkpoints/*                                      # markdown table of runs

The architecture, image size, data root, loader and AMP mode come from the run's config.json (beside the
checkpoint), so no training flag has to be repeated. Evaluation uses the training loaders (DALI by default), AMP
and channels_last, so it reproduces the training run's own evaluation of the same weights.
Writes into <run>/eval_<split>[_flip]/: report.json, per_class.csv, confusion.png, wrong.png and report.html (the
run's page with this evaluation: per class, confusions, misclassified images, Grad-CAM; --no_report_page: not).
    python evaluate.py --compare checkpoints/a checkpoints/b --html compare.html    # the table as a page too
"""
import argparse
import csv
import json
import os
import sys

import presets
from kit.base import devices, errors
from kit.data import dali_loader, splits
from kit.reporting import plots, report_page
from kit.training import engine, metrics, runs


def write_per_class(m, classes, path):
    rows = [{"index": i, "class": c, "support": m["support"][i], "correct": m["correct"][i],
             "accuracy": m["recall"][i], "precision": m["precision"][i], "recall": m["recall"][i],
             "predicted": m["predicted"][i]} for i, c in enumerate(classes)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run_row(run_dir):
    """One run's figures: from summary.json (best epoch; train/val/test of best.pth) and metrics.csv."""
    if not os.path.isdir(run_dir) or not os.path.isfile(os.path.join(run_dir, "metrics.csv")):
        raise errors.ConfigError(f"{run_dir} is not a training run folder (no metrics.csv)")
    cfg = {**presets.DEFAULTS, **runs.read_run_config(run_dir)}  # an older run: settings added since as defaults
    rows = runs.read_metrics(run_dir)
    summary = runs.read_summary(run_dir)
    records = metrics.time_to_reach(rows, cfg["monitor"])  # an unfinished run: its best epoch so far
    best_epoch = summary["best"]["epoch"] if summary else (records[-1]["epoch"] if records else None)
    figures = {}
    for split in ("train", "val", "test"):
        m = (summary or {}).get("splits", {}).get(split)
        if m is None and split == "val" and best_epoch is not None:
            m = metrics.of_split(next(r for r in rows if r["epoch"] == best_epoch), "val")
        figures[split] = m
    return {"run": run_dir, "cfg": cfg, "best_epoch": best_epoch, "figures": figures,
            "epochs": f"{int(rows[-1]['epoch'])}/{cfg.get('epochs')}" if rows else "0",
            "wall": (rows[-1].get("wall_time_s") or 0.0) if rows else 0.0,
            "to_best": next((r.get("wall_time_s") for r in rows if r["epoch"] == best_epoch), None),
            "stopped": (summary or {}).get("early_stop")}


def compare_table(run_dirs):
    """(header, rows of cells, run folders) of the runs compared: the best epoch, and the train (through the val
    transform), val and test top-1 of best.pth with mean per-class accuracy; rows are told apart by run folder and
    the settings that differ between the runs. "-": no test split (or no figure)."""
    # `--compare checkpoints/*` meets other folders too (an LR finder's, a file): each is skipped with a note.
    found = [d for d in run_dirs if os.path.isfile(os.path.join(d, "metrics.csv"))]
    if not found:
        raise errors.ConfigError(f"--compare: none of the {len(run_dirs)} folder(s) given is a training run folder "
                                  f"(no metrics.csv)")
    for run_dir in run_dirs:
        if run_dir not in found:
            print(f"note: skipped {run_dir}: not a training run folder (no metrics.csv)", file=sys.stderr)
    runs = [run_row(d) for d in found]
    differing = [k for k in presets.COMPARED if len({json.dumps(r["cfg"].get(k)) for r in runs}) > 1]

    def fmt(m, key):
        return f"{m[key]:.4f}" if m and m.get(key) is not None else "-"

    columns = [(split, name) for name in metrics.SUMMARY for split in ("train", "val", "test")]
    head = ["run", "preset", *differing, "best epoch", "epochs run",
            *[f"{split} {metrics.METRICS[name][0]}" for split, name in columns], "wall time", "time to best"]
    rows = []
    for r in runs:
        f = r["figures"]
        rows.append([os.path.normpath(r["run"]), str(r["cfg"].get("exp")),
                     *[str(r["cfg"].get(k)) for k in differing], str(int(r["best_epoch"])) if r["best_epoch"] else "-",
                     r["epochs"] + (" (early stop)" if r["stopped"] else ""),
                     *[fmt(f[split], name) for split, name in columns], f"{r['wall'] / 60:.1f} min",
                     f"{r['to_best'] / 60:.1f} min" if r["to_best"] is not None else "-"])
    return head, rows, found


def compare_runs(run_dirs):
    """A markdown table of runs, as the multi-architecture kit reports them (see compare_table)."""
    head, rows, _ = compare_table(run_dirs)
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(cells) + " |" for cells in rows])


def write_compare_page(run_dirs, path):
    """compare.html: the comparison table and the runs' val curves overlaid (by epoch and by wall time)."""
    head, rows, found = compare_table(run_dirs)
    esc = report_page.esc
    curves = plots.plot_compare(found)
    sections = [("runs", "Runs", report_page.table([esc(h) for h in head], [[esc(c) for c in cells] for cells in rows],
                                                   sortable=True)),
                ("curves", "Validation curves", f'<div class="wide"><img alt="val curves of the runs" '
                                                f'src="{report_page.data_uri(curves, "image/png")}"></div>')]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return report_page.write(report_page.page(f"comparison of {len(found)} runs", sections,
                                              subtitle="best.pth of each run; click a heading to sort"), path)


def get_args_parser():
    p = argparse.ArgumentParser(description="Evaluate a run, plot its curves, or compare runs.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", help="best.pth / last.pth / best_loss.pth, or a run folder (uses its best.pth)")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--tta", default="none", choices=("none", "flip"), help="flip: mean of image and mirror logits")
    p.add_argument("--data_root", default=None, help="override the run's data root")
    p.add_argument("--loader", default=None, choices=presets.CHOICES["loader"], help="override the run's loader")
    p.add_argument("--device", default=None, help="override the run's device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--batch_size", type=int, default=None, help="images per step (default: the run's eval batch)")
    p.add_argument("--workers", type=int, default=None, help="loader threads (default: the run's)")
    p.add_argument("--out_dir", default=None, help="where reports go (default: <run>/eval_<split>[_flip])")
    runs.add_weight_flags(p, img_size_help="bare weights: the training image size; a run: evaluate at this "
                                           "resolution instead of its own (eval_img_size, else img_size)")
    p.add_argument("--allow_other_split", action="store_true",
                   help="evaluate although the data root's split lists are not the ones the run was trained on "
                        "(figures not comparable; never on images it trained on)")
    p.add_argument("--curves", metavar="RUN_DIR", help="only write RUN_DIR/curves.png")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="only print a markdown table of these runs")
    p.add_argument("--html", default=None, metavar="PATH", help="with --compare: also write the comparison as one "
                                                               "self-contained page (table and overlaid val curves)")
    p.add_argument("--no_report_page", action="store_true", help="do not write report.html beside report.json")
    return p


def check_split(run, data_root, split, allow_other):
    """Refuse figures that would silently be wrong: a re-split data root (unless asked), evaluated images that the
    run trained on (always), class lists that differ."""
    files, _ = splits.read_split(data_root, split)
    if run.train_files is not None:
        overlap = set(files) & set(run.train_files)
        if overlap:
            raise errors.ConfigError(f"{len(overlap)} of the {len(files)} {split} images in {data_root} are in the "
                                      f"training list of {run.run_dir} (e.g. {sorted(overlap)[0]}): refused, the "
                                      f"figures would count images it learned")
    if run.split is not None and splits.split_identity(data_root) != run.split:
        if not allow_other:
            raise errors.ConfigError(f"the split lists in {data_root} are not the ones {run.run_dir} was trained on "
                                      f"(re-split since?); its training images may be among the {split} images: "
                                      f"--allow_other_split evaluates anyway")
        print(f"WARNING: {data_root} holds another split than the one this run was trained on: these figures are "
              f"not comparable with the run's own", file=sys.stderr)
    if splits.read_classes(data_root) != run.classes:
        raise errors.ConfigError(f"{data_root}/classes.txt differs from the classes the run was trained on")
    return files


def evaluate_checkpoint(args):
    run = runs.open_run(args.checkpoint, args.arch, args.img_size, args.classes, args.data_root, any_size=True)
    cfg = dict(run.cfg)
    for key in ("data_root", "loader", "device", "workers"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.batch_size is not None and args.batch_size < 1:
        raise errors.ConfigError(f"--batch_size must be at least 1, got {args.batch_size}")
    files = check_split(run, cfg["data_root"], args.split, args.allow_other_split)
    device = devices.resolve_device(cfg["device"])
    amp_dtype, _ = devices.resolve_amp(cfg["amp"], device)
    classes = run.classes
    logits, labels, m = engine.evaluate_weights(run.path, cfg, args.split, len(classes), device, amp_dtype,
                                                args.batch_size or cfg["eval_batch_size"], tta=args.tta)
    resized = args.img_size is not None and os.path.isfile(os.path.join(run.run_dir, "config.json"))  # not bare
    suffix = ("_flip" if args.tta == "flip" else "") + (f"_{run.img_size}px" if resized else "")
    out_dir = args.out_dir or os.path.join(run.run_dir, f"eval_{args.split}{suffix}")
    os.makedirs(out_dir, exist_ok=True)
    write_per_class(m, classes, os.path.join(out_dir, "per_class.csv"))
    plots.plot_confusion(m["confusion"], classes, os.path.join(out_dir, "confusion.png"))
    image_root = splits.image_root(cfg["data_root"])
    plots.plot_wrong(logits, m["pred"], labels, files, image_root, classes, os.path.join(out_dir, "wrong.png"))
    report, pics = report_page.evaluation_files(out_dir, (logits, labels, m), run.path, args.split, args.tta, cfg,
                                                run.img_size, amp_dtype, files, classes, image_root,
                                                with_pictures=not args.no_report_page)
    written = "report.json, per_class.csv, confusion.png, wrong.png"
    if not args.no_report_page:
        summary = runs.read_summary(run.run_dir)
        title = f"{os.path.basename(os.path.normpath(run.run_dir))}: {os.path.basename(run.path)} on {args.split}"
        report_page.write_run_page(os.path.join(out_dir, "report.html"), run.run_dir, report, pics, summary,
                                   title=title, evaluation=True)
        written += ", report.html"
    print(f"{run.path} on {args.split} ({m['images']} images, tta={args.tta}): {metrics.describe(m)}")
    worst = sorted((i for i in range(len(classes)) if m["support"][i]), key=lambda i: m["recall"][i])[:10]
    print("| worst classes | accuracy | precision | support |\n|---|---|---|---|")
    for i in worst:
        print(f"| {classes[i]} | {m['recall'][i]:.3f} | {m['precision'][i]:.3f} | {m['support'][i]} |")
    print(f"reports: {out_dir}/ ({written})")
    return report


def main(args):
    if args.html and not args.compare:
        raise errors.ConfigError("--html writes a comparison page: give it with --compare RUN_DIR...")
    if args.compare:
        print(compare_runs(args.compare))
        if args.html:
            print(f"comparison page: {write_compare_page(args.compare, args.html)}", file=sys.stderr)
    elif args.curves:
        print(plots.plot_curves(args.curves))
    elif args.checkpoint:
        return evaluate_checkpoint(args)
    else:
        raise errors.ConfigError("give --checkpoint, --curves RUN_DIR or --compare RUN_DIR...")


def cli(argv=None):
    with dali_loader.QuietDecoderErrors():
        return errors.run_cli(lambda args: main(args) and 0, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
