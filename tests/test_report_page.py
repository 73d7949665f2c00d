"""report.html, compare.html and predict.py --html: one self-contained page each, every figure on it equal to the
file it comes from, the evaluation's per-class figures, confusions and mistakes equal to a by-hand evaluation of
best.pth, and the page as a browser shows it (headless Chromium, where installed)."""
import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import model_utils
import predict
from conftest import one_line_error, run_cli, stop_at, tiny_cfg
from kit.data import splits
from kit.reporting import report_page
from kit.training import metrics, runs, training

NUMBER = re.compile(r"(?<![\w.-])\d+(?:\.\d+)?(?![\w.])")  # not in names: image_0001.jpg, top-1, layer4


class Page(HTMLParser):
    """What a test needs of a page: every src/href, section ids, tagged figures, and cells holding bare numbers."""

    def __init__(self, text):
        super().__init__()
        self.links, self.sections, self.figures, self.bare_numbers, self.scripts = [], [], [], [], 0
        self.images, self.untagged_numbers, self.quotes = [], [], []
        self._stack, self._cell = [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]
        if tag in ("link", "iframe", "object", "embed"):
            self.links.append(f"<{tag}>")
        if tag == "img":
            self.images.append((self._section(), attrs.get("src", "")))
        if tag == "section":
            self.sections.append(attrs["id"])
        if tag == "script":
            self.scripts += 1
        if tag == "td":
            self._cell = {"text": "", "tagged": False}
        self._stack.append((tag, attrs))
        if tag == "span" and "t" in (attrs.get("class") or "").split():
            self.quotes.append({"src": json.loads(attrs["data-src"]), "text": ""})
        if tag == "span" and "n" in (attrs.get("class") or "").split():
            self.figures.append({"src": json.loads(attrs["data-src"]), "div": float(attrs.get("data-div", 1)),
                                 "text": ""})
            if self._cell is not None:
                self._cell["tagged"] = True

    def handle_endtag(self, tag):
        while self._stack:
            open_tag, _ = self._stack.pop()
            if open_tag == tag:
                break
        if tag == "td" and self._cell is not None:
            text = self._cell["text"].strip()
            try:
                float(text)
                if not self._cell["tagged"]:
                    self.bare_numbers.append(text)
            except ValueError:
                pass
            self._cell = None

    def handle_data(self, data):
        if self._stack and self._stack[-1][0] == "span" and "n" in (self._stack[-1][1].get("class") or "").split():
            self.figures[-1]["text"] += data
        elif self._stack and self._stack[-1][0] == "span" and "t" in (self._stack[-1][1].get("class") or ""):
            self.quotes[-1]["text"] += data
        elif any(tag == "span" and "free" in (attrs.get("class") or "").split() for tag, attrs in self._stack):
            pass  # derived from the settings or said of the moment (a stop): read from no file
        elif not (self._stack and self._stack[-1][0] in ("script", "style", "title")):
            self.untagged_numbers += NUMBER.findall(data)  # a figure outside a tagged span: unchecked
        if self._cell is not None:
            self._cell["text"] += data

    def _section(self):
        return next((a.get("id") for t, a in reversed(self._stack) if t == "section"), None)


def sources(run_dir, report_dir=None):
    def load(name):
        path = os.path.join(report_dir if name == "report.json" and report_dir else run_dir, name)
        return json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else None
    return {"summary": load("summary.json"), "report": load("report.json"), "config": load("config.json"),
            "metrics": runs.read_metrics(run_dir) if os.path.isfile(os.path.join(run_dir, "metrics.csv")) else None}


def check_figures(page, files):
    """Every tagged figure equals its source value to the digits shown; returns how many were checked."""
    assert not page.untagged_numbers, page.untagged_numbers
    for quote in page.quotes:
        value = files[quote["src"][0]]
        for key in quote["src"][1:]:
            value = value[key]
        assert quote["text"] == (value if isinstance(value, str) else str(value))
    for figure in page.figures:
        value = files[figure["src"][0]]
        for key in figure["src"][1:]:
            value = value[key]
        text = figure["text"].strip()
        decimals = len(text.split(".")[1]) if "." in text else 0
        assert abs(float(text) - value / figure["div"]) <= 0.5 * 10 ** -decimals + 1e-9, (figure, value)
    return len(page.figures)


def self_contained(page):
    assert page.links and all(link.startswith(("data:", "#")) for link in page.links), \
        [link[:60] for link in page.links if not link.startswith(("data:", "#"))]


@pytest.fixture(scope="module")
def paged_run(prepared_with_test, module_tmp):
    """A finished 3-epoch run with its page (torch loader: the by-hand evaluation below preprocesses alike)."""
    out = module_tmp / "paged"
    result = training.main(tiny_cfg(prepared_with_test, out, epochs=3, report_page=True, loader="torch", seed=1))
    return result["out_dir"]


@pytest.mark.slow
def test_the_run_page_is_self_contained_and_every_figure_is_its_files(paged_run):
    text = open(os.path.join(paged_run, "report.html"), encoding="utf-8").read()
    page = Page(text)
    self_contained(page)
    assert page.sections == list(report_page.SECTIONS)
    assert page.scripts == 1 and "<noscript" not in text  # the sorting script only: nothing needs it
    assert not page.bare_numbers, page.bare_numbers
    files = sources(paged_run)
    assert check_figures(page, files) > 60
    checked = {tuple(map(str, f["src"][:2])) for f in page.figures}  # every source is on the page
    assert {("summary", "splits"), ("report", "per_class"), ("metrics", "0"), ("config", "world_size")} <= checked
    # Every picture decodes: the curves, the matrix, one thumbnail per listed mistake, two overlays per Grad-CAM row.
    for _, src in page.images:
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).load()
    wrong = files["report"]["most_confident_wrong"]
    by_section = [s for s, _ in page.images]
    assert by_section.count("mistakes") == len(wrong) > 0
    assert by_section.count("grad-cam") == 2 * min(len(wrong), report_page.CAMS)
    assert by_section.count("curves") == by_section.count("confusion-matrix") == 1


def test_the_pages_evaluation_equals_a_by_hand_evaluation_of_best_pth(paged_run, prepared_with_test):
    """Per-class support and recall, the confused pairs and the most confident mistakes, from best.pth run over the
    val images one by one with plain loops."""
    classes = splits.read_classes(prepared_with_test)
    files, labels = splits.read_split(prepared_with_test, "val")
    model = model_utils.load_trained(os.path.join(paged_run, "best.pth"), len(classes)).eval()
    transform = splits.val_transform(32)
    preds, confidences = [], []
    with torch.no_grad():
        for f in files:
            probs = model(transform(splits.load_rgb(os.path.join(splits.image_root(prepared_with_test), f)))[None])
            probs = probs.float().softmax(1)[0]
            preds.append(int(probs.argmax()))
            confidences.append(float(probs.max()))
    report = json.load(open(os.path.join(paged_run, "report.json"), encoding="utf-8"))
    for c, name in enumerate(classes):
        mine = [p for p, y in zip(preds, labels) if y == c]
        assert report["per_class"][name]["support"] == len(mine)
        assert report["per_class"][name]["recall"] == pytest.approx(sum(p == c for p in mine) / len(mine))
    pairs = {}
    for p, y in zip(preds, labels):
        if p != y:
            pairs[(classes[y], classes[p])] = pairs.get((classes[y], classes[p]), 0) + 1
    assert {(p["true"], p["predicted"]): p["count"] for p in report["confused_pairs"]} == pairs
    assert [p["count"] for p in report["confused_pairs"]] == sorted(pairs.values(), reverse=True)
    wrong = sorted((i for i in range(len(files)) if preds[i] != labels[i]), key=lambda i: -confidences[i])
    assert [w["file"] for w in report["most_confident_wrong"]] == [files[i] for i in wrong][:report_page.GALLERY]
    assert [w["confidence"] for w in report["most_confident_wrong"]] == \
        pytest.approx([confidences[i] for i in wrong][:report_page.GALLERY], abs=1e-5)


def test_a_copied_run_folder_opens_in_headless_chromium(paged_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless browser installed (Debian: apt-get install chromium)")
    copied = tmp_path / "elsewhere"
    shutil.copytree(paged_run, copied)  # no data root beside it: the page needs none
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,2400", f"--screenshot={shot}",
                    (copied / "report.html").as_uri()], capture_output=True, timeout=120, check=True)
    pixels = torch.tensor(np.asarray(Image.open(shot).convert("RGB"))).float()
    assert pixels.shape[:2] == (2400, 1200)
    rows_with_ink = (pixels.min(2).values < 200).any(1)  # dark text, plots, thumbnails
    assert rows_with_ink.float().mean() > 0.3  # the page fills the window, not a blank or an error page
    assert len(torch.unique(pixels.reshape(-1, 3)[::7], dim=0)) > 500  # pictures drew, not text alone


def test_a_thousand_class_page_caps_its_matrix_and_stays_small(tmp_path):
    """1,000 classes, 3 val images each; the confusions made on purpose involve classes 0-79 only."""
    n, classes = 1000, [f"class_{i:04d}" for i in range(1000)]
    labels = torch.arange(n).repeat_interleave(3)
    logits = torch.nn.functional.one_hot(labels, n).float() * 5
    for k in range(80):  # image 3k+2 of class k predicted as class (k + 1) % 80
        logits[3 * k + 2, (k + 1) % 80] = 10
    m = metrics.split_metrics(logits, labels, n)
    files = [f"{classes[y]}/{j}.jpg" for y, j in zip(labels.tolist(), [0, 1, 2] * n)]
    report = report_page.evaluation_report(logits, labels, m, files, classes, {"checkpoint": "w.pth", "split": "val"})
    assert report["confusion"]["classes"] == classes[:60]  # 80 classes tie at 2 mistakes: the first 60 by index
    assert report["confusion"]["of_classes"] == n
    assert len(report["confused_pairs"]) == 15 and all(p["count"] == 1 for p in report["confused_pairs"])
    assert report["per_class"]["class_0005"]["top_confusions"] == [["class_0006", 1]]
    json.dump(report, open(tmp_path / "report.json", "w"))
    path = report_page.write_run_page(str(tmp_path / "report.html"), None, report)
    text = open(path, encoding="utf-8").read()
    assert "classes with the most mistakes" in text and text.count("<tr>") > n
    assert os.path.getsize(path) < 3e6
    assert check_figures(Page(text), {"report": report}) > 3 * n  # support, recall, precision per class, the cap


@pytest.mark.slow
def test_a_signal_stop_leaves_a_page_of_what_exists(prepared_root, tmp_path, monkeypatch):
    stop_at(5, monkeypatch)  # 3 steps per epoch: inside epoch 2
    result = training.main(tiny_cfg(prepared_root, tmp_path, epochs=3, report_page=True))
    run_dir = os.path.join(str(tmp_path), "cpu_smoke")
    assert result["exit_code"] != 0 and not os.path.exists(os.path.join(run_dir, "summary.json"))
    text = open(os.path.join(run_dir, "report.html"), encoding="utf-8").read()
    page = Page(text)
    assert page.sections == list(report_page.SECTIONS)
    assert "stopped by a signal in epoch 2 (step 2)" in text and "not evaluated" in text
    check_figures(page, sources(run_dir))
    assert any(f["src"][:2] == ["metrics", 0] for f in page.figures)  # epoch 1's row is on it


@pytest.mark.slow
def test_an_early_stop_writes_the_page_with_its_reason(prepared_root, tmp_path):
    result = training.main(tiny_cfg(prepared_root, tmp_path, epochs=5, early_stop_patience=1, monitor="val_loss",
                                 min_delta=100.0, report_page=True))
    text = open(os.path.join(result["out_dir"], "report.html"), encoding="utf-8").read()
    assert "early stop: " in text and result["rows"][-1]["epoch"] == 2
    check_figures(Page(text), sources(result["out_dir"]))


@pytest.mark.slow
def test_evaluate_writes_its_page_and_compare_writes_one(paged_run, tmp_path, capfd):
    code, out, err = run_cli(evaluate.cli, ["--checkpoint", paged_run, "--split", "test", "--out_dir",
                                            str(tmp_path / "ev")], capfd)
    assert code == 0 and "report.html" in out
    text = open(tmp_path / "ev" / "report.html", encoding="utf-8").read()
    page = Page(text)
    self_contained(page)
    assert page.sections == list(report_page.SECTIONS)
    check_figures(page, sources(paged_run, str(tmp_path / "ev")))
    assert "test (this evaluation)" in text
    code, out, err = run_cli(evaluate.cli, ["--checkpoint", paged_run, "--out_dir", str(tmp_path / "quiet"),
                                            "--no_report_page"], capfd)
    assert code == 0 and not os.path.exists(tmp_path / "quiet" / "report.html")
    code, out, err = run_cli(evaluate.cli, ["--compare", paged_run, paged_run, "--html", str(tmp_path / "c.html")],
                             capfd)
    page = Page(open(tmp_path / "c.html", encoding="utf-8").read())
    self_contained(page)
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert code == 0 and len(table) == 3 and page.sections == ["runs", "curves"]
    best = json.load(open(os.path.join(paged_run, "summary.json")))["splits"]["val"]["top1"]
    assert f"{best:.4f}" in open(tmp_path / "c.html", encoding="utf-8").read()
    code, out, err = run_cli(evaluate.cli, ["--checkpoint", paged_run, "--html", "x.html"], capfd)
    one_line_error(code, err, "--compare")


def test_predict_html_is_a_gallery_of_its_json(paged_run, prepared_with_test, tmp_path, capfd):
    folder = os.path.join(splits.image_root(prepared_with_test), "alpha")
    code, out, err = run_cli(predict.cli, [folder, "--checkpoint", paged_run, "--json", str(tmp_path / "p.json"),
                                           "--html", str(tmp_path / "p.html"), "--gradcam", "--out_dir",
                                           str(tmp_path / "cams"), "--topk", "2"], capfd)
    results = json.load(open(tmp_path / "p.json"))
    page = Page(open(tmp_path / "p.html", encoding="utf-8").read())
    self_contained(page)
    assert len(page.images) == 2 * len(results["results"]) > 10  # thumbnail and overlay per image
    assert check_figures(page, results) == 2 * len(results["results"])


def test_progress_bars_only_on_a_terminal(prepared_root, tmp_path, capfd, monkeypatch):
    """A redirected stderr (a log file, CI) gets the epoch lines and no bar redraws, even with progress on."""
    monkeypatch.delenv("CI", raising=False)
    capfd.readouterr()
    training.main(tiny_cfg(prepared_root, tmp_path, epochs=1, progress=True))
    out, err = capfd.readouterr()
    assert "epoch 1/1:" in out and "\r" not in err and "step/s" not in err and "s/step" not in err


def test_per_class_csv_and_the_page_agree(paged_run, tmp_path, capfd):
    """evaluate.py's per_class.csv and its report.json (which the page shows) are one evaluation."""
    run_cli(evaluate.cli, ["--checkpoint", paged_run, "--out_dir", str(tmp_path / "ev")], capfd)
    report = json.load(open(tmp_path / "ev" / "report.json"))
    for row in csv.DictReader(open(tmp_path / "ev" / "per_class.csv")):
        assert float(row["recall"]) == pytest.approx(report["per_class"][row["class"]]["recall"])
        assert int(row["support"]) == report["per_class"][row["class"]]["support"]
