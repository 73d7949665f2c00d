"""evaluate.py, predict.py, gradcam.py: figures equal training's own, refusals of wrong splits, the comparison
table, predictions (also from a copied run folder and from bare weights), known-answer Grad-CAM."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data_utils
import evaluate
import model_utils
import predict
import presets
from conftest import CLASS_COLOURS, make_image, one_line_error, run_cli, tiny_cfg
from kit.data import sampling, splits
from kit.reporting import gradcam, plots, report_page
from kit.training import engine, training

CPU = torch.device("cpu")


def eval_args(*argv):
    return evaluate.get_args_parser().parse_args(list(argv))


def test_evaluate_equals_the_training_evaluation(trained_run, tmp_path):
    """The same loader, precision and layout as training: every figure, the loss included, is bit-identical. On 33
    val images of a barely trained model the loss moves in its 4th decimal with any change of pipeline (fp32
    instead of bf16, the torch loader instead of DALI), which the second half shows."""
    run_dir = trained_run["out_dir"]
    report = evaluate.main(eval_args("--checkpoint", os.path.join(run_dir, "last.pth"), "--out_dir",
                                     str(tmp_path / "a")))
    last = trained_run["rows"][-1]
    assert (report["top1"], report["top5"], report["mean_class_acc"], report["loss"], report["images"]) == \
        (last["val_top1"], last["val_top5"], last["val_mean_class_acc"], last["val_loss"], last["val_images"])
    other = evaluate.main(eval_args("--checkpoint", os.path.join(run_dir, "last.pth"), "--loader", "torch",
                                    "--out_dir", str(tmp_path / "b")))
    assert other["loss"] != report["loss"]


def test_reports_exist_parse_and_add_up(trained_run, tmp_path):
    out = str(tmp_path / "eval")
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
    assert len(report["most_confident_wrong"]) == min(support - correct, report_page.GALLERY)


def test_tta_flip_is_the_mean_of_both_logits(trained_run, prepared_with_test):
    model = model_utils.load_trained(os.path.join(trained_run["out_dir"], "best.pth"), 3)
    loader = data_utils.build_loader(prepared_with_test, "val", 8, CPU, sampling.DataSettings(img_size=32, workers=1))
    plain, labels = engine.collect_logits(model, loader, None)
    flipped_logits = torch.cat([model(images.flip(3)).detach() for images, _ in loader])
    tta, tta_labels = engine.collect_logits(model, loader, None, tta="flip")
    assert torch.equal(labels, tta_labels)
    assert torch.allclose(tta, (plain + flipped_logits) / 2, atol=1e-5)


def test_a_re_split_root_or_training_images_are_refused(trained_run, prepared_with_test, tmp_path, capfd):
    root = tmp_path / "root"
    shutil.copytree(prepared_with_test, root)
    run = tmp_path / "run"
    shutil.copytree(trained_run["out_dir"], run)
    train_files = (root / "train.txt").read_text().splitlines()
    val_files = (root / "val.txt").read_text().splitlines()
    argv = ["--checkpoint", str(run), "--data_root", str(root), "--out_dir", str(tmp_path / "eval")]
    # Another split, without overlap: refused, or evaluated with a loud warning when asked.
    (root / "train.txt").write_text("\n".join(train_files[1:]) + "\n")
    code, _, err = run_cli(evaluate.cli, argv, capfd)
    one_line_error(code, err, "not the ones")
    code, out, err = run_cli(evaluate.cli, argv + ["--allow_other_split"], capfd)
    assert code == 0 and "WARNING" in err and "top-1" in out
    # A re-split root, as `download.py --seed 1 --force` writes it: its val list now holds training images.
    (root / "train.txt").write_text("\n".join(val_files[:4] + train_files[4:]) + "\n")
    (root / "val.txt").write_text("\n".join(train_files[:4] + val_files[4:]) + "\n")
    code, _, err = run_cli(evaluate.cli, argv + ["--allow_other_split"], capfd)
    one_line_error(code, err, "4 of the 27 val images")  # even when asked: never on images it trained on
    # A new root whose test split was cut from this run's training images (the same per-class order).
    (root / "val.txt").write_text("\n".join(val_files) + "\n")
    (root / "test.txt").write_text("\n".join(train_files[:5]) + "\n")
    code, _, err = run_cli(evaluate.cli, argv + ["--split", "test", "--allow_other_split"], capfd)
    one_line_error(code, err, "5 of the 5 test images")


def test_comparison_table(trained_run, prepared_root, tmp_path, capfd):
    assert os.path.isfile(os.path.join(trained_run["out_dir"], "curves.png"))  # written at the end of training
    from kit.reporting.plots import plot_curves

    with Image.open(plot_curves(trained_run["out_dir"], str(tmp_path / "c.png"))) as img:
        assert img.width > 800
    second = training.main(tiny_cfg(prepared_root, tmp_path, epochs=1, img_size=48, img_size_start=32,
                                 class_balance="loss"))
    table = evaluate.compare_runs([trained_run["out_dir"], second["out_dir"]]).splitlines()
    head = [c.strip() for c in table[0].strip("|").split("|")]
    # the settings that differ, by name (every run-defining one, progressive resizing and class balance included)
    assert head[:6] == ["run", "preset", "img_size", "img_size_start", "class_balance", "epochs"]
    assert head[6] == "data_root"
    first = [c.strip() for c in table[2].strip("|").split("|")]
    summary = trained_run["summary"]
    assert first[0] == os.path.normpath(trained_run["out_dir"]) and first[2] == "32"
    assert first[head.index("test top-1")] == f"{summary['splits']['test']['top1']:.4f}"
    assert first[head.index("train top-1")] == f"{summary['splits']['train']['top1']:.4f}"
    assert first[head.index("best epoch")] == str(summary["best"]["epoch"])
    assert [c.strip() for c in table[3].strip("|").split("|")][head.index("test top-1")] == "-"  # no test split
    # `--compare checkpoints/*`: folders that are not runs (an LR finder's output) are skipped with a note each
    (tmp_path / "cpu_smoke_lr_find").mkdir()
    code, out, err = run_cli(evaluate.cli, ["--compare", trained_run["out_dir"], str(tmp_path / "cpu_smoke_lr_find"),
                                            second["out_dir"]], capfd)
    assert code == 0 and out.splitlines() == table
    assert err.strip() == f"note: skipped {tmp_path / 'cpu_smoke_lr_find'}: not a training run folder (no metrics.csv)"
    code, _, err = run_cli(evaluate.cli, ["--compare", str(tmp_path / "nothing")], capfd)
    one_line_error(code, err, "none of the 1 folder(s) given is a training run folder")


def test_a_missing_test_split_says_what_works(trained_run, prepared_root, tmp_path, capfd):
    """The advice is followed to the letter: its download command gives a root with the run's very training images
    and a test split, and its evaluate command then evaluates the run on it."""
    import shlex

    import download

    code, _, err = run_cli(evaluate.cli, ["--checkpoint", trained_run["out_dir"], "--data_root", prepared_root,
                                          "--split", "test", "--out_dir", str(tmp_path)], capfd)
    one_line_error(code, err, f"{prepared_root} has no test split: prepare a new root with the same training images")
    prepare, evaluate_cmd = (shlex.split(part.replace("NEW_ROOT", str(tmp_path / "new")).replace(
        "RUN", trained_run["out_dir"])) for part in err.split("`")[1:4:2])
    assert prepare[:2] == ["python", "download.py"] and "--train_per_class" in prepare and "--seed" in prepare
    code, _, err = run_cli(download.cli, prepare[2:], capfd)
    assert code == 0, err
    assert open(tmp_path / "new" / "train.txt").read() == open(os.path.join(prepared_root, "train.txt")).read()
    assert evaluate_cmd[:2] == ["python", "evaluate.py"]
    code, out, err = run_cli(evaluate.cli, evaluate_cmd[2:] + ["--out_dir", str(tmp_path / "eval")], capfd)
    assert code == 0, err
    assert "test" in out and os.path.isfile(tmp_path / "eval" / "report.json")


def test_bare_weights_of_another_arch_name_the_mismatch(trained_run, prepared_with_test, tmp_path, capfd):
    paths, _ = val_paths(prepared_with_test)
    shutil.copy(os.path.join(trained_run["out_dir"], "classes.txt"), tmp_path / "names.txt")
    shutil.copy(os.path.join(trained_run["out_dir"], "best.pth"), tmp_path / "weights.pth")  # no run folder
    code, _, err = run_cli(predict.cli, [paths[0], "--checkpoint", str(tmp_path / "weights.pth"), "--arch",
                                         "resnet34", "--img_size", "32", "--classes", str(tmp_path / "names.txt")],
                           capfd)
    # resnet34 has 8 more BasicBlocks (3,4,6,3 vs 2,2,2,2), each 2 convs + 2 BatchNorms of 5 tensors: 96 tensors
    one_line_error(code, err, "does not fit a resnet34: 96 tensors missing (e.g. layer1.2.bn1.bias)")
    assert "it fits resnet18 (--arch resnet18)" in err and len(err) < 300


def val_paths(root, count=4):
    files, labels = splits.read_split(root, "val")
    return [os.path.join(splits.image_root(root), f) for f in files[:count]], labels[:count]


def test_predictor_from_python(trained_run, prepared_with_test):
    predictor = predict.Predictor(trained_run["out_dir"])
    paths, _ = val_paths(prepared_with_test)
    pil = Image.open(paths[0])
    results = predictor.predict(paths + [pil], topk=2)
    assert len(results) == 5 and all(len(r) == 2 for r in results)
    for top in results:
        assert top[0][1] >= top[1][1] and {c for c, _ in top} <= set(CLASS_COLOURS)
    assert results[0] == results[4]  # a path and the same image as PIL agree
    model = model_utils.load_trained(os.path.join(trained_run["out_dir"], "best.pth"), 3).eval()
    x = predictor.batch([predictor.load(paths[1])])
    assert results[1][0][1] == pytest.approx(model(x).softmax(1).max().item(), abs=1e-6)


def test_a_copied_run_folder_and_bare_weights_predict(trained_run, prepared_with_test, tmp_path, capfd):
    paths, _ = val_paths(prepared_with_test)
    expected = predict.Predictor(trained_run["out_dir"]).predict(paths)
    copied = tmp_path / "copied"
    shutil.copytree(trained_run["out_dir"], copied)
    config = json.load(open(copied / "config.json"))
    config["data_root"] = str(tmp_path / "gone")  # the data root is not needed for the class names
    (copied / "config.json").write_text(json.dumps(config))
    assert predict.Predictor(str(copied)).predict(paths) == expected
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(trained_run["out_dir"], "best.pth"), bare / "best.pth")
    shutil.copy(os.path.join(trained_run["out_dir"], "classes.txt"), bare / "names.txt")
    code, _, err = run_cli(predict.cli, [paths[0], "--checkpoint", str(bare / "best.pth")], capfd)
    one_line_error(code, err, "pass --arch, --img_size, --classes")
    code, _, err = run_cli(predict.cli, [paths[0], "--checkpoint", str(bare / "best.pth"), "--arch", "resnet18"],
                           capfd)
    one_line_error(code, err, "pass --img_size, --classes")
    got = predict.Predictor(str(bare / "best.pth"), arch="resnet18", img_size=32, classes=str(bare / "names.txt"))
    assert got.predict(paths) == expected


def test_predict_cli_on_a_folder(trained_run, tmp_path, capfd):
    folder = tmp_path / "mine" / "nested"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    make_image(CLASS_COLOURS["alpha"], rng).save(folder / "red.jpg")
    make_image(CLASS_COLOURS["charlie"], rng).convert("L").save(tmp_path / "mine" / "gray.png")
    make_image(CLASS_COLOURS["bravo"], rng).convert("CMYK").save(tmp_path / "mine" / "cmyk.jpg")
    (folder / "broken.jpg").write_text("not an image")
    (tmp_path / "mine" / "README.md").write_text("notes")  # not an image by its extension: skipped, counted
    out_json = tmp_path / "pred.json"
    argv = [str(tmp_path / "mine"), "--checkpoint", trained_run["out_dir"], "--topk", "3", "--json", str(out_json),
            "--gradcam", "--out_dir", str(tmp_path / "cams")]
    code, out, err = run_cli(predict.cli, argv, capfd)
    assert code == 1  # one file failed, the rest were predicted
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.jpg" in errors[0]
    assert "skipped 1 file(s) that are not images" in err
    data = json.load(open(out_json))
    assert len(data["results"]) == 3 and data["failed"][0].endswith("broken.jpg")
    for r in data["results"]:
        assert len(r["topk"]) == 3 and r["gradcam"].endswith(f"_gradcam_{r['topk'][0]['class']}.png")
        with Image.open(r["gradcam"]) as overlay, Image.open(r["file"]) as original:
            assert overlay.size == original.size  # the overlay is at the original image's size
    assert f"3 predicted, 1 failed; 3 Grad-CAM overlay(s) in {tmp_path / 'cams'}" in err  # where they went
    code, _, _ = run_cli(predict.cli, argv + ["--target", "bravo"], capfd)  # another target: other files
    assert len([f for f in os.listdir(tmp_path / "cams") if f.endswith("_bravo.png")]) >= 3


def test_random_sample_is_reproducible(trained_run, prepared_with_test, tmp_path, capfd):
    paths, _ = val_paths(prepared_with_test, count=20)
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(paths) + "\n")
    argv = [str(listing), "--checkpoint", trained_run["out_dir"], "--random", "5", "--topk", "1"]

    def picked(seed):
        code, out, _ = run_cli(predict.cli, argv + ["--seed", str(seed)], capfd)
        assert code == 0
        return [line.split(":")[0] for line in out.splitlines() if ": " in line]

    first = picked(1)
    assert len(first) == 5 and first == picked(1) and first != picked(2)


def patch_batch(n, generator, size=128, patch=16, quadrant=None):
    """Class 0: a red patch, class 1: a blue patch, on faint noise; anywhere (training, so the model learns local
    detectors), or inside one quadrant (row, col) for the known-answer check."""
    images = torch.randn(n, 3, size, size, generator=generator) * 0.1
    labels = torch.randint(0, 2, (n,), generator=generator)
    half = size // 2
    for i in range(n):
        if quadrant is None:
            y, x = torch.randint(0, size - patch, (2,), generator=generator).tolist()
        else:
            y, x = (torch.randint(0, half - patch, (2,), generator=generator) + torch.tensor(quadrant) * half).tolist()
        images[i, 0 if labels[i] == 0 else 2, y:y + patch, x:x + patch] += 3.0
    return images, labels


@pytest.fixture(scope="module")
def patch_model():
    """A ResNet-18 trained in the test (40 steps of 8 images) to tell a red patch from a blue one, wherever the patch
    is. At 128 px (layer4: a 4x4 grid) 32 of 32 top-right and 32 of 32 bottom-left known answers put most of their
    heat there (0.62-0.69 of it on average); at 64 or 96 px the maps localise too coarsely for the check (about
    half land in the opposite quadrant)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = model_utils.get_model(num_classes=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(40):
        images, labels = patch_batch(8, generator)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), generator


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_gradcam_heat_sits_in_the_evidence_quadrant(patch_model, method):
    """Evidence in the top-right quadrant (an off-diagonal one: a map with rows and columns swapped would put the
    heat bottom-left)."""
    model, generator = patch_model
    images, labels = patch_batch(32, generator, quadrant=(0, 1))
    with torch.no_grad():
        assert (model(images).argmax(1) == labels).float().mean() > 0.9  # it learned to see the patch
    heat = gradcam.class_activation_map(model, images, labels, method=method)
    assert heat.shape == (32, 128, 128) and heat.min() >= 0 and heat.max() <= 1 + 1e-6
    quadrants = torch.stack([heat[:, :64, :64], heat[:, :64, 64:], heat[:, 64:, :64], heat[:, 64:, 64:]], 1)
    mass = quadrants.sum((2, 3))
    assert (mass.argmax(1) == 1).float().mean() >= 0.9  # top-right; chance would be 0.25
    assert (mass[:, 1] / mass.sum(1)).mean() >= 0.4
    # The single hottest pixel may sit in the neighbouring 32-px cell across the border (observed: 66% for Grad-CAM,
    # over 80% for Grad-CAM++, against 25% by chance).
    peak = heat.flatten(1).argmax(1)
    assert ((peak // 128 < 64) & (peak % 128 >= 64)).float().mean() >= 0.55
    other = gradcam.class_activation_map(model, images, 1 - labels, method=method)
    assert not torch.allclose(other, heat, atol=0.05)  # the map depends on the class asked about


def test_centre_crop_box_matches_the_val_transform():
    # Pixels encode their own coordinates (R = x, G = y); after the real val transform the first and last kept
    # pixels must sit where centre_crop_box says the crop starts and ends, within a pixel of resampling blur.
    width, height, img_size = 240, 180, 64
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    coords = np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    tensor = splits.val_transform(img_size)(Image.fromarray(coords))
    mean = torch.tensor(splits.IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(splits.IMAGENET_STD).view(3, 1, 1) * 255
    kept = tensor * std + mean
    x0, y0, x1, y1 = gradcam.centre_crop_box(width, height, splits.resize_size(img_size), img_size)
    assert abs(kept[0, :, 0].mean() - x0) <= 1.5 and abs(kept[0, :, -1].mean() - (x1 - 1)) <= 1.5
    assert abs(kept[1, 0, :].mean() - y0) <= 1.5 and abs(kept[1, -1, :].mean() - (y1 - 1)) <= 1.5
    assert 0 < y0 < y1 < height and 0 < x0 < x1 < width  # 64/73 of the shorter side is kept, centred


def test_real_run_folder_classes_are_the_data_roots(real_root, tmp_path):
    """On the real split: a run records the split's identity and its 101 classes in its folder."""
    cfg = presets.resolve("cpu_smoke", dict(data_root=real_root, out_dir=str(tmp_path), epochs=1, img_size=32,
                                            batch_size=256, eval_batch_size=512, eval_every=1, progress=False,
                                            warmup_epochs=0.0))
    cfg_split = splits.split_identity(real_root)
    assert cfg_split["train"] and cfg_split["params"]["train_per_class"] == 30
    assert len(splits.read_classes(real_root)) == 101 and cfg["data_root"] == real_root


def test_class_names_are_drawn_as_text_never_as_maths(tmp_path):
    """A class named 'a$\\foo$' (mathtext matplotlib cannot parse) in the confusion matrix and the mistakes plot."""
    names = ["a$\\foo$", "b$x^$"]
    png = plots.plot_confusion(torch.eye(2, dtype=torch.long), names)
    assert png.startswith(b"\x89PNG")
    rng = np.random.default_rng(0)
    make_image(CLASS_COLOURS["alpha"], rng).save(tmp_path / "one.jpg")
    logits = torch.tensor([[0.2, 0.8]])
    listed = plots.plot_wrong(logits, logits.argmax(1), torch.tensor([0]), ["one.jpg"], str(tmp_path), names,
                              str(tmp_path / "wrong.png"))
    assert [(w["true"], w["predicted"]) for w in listed] == [tuple(names)]
    assert (tmp_path / "wrong.png").stat().st_size > 0


def test_gradcam_overlays_of_long_names_are_valid_unique_files(trained_run, tmp_path, capfd):
    """Classes of 200 characters and an image of an 80-character name: every overlay's name fits a file system
    (at most 255 bytes), and the two targets' overlays are two files."""
    run = tmp_path / "run"
    shutil.copytree(trained_run["out_dir"], run)
    long_names = ["é" * 150 + "x" * 50, "é" * 150 + "y" * 50, "charlie"]
    (run / "classes.txt").write_text("\n".join(long_names) + "\n", encoding="utf-8")
    image = tmp_path / ("n" * 80 + ".jpg")
    make_image(CLASS_COLOURS["alpha"], np.random.default_rng(0)).save(image)
    made = []
    for target in long_names[:2]:
        code, _, err = run_cli(predict.cli, [str(image), "--checkpoint", str(run), "--gradcam", "--target", target,
                                             "--out_dir", str(tmp_path / "cams"), "--json", str(tmp_path / "p.json")],
                               capfd)
        assert code == 0, err
        made.append(json.load(open(tmp_path / "p.json"))["results"][0]["gradcam"])
    assert made[0] != made[1] and all(os.path.isfile(p) for p in made)
    assert all(len(os.path.basename(p).encode("utf-8")) <= 255 for p in made)
