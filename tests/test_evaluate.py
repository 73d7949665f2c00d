"""evaluate.py, predict.py, gradcam.py: reports that agree with training, predictions, known-answer Grad-CAM."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import data_utils
import engine
import evaluate
import gradcam
import model_utils
import plots
import predict
import presets
import train_caltech101 as train
from conftest import CLASS_COLOURS, ROOT, make_image

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained_run(prepared_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_runs")
    cfg = presets.resolve("cpu_smoke", dict(data_root=prepared_root, out_dir=str(out), img_size=32, batch_size=4,
                                            eval_batch_size=8, workers=1, epochs=3, eval_every=1,
                                            warmup_epochs=0.5, progress=False))
    return train.main(cfg)


def eval_args(*argv):
    return evaluate.get_args_parser().parse_args(list(argv))


def test_evaluate_reproduces_the_training_evaluation(trained_run):
    run_dir = trained_run["out_dir"]
    report = evaluate.main(eval_args("--checkpoint", os.path.join(run_dir, "last.pth")))
    last = trained_run["rows"][-1]
    assert report["top1"] == last["val_top1"] and report["images"] == last["val_images"]
    assert report["top5"] == last["val_top5"]
    assert report["mean_class_acc"] == pytest.approx(last["val_mean_class_acc"], abs=1e-12)
    best = evaluate.main(eval_args("--checkpoint", run_dir, "--out_dir", os.path.join(run_dir, "eval_best")))
    assert best["top1"] == trained_run["best_top1"]


def test_reports_exist_parse_and_add_up(trained_run):
    out = os.path.join(trained_run["out_dir"], "eval_val")
    evaluate.main(eval_args("--checkpoint", trained_run["out_dir"], "--out_dir", out))
    report = json.load(open(os.path.join(out, "report.json")))
    rows = list(csv.DictReader(open(os.path.join(out, "per_class.csv"))))
    assert [r["class"] for r in rows] == sorted(CLASS_COLOURS)
    support = sum(int(r["support"]) for r in rows)
    correct = sum(int(r["correct"]) for r in rows)
    assert support == report["images"] and correct / support == pytest.approx(report["top1"], abs=1e-12)
    mean_class = sum(float(r["accuracy"]) for r in rows) / len(rows)
    assert mean_class == pytest.approx(report["mean_class_acc"], abs=1e-9)
    for name in ("confusion.png", "wrong.png"):
        with Image.open(os.path.join(out, name)) as img:
            assert img.format == "PNG" and img.width > 300
    assert len(report["most_confident_wrong"]) == support - correct or len(report["most_confident_wrong"]) == 16


def test_tta_flip_is_the_mean_of_both_logits(trained_run, prepared_root):
    model = model_utils.load_trained(os.path.join(trained_run["out_dir"], "best.pth"), 3)
    loader = data_utils.build_loader(prepared_root, "val", 32, 8, CPU, workers=1)
    plain, labels = engine.collect_logits(model, loader, None)
    flipped_logits = torch.cat([model(images.flip(3)).detach() for images, _ in loader])
    tta, tta_labels = engine.collect_logits(model, loader, None, tta="flip")
    assert torch.equal(labels, tta_labels)
    assert torch.allclose(tta, (plain + flipped_logits) / 2, atol=1e-5)


def test_curves_and_comparison_table(trained_run, prepared_root, tmp_path):
    assert os.path.isfile(os.path.join(trained_run["out_dir"], "curves.png"))  # written at the end of training
    path = plots.plot_curves(trained_run["out_dir"], str(tmp_path / "c.png"))
    with Image.open(path) as img:
        assert img.width > 800
    other = presets.resolve("r18_pretrain_lowwd_mix02", dict(data_root=prepared_root, out_dir=str(tmp_path), epochs=1,
                                                             img_size=32, batch_size=4, workers=1, pretrained=False,
                                                             progress=False))
    second = train.main(other)
    table = evaluate.compare_runs([trained_run["out_dir"], second["out_dir"], str(tmp_path / "not_a_run")])
    lines = table.splitlines()
    assert len(lines) == 4
    assert "| cpu_smoke | cpu_smoke | resnet18 | scratch | 3/3 |" in lines[2]
    assert f"{trained_run['best_top1']:.4f}" in lines[2] and "r18_pretrain_lowwd_mix02" in lines[3]


def test_predictor_from_python(trained_run, prepared_root):
    predictor = predict.Predictor(trained_run["out_dir"])
    files, labels = data_utils.read_split(prepared_root, "val")
    paths = [os.path.join(prepared_root, data_utils.IMAGES_DIR, f) for f in files[:4]]
    pil = Image.open(paths[0])
    results = predictor.predict(paths + [pil], topk=2)
    assert len(results) == 5 and all(len(r) == 2 for r in results)
    for top in results:
        assert top[0][1] >= top[1][1] and {c for c, _ in top} <= set(CLASS_COLOURS)
    assert results[0] == results[4]  # a path and the same image as PIL agree
    model = model_utils.load_trained(os.path.join(trained_run["out_dir"], "best.pth"), 3).eval()
    x = predictor.batch([predictor.load(paths[1])])
    assert results[1][0][1] == pytest.approx(model(x).softmax(1).max().item(), abs=1e-6)


def test_predict_cli_on_a_folder_with_a_broken_file(trained_run, tmp_path):
    folder = tmp_path / "mine" / "nested"
    folder.mkdir(parents=True)
    import numpy as np
    rng = np.random.default_rng(0)
    make_image(CLASS_COLOURS["alpha"], rng).save(folder / "red.jpg")
    make_image(CLASS_COLOURS["charlie"], rng).convert("L").save(tmp_path / "mine" / "gray.png")
    make_image(CLASS_COLOURS["bravo"], rng).convert("CMYK").save(tmp_path / "mine" / "cmyk.jpg")
    (folder / "broken.jpg").write_text("not an image")
    out_json = tmp_path / "pred.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), str(tmp_path / "mine"),
                             "--checkpoint", trained_run["out_dir"], "--topk", "3", "--json", str(out_json),
                             "--gradcam", "--out_dir", str(tmp_path / "cams")], capture_output=True, text=True)
    assert result.returncode == 1  # one file failed, the rest were predicted
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.jpg" in errors[0]
    data = json.load(open(out_json))
    assert len(data["results"]) == 3 and data["failed"][0].endswith("broken.jpg")
    assert all(len(r["topk"]) == 3 for r in data["results"])
    for r in data["results"]:
        with Image.open(r["gradcam"]) as overlay, Image.open(r["file"]) as original:
            assert overlay.size == original.size  # the overlay is at the original image's size


def patch_batch(n, generator, size=64, quadrant_only=False, patch=16):
    """Class 0: a red patch, class 1: a blue patch, on faint noise. Anywhere in the image for training (so the
    model learns local detectors), or inside the top-left quadrant for the known-answer check."""
    images = torch.randn(n, 3, size, size, generator=generator) * 0.1
    labels = torch.randint(0, 2, (n,), generator=generator)
    limit = size // 2 - patch if quadrant_only else size - patch
    for i in range(n):
        y, x = torch.randint(0, limit, (2,), generator=generator).tolist()
        images[i, 0 if labels[i] == 0 else 2, y:y + patch, x:x + patch] += 3.0
    return images, labels


@pytest.fixture(scope="module")
def patch_model():
    """A ResNet-18 trained in the test to tell a red patch from a blue one, wherever the patch is."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = model_utils.get_model(num_classes=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(40):
        images, labels = patch_batch(16, generator, size=128)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), generator


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_gradcam_heat_sits_in_the_evidence_quadrant(patch_model, method):
    model, generator = patch_model
    images, labels = patch_batch(32, generator, size=128, quadrant_only=True)
    with torch.no_grad():
        assert (model(images).argmax(1) == labels).float().mean() > 0.9  # it learned to see the patch
    heat = gradcam.class_activation_map(model, images, labels, method=method)
    assert heat.shape == (32, 128, 128) and heat.min() >= 0 and heat.max() <= 1 + 1e-6
    quadrants = torch.stack([heat[:, :64, :64], heat[:, :64, 64:], heat[:, 64:, :64], heat[:, 64:, 64:]], 1)
    mass = quadrants.sum((2, 3))
    # layer4 is a 4x4 grid here, upsampled: heat leaks, so "most" means more than any other quadrant gets.
    assert (mass.argmax(1) == 0).float().mean() >= 0.9  # chance would be 0.25
    assert (mass[:, 0] / mass.sum(1)).mean() >= 0.35  # a quarter if the map ignored the patch
    peak = heat.flatten(1).argmax(1)
    assert ((peak // 128 < 64) & (peak % 128 < 64)).float().mean() >= 0.8
    # The same heat for the other class is elsewhere: the map depends on the class asked about.
    other = gradcam.class_activation_map(model, images, 1 - labels, method=method)
    assert not torch.allclose(other, heat, atol=0.05)


def test_centre_crop_box_matches_the_val_transform():
    # Pixels encode their own coordinates (R = x, G = y); after the real val transform the first and last kept
    # pixels must sit where centre_crop_box says the crop starts and ends, within a pixel of resampling blur.
    import numpy as np
    width, height, img_size = 240, 180, 64
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    coords = np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    tensor = data_utils.torch_transform(train=False, img_size=img_size)(Image.fromarray(coords))
    mean = torch.tensor(data_utils.IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(data_utils.IMAGENET_STD).view(3, 1, 1) * 255
    kept = tensor * std + mean
    x0, y0, x1, y1 = gradcam.centre_crop_box(width, height, data_utils.resize_size(img_size), img_size)
    assert abs(kept[0, :, 0].mean() - x0) <= 1.5 and abs(kept[0, :, -1].mean() - (x1 - 1)) <= 1.5
    assert abs(kept[1, 0, :].mean() - y0) <= 1.5 and abs(kept[1, -1, :].mean() - (y1 - 1)) <= 1.5
    assert 0 < y0 < y1 < height and 0 < x0 < x1 < width  # 64/73 of the shorter side is kept, centred
