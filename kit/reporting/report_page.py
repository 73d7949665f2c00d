"""One self-contained HTML page per run, per evaluation, per comparison and per folder of predictions: pictures
inline (data URIs), nothing fetched from anywhere, readable with JavaScript off (a few inline lines sort tables).
It opens from a copied run folder with no data root.

    report_page.write_run_page(run_dir, cfg, rows, summary, report, pictures)   # training's end: <run>/report.html
    python evaluate.py --checkpoint checkpoints/cpu_smoke                        # <run>/eval_val/report.html
    python evaluate.py --compare checkpoints/a checkpoints/b --html compare.html
    python predict.py photos/ --checkpoint checkpoints/cpu_smoke --html photos.html --gradcam

Every figure on a page is a <span class="n"> whose data-src names the file and key it was read from (summary.json,
report.json, metrics.csv, config.json; data-div when shown in other units), so a test checks each one against its
source.
"""
import base64
import html
import io
import json
import os

import model_utils
import presets
from kit.base import fileio
from kit.data import splits
from kit.reporting import gradcam, plots
from kit.settings import resolution
from kit.training import metrics, runs

SECTIONS = {  # id -> heading, in page order
    "what-ran": "What ran", "results": "Results", "time-to-accuracy": "Time to accuracy",
    "curves": "Curves", "per-class": "Per class (worst first)", "confused-pairs": "Most confused pairs",
    "confusion-matrix": "Confusion matrix", "mistakes": "Misclassified images", "grad-cam": "Grad-CAM",
    "throughput": "Throughput"}
GALLERY, CAMS, THUMB = 24, 4, 160  # mistakes shown, the first of them with Grad-CAM overlays, thumbnail side (px)

STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#1b1b1b;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:28px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f3f3f3}table.sortable th{cursor:pointer}td .n,td.num{font-variant-numeric:tabular-nums}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.gallery figure{margin:0;min-width:170px;font-size:12px}
.gallery img{max-width:170px;max-height:170px;display:block}.wide img{max-width:100%}.note{color:#666}
.bad{color:#b00}"""
SORT_SCRIPT = """document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.title = "click to sort"; th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], rows = Array.prototype.slice.call(body.rows);
    var up = th.dataset.up !== "1"; th.dataset.up = up ? "1" : "0";
    function key(r) { var t = r.cells[col].textContent.trim(), v = parseFloat(t); return isNaN(v) ? t : v; }
    rows.sort(function (a, b) { var x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); });
    rows.forEach(function (r) { body.appendChild(r); }); }); });"""

esc = html.escape


def num(value, fmt, *src, div=1):
    """A figure as shown on a page, tagged with where it came from (src: file, then keys or row index)."""
    if value is None:
        return "-"
    if fmt == "d":  # counts read back from metrics.csv are floats
        value = int(round(value))
    return (f'<span class="n" data-src="{esc(json.dumps(list(src)))}"' + (f' data-div="{div}"' if div != 1 else "")
            + f">{format(value / div if div != 1 else value, fmt)}</span>")


def quoted(text, *src):
    """A piece of text shown as its source holds it (e.g. summary.json's stop reason, figures inside)."""
    return f'<span class="t" data-src="{esc(json.dumps(list(src)))}">{esc(text)}</span>'


def free(text):
    """Text read from no file: derived from the settings (a train size) or said of the moment (a stop)."""
    return f'<span class="free">{esc(text)}</span>'


def data_uri(data, mime):
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def jpeg_uri(image, side=THUMB, quality=82):
    """A PIL image shrunk to fit side x side, as an inline JPEG."""
    thumb = image.convert("RGB").copy()
    thumb.thumbnail((side, side))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=quality)
    return data_uri(buf.getvalue(), "image/jpeg")


def table(head, rows, sortable=False):
    cls = ' class="sortable"' if sortable else ""
    return (f"<table{cls}><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows) + "</tbody></table>")


def page(title, sections, subtitle=""):
    """The whole document: sections are (id, body html) in SECTIONS order, or (id, heading, body)."""
    parts = []
    for section in sections:
        sid, heading, body = section if len(section) == 3 else (section[0], SECTIONS[section[0]], section[1])
        parts.append(f'<section id="{sid}"><h2>{esc(heading)}</h2>\n{body}\n</section>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{esc(title)}</h1>"
            + (f"<p class=\"note\">{subtitle}</p>" if subtitle else "") + "\n" + "\n".join(parts)
            + f"\n<script>{SORT_SCRIPT}</script>\n</body></html>\n")


def write(text, path):
    fileio.write_atomic(text, path)
    return path


# ---------------------------------------------------------------------------------------------
# what a page shows of an evaluation: report.json's content and its pictures

def evaluation_report(logits, labels, m, files, classes, header):
    """report.json of one evaluated split: `header` (what was evaluated), every METRICS figure, per-class figures
    with each class's top confusions, the most confused pairs, the (capped) confusion matrix and the most
    confidently wrong images."""
    conf = metrics.confusions(m, classes)
    return {**header, **{k: m[k] for k in (*metrics.METRICS, "images")},
            "per_class": {c: {"support": m["support"][i], "accuracy": m["recall"][i], "recall": m["recall"][i],
                              "precision": m["precision"][i], "top_confusions": conf["per_class"][c]}
                          for i, c in enumerate(classes)},
            "confused_pairs": conf["pairs"], "confusion": conf["matrix"],
            "most_confident_wrong": metrics.most_confident_wrong(logits, m["pred"], labels, files, classes, GALLERY)}


def pictures(report, image_root, model, img_size, classes):
    """Inline thumbnails of report's mistakes and, for the first CAMS of them, Grad-CAM overlays for the predicted
    and the true class ({} when the images are not at hand). `model`: the evaluated weights, on the CPU."""
    out = {"thumbs": [], "cams": []}
    if image_root is None or not os.path.isdir(image_root):
        return out
    for i, item in enumerate(report["most_confident_wrong"]):
        image = splits.load_rgb(os.path.join(image_root, item["file"]))
        out["thumbs"].append(jpeg_uri(image))
        if i < CAMS and model is not None:
            out["cams"].append([jpeg_uri(gradcam.explain(model, image, img_size, classes.index(item[key])), 200)
                                for key in ("predicted", "true")])
    return out


# ---------------------------------------------------------------------------------------------
# sections

def what_ran(cfg, summary, rows, run_name, stopped):
    defaults = presets.DEFAULTS
    differing = [k for k in defaults if k in cfg and cfg[k] != defaults[k] and k not in ("data_root", "out_dir")]
    shown = ", ".join(f"{esc(k)}={num(cfg[k], 'g', 'config', k)}" if isinstance(cfg[k], (int, float)) and not
                      isinstance(cfg[k], bool) else f"{esc(k)}={quoted(str(cfg[k]), 'config', k)}" for k in differing)
    ran_on = cfg.get("ran_on") or {}
    init = f"weights {cfg['weights']}" if cfg.get("weights") else (
        "ImageNet (torchvision's weights)" if cfg.get("pretrained") else "random (from scratch)")
    epochs_run = summary["epochs_run"] if summary else (int(rows[-1]["epoch"]) if rows else 0)
    if stopped:
        ended = free(stopped)
    elif summary and summary.get("early_stop"):
        ended = "early stop: " + quoted(summary["early_stop"], "summary", "early_stop")
    else:
        ended = "finished every epoch" if summary else "not finished"
    wall = (num(summary["wall_time_s"], ".1f", "summary", "wall_time_s", div=60) if summary else
            num(rows[-1]["wall_time_s"], ".1f", "metrics", len(rows) - 1, "wall_time_s", div=60) if rows else "-")
    items = [("run", esc(run_name)), ("preset", esc(str(cfg.get("exp")))),
             ("settings that differ from the defaults", shown or "none"), ("architecture", esc(cfg.get("arch", ""))),
             ("init", esc(init)), ("split", describe_split(cfg.get("split"))),
             ("world size", num(cfg["world_size"], "d", "config", "world_size") if "world_size" in cfg else "-"),
             ("device, AMP", (quoted(ran_on["device"], "config", "ran_on", "device") + ", "
                              + quoted(ran_on["amp"], "config", "ran_on", "amp")) if ran_on else
              esc(f"{cfg.get('device')}, {cfg.get('amp')} (as asked: this run predates the record of what ran)")),
             ("kit version", quoted(ran_on["kit"], "config", "ran_on", "kit") if ran_on else "unknown"),
             ("wall time (min)", wall),
             ("epochs run", (num(epochs_run, "d", "summary", "epochs_run") if summary else
                             num(epochs_run, "d", "metrics", len(rows) - 1, "epoch") if rows else "0")
              + f" of {num(cfg['epochs'], 'd', 'config', 'epochs') if 'epochs' in cfg else '-'}"),
             ("how it ended", ended)]
    return table(["", ""], [[f"<b>{k}</b>", v] for k, v in items])


def describe_split(split):
    """download.py's split identity in a line: how the lists were drawn and each list's checksum."""
    if not isinstance(split, dict):
        return esc(str(split or "unknown"))
    params = ", ".join(f"{esc(k)}={quoted(str(v), 'config', 'split', 'params', k)}"
                       for k, v in (split.get("params") or {}).items())
    sums = ", ".join(f"{esc(k)} {quoted(str(v), 'config', 'split', k)}" for k, v in split.items()
                     if k != "params" and v)
    return f"{params}; list checksums: {sums}"


def results(summary, report=None, evaluation=False):
    rows = []
    names = list(metrics.METRICS)
    for split, m in (summary or {}).get("splits", {}).items():
        rows.append([esc(split), *[num(m[n], ".4f", "summary", "splits", split, n) for n in names],
                     num(m["images"], "d", "summary", "splits", split, "images")])
    if report is not None and evaluation:
        label = f"{report['split']} (this evaluation{', flip TTA' if report.get('tta') == 'flip' else ''})"
        rows.append([esc(label), *[num(report[n], ".4f", "report", n) for n in names],
                     num(report["images"], "d", "report", "images")])
    if not rows:
        return '<p class="note">no evaluation of best.pth yet</p>'
    note = ("<p class=\"note\">best.pth on train (through the val transform), val (the best epoch's own evaluation) "
            "and test"
            + (f" (epoch {num(summary['best']['epoch'], 'd', 'summary', 'best', 'epoch')})" if summary else "")
            + "</p>")
    return table(["split", *[metrics.METRICS[n][0] for n in names], "images"], rows) + note


def time_to_accuracy(summary, rows):
    if summary is not None and "time_to_val_top1" in summary:  # older summaries lack it: from metrics.csv
        records = [[num(r["epoch"], "d", "summary", "time_to_val_top1", i, "epoch"),
                    num(r["wall_time_s"], ".1f", "summary", "time_to_val_top1", i, "wall_time_s", div=60),
                    num(r["val_top1"], ".4f", "summary", "time_to_val_top1", i, "val_top1")]
                   for i, r in enumerate(summary["time_to_val_top1"])]
    else:
        records = [[num(r["epoch"], "d", "metrics", i, "epoch"),
                    num(r["wall_time_s"], ".1f", "metrics", i, "wall_time_s", div=60),
                    num(r["val_top1"], ".4f", "metrics", i, "val_top1")]
                   for i, r in enumerate(rows) if r.get("val_top1") is not None]
    if not records:
        return '<p class="note">no evaluation yet</p>'
    return ('<p class="note">wall time when val top-1 first reached each value (every evaluation that beat the '
            'earlier ones)</p>' + table(["epoch", "wall time (min)", "val top-1"], records))


def per_class(report):
    order = sorted(report["per_class"].items(), key=lambda kv: (kv[1]["support"] == 0, kv[1]["recall"], kv[0]))
    body = [[esc(c), num(v["support"], "d", "report", "per_class", c, "support"),
             num(v["recall"], ".3f", "report", "per_class", c, "recall"),
             num(v["precision"], ".3f", "report", "per_class", c, "precision"),
             ", ".join(f"{esc(name)} ({num(count, 'd', 'report', 'per_class', c, 'top_confusions', j, 1)})"
                       for j, (name, count) in enumerate(v["top_confusions"])) or "-"] for c, v in order]
    return ('<p class="note">recall is the class\'s accuracy; click a heading to sort</p>'
            + table(["class", "support", "recall", "precision", "mistaken for (count)"], body, sortable=True))


def confused_pairs(report):
    if not report["confused_pairs"]:
        return '<p class="note">no mistakes</p>'
    return table(["true class", "predicted as", "images"],
                 [[esc(p["true"]), esc(p["predicted"]), num(p["count"], "d", "report", "confused_pairs", i, "count")]
                  for i, p in enumerate(report["confused_pairs"])])


def confusion_matrix(report):
    matrix = report["confusion"]
    shown, total = len(matrix["classes"]), matrix["of_classes"]
    png = plots.plot_confusion(matrix["counts"], matrix["classes"], dpi=80, row_totals=matrix.get("row_totals"),
                               title="confusion matrix (rows: true class, each row's share of its images)")
    note = (f'<p class="note">the {num(shown, "d", "report", "confusion", "shown")} classes with the most '
            f'mistakes (made or received) of '
            f'{num(total, "d", "report", "confusion", "of_classes")}; rows and columns of the others are left out '
            f'(per_class.csv and evaluate.py\'s confusion.png hold them all)</p>' if shown < total else "")
    return note + f'<div class="wide"><img alt="confusion matrix" src="{data_uri(png, "image/png")}"></div>'


def mistakes(report, pics):
    wrong = report["most_confident_wrong"]
    if not wrong:
        return '<p class="note">no misclassified images</p>'
    if not pics.get("thumbs"):
        return ('<p class="note">the images were not at hand when this page was written; the list:</p>'
                + table(["file", "true", "predicted", "confidence"],
                        [[esc(w["file"]), esc(w["true"]), esc(w["predicted"]),
                          num(w["confidence"], ".2f", "report", "most_confident_wrong", i, "confidence")]
                         for i, w in enumerate(wrong)]))
    figures = [f'<figure><img alt="{esc(w["file"])}" src="{uri}"><figcaption>true: {esc(w["true"])}<br>'
               f'<span class="bad">predicted: {esc(w["predicted"])}</span> '
               f'({num(w["confidence"], ".2f", "report", "most_confident_wrong", i, "confidence")})<br>'
               f'<small>{esc(w["file"])}</small></figcaption></figure>'
               for i, (w, uri) in enumerate(zip(wrong, pics["thumbs"]))]
    return ('<p class="note">highest-confidence mistakes first (confidence: softmax probability of the predicted '
            'class)</p><div class="gallery">' + "".join(figures) + "</div>")


def grad_cams(report, pics):
    if not pics.get("cams"):
        return '<p class="note">no overlays (no mistakes, or the images or weights were not at hand)</p>'
    figures = []
    for w, (pred_uri, true_uri) in zip(report["most_confident_wrong"], pics["cams"]):
        for uri, what in ((pred_uri, f"for predicted {w['predicted']}"), (true_uri, f"for true {w['true']}")):
            figures.append(f'<figure><img alt="Grad-CAM {esc(what)}" src="{uri}"><figcaption>{esc(w["file"])}<br>'
                           f'{esc(what)}</figcaption></figure>')
    return ('<p class="note">where the evidence for each class lies in the centre crop the model saw (Grad-CAM of '
            'the last spatial map, layer4 in a ResNet; red: most)</p><div class="gallery">' + "".join(figures)
            + "</div>")


def throughput(rows, cfg):
    gpu = any(r.get("gpu_peak_mem_gib") is not None for r in rows)
    sizes = resolution.train_sizes(cfg)
    body = [[num(r["epoch"], "d", "metrics", i, "epoch"), free(f"{sizes[int(r['epoch']) - 1]} px"),
             num(r.get("train_images_per_s"), ".0f", "metrics", i, "train_images_per_s"),
             num(r.get("val_images_per_s"), ".0f", "metrics", i, "val_images_per_s")]
            + ([num(r.get("gpu_peak_mem_gib"), ".2f", "metrics", i, "gpu_peak_mem_gib")] if gpu else [])
            for i, r in enumerate(rows)]
    head = ["epoch", "train crops", "train images/s", "val images/s"] + (["peak GPU memory (GiB)"] if gpu else [])
    return table(head, body, sortable=True) + ("" if gpu else '<p class="note">no GPU: no peak memory</p>')


def run_sections(cfg, rows, summary, report, pics, curves_png, run_name, stopped=None, evaluation=False):
    """Every section of a run's (or an evaluation's) page; evaluation sections say why they are empty."""
    missing = '<p class="note">not evaluated: ' + free(stopped or "no best.pth to evaluate") + "</p>"
    curves = (f'<div class="wide"><img alt="training curves" src="{data_uri(curves_png, "image/png")}"></div>'
              if curves_png else '<p class="note">no epoch finished yet</p>')
    return [("what-ran", what_ran(cfg, summary, rows, run_name, stopped)),
            ("results", results(summary, report, evaluation)),
            ("time-to-accuracy", time_to_accuracy(summary, rows)), ("curves", curves),
            ("per-class", per_class(report) if report else missing),
            ("confused-pairs", confused_pairs(report) if report else missing),
            ("confusion-matrix", confusion_matrix(report) if report else missing),
            ("mistakes", mistakes(report, pics) if report else missing),
            ("grad-cam", grad_cams(report, pics) if report else missing),
            ("throughput", throughput(rows, cfg) if rows else '<p class="note">no epoch finished yet</p>')]


def write_run_page(path, run_dir, report=None, pics=None, summary=None, stopped=None, title=None, evaluation=False):
    """report.html of a run, or of one evaluation of a checkpoint (`report`: its report.json content), from what
    the run folder holds: config.json, metrics.csv, curves.png and `summary` (summary.json's content, passed in
    since the run's end writes summary.json last). A bare weights file (no run folder) gets the evaluation
    sections only."""

    has_run = run_dir is not None and os.path.isfile(os.path.join(run_dir, "config.json"))
    cfg = {**presets.DEFAULTS, **runs.read_run_config(run_dir)} if has_run else {}
    rows = runs.read_metrics(run_dir) if has_run and os.path.isfile(os.path.join(run_dir, "metrics.csv")) else []
    curves = os.path.join(run_dir, "curves.png") if has_run else ""
    curves_png = open(curves, "rb").read() if os.path.isfile(curves) else None
    name = os.path.basename(os.path.normpath(run_dir)) if has_run else os.path.basename(report["checkpoint"])
    sections = run_sections(cfg, rows, summary, report, pics or {}, curves_png, name, stopped, evaluation)
    if not has_run:
        sections = [s for s in sections if s[0] not in ("what-ran", "time-to-accuracy", "curves", "throughput")]
    if summary and not evaluation:
        subtitle = f"best val top-1 {num(summary['best']['val_top1'], '.4f', 'summary', 'best', 'val_top1')}"
    elif report is not None:
        subtitle = f"{esc(report['split'])} top-1 {num(report['top1'], '.4f', 'report', 'top1')}"
    else:
        subtitle = free(stopped or "")
    return write(page(title or f"{name}: run report", sections, subtitle=subtitle), path)


def evaluation_files(out_dir, evaluation, weights, split, tta, cfg, img_size, amp_dtype, files, classes, image_root,
                     with_pictures=True):
    """An evaluation's report.json (written into out_dir) and its pictures: ({report}, {pictures}).
    `evaluation`: engine.evaluate_weights' (logits, labels, figures) of `weights` (also Grad-CAM's) on `split` at
    `img_size`, as the run's settings `cfg` say."""
    header = {"checkpoint": os.path.abspath(weights), "split": split, "tta": tta, "arch": cfg["arch"],
              "img_size": cfg["img_size"], "eval_img_size": img_size, "amp": str(amp_dtype)}
    logits, labels, m = evaluation
    report = evaluation_report(logits, labels, m, files, classes, header)
    write(json.dumps(report, indent=1) + "\n", os.path.join(out_dir, "report.json"))
    if not with_pictures:
        return report, {}
    model = model_utils.load_trained(weights, len(classes), cfg["arch"]).eval() if report["most_confident_wrong"] \
        else None
    return report, pictures(report, image_root, model, img_size, classes)
