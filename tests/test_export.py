"""export.py: ONNX and torch.export of a trained run, checked against eager; predict.py --onnx; bad inputs."""
import json
import os

import numpy as np
import pytest
import torch

import export
import model_utils
import predict
from conftest import one_line_error, run_cli
from kit.base import errors
from kit.data import splits
from kit.models import exporter
from kit.training import runs


@pytest.fixture(scope="module")
def exported(trained_run, module_tmp):
    out = str(module_tmp / "export")
    report = export.main(export.get_args_parser().parse_args(["--checkpoint", trained_run["out_dir"], "--out", out]))
    return out, report


@pytest.mark.slow
def test_both_formats_reload_and_match_eager_at_two_batch_sizes(exported, trained_run, prepared_with_test):
    out, report = exported
    assert report["inputs"].startswith("27 real val images")
    for name in ("model.onnx", "model.pt2"):
        figures = report["files"][name]
        for batch in (1, 8):
            assert figures[f"batch_{batch}"]["top1_agreement"] == 1.0
            assert figures[f"batch_{batch}"]["max_abs_diff"] < 1e-4  # observed about 2e-6
    assert not [f for f in os.listdir(out) if f.endswith(".data")]  # one file: no external weights
    # Reload each, independently of the kit's check, on 3 fresh inputs (a batch size never used so far).
    import onnxruntime

    model = model_utils.load_trained(os.path.join(trained_run["out_dir"], "best.pth"), 3).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(x)
    session = onnxruntime.InferenceSession(os.path.join(out, "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    pt2 = torch.export.load(os.path.join(out, "model.pt2")).module()
    with torch.no_grad():
        pt2_logits = pt2(x)
    for got in (onnx_logits, pt2_logits):
        assert torch.allclose(got, eager, rtol=1e-3, atol=1e-5)


def test_preprocess_json_round_trips_classes_and_transform(exported, trained_run):
    out, _ = exported
    spec = json.load(open(os.path.join(out, "preprocess.json")))
    assert spec["classes"] == open(os.path.join(trained_run["out_dir"], "classes.txt")).read().split()
    assert (spec["input"]["height"], spec["resize"]["shorter_side"], spec["center_crop"]["size"]) == (32, 36, 32)
    assert spec["mean"] == list(splits.IMAGENET_MEAN) and spec["std"] == list(splits.IMAGENET_STD)
    assert spec["input"]["layout"] == "NCHW" and spec["input"]["channels"] == "RGB"
    # A deployment following the spec by hand (numpy, PIL) gets the kit's own input tensor.
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    w, h = image.size
    short = spec["resize"]["shorter_side"]
    resized = image.resize((round(w * short / min(w, h)), round(h * short / min(w, h))), Image.BILINEAR)
    size = spec["center_crop"]["size"]
    left = int(np.round((resized.width - size) / 2 + 1e-9))
    top = int(np.round((resized.height - size) / 2 + 1e-9))
    crop = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    manual = torch.from_numpy(((crop - spec["mean"]) / spec["std"]).transpose(2, 0, 1).astype(np.float32))
    assert torch.allclose(manual, splits.val_transform(32)(image), atol=1e-6)


def test_predict_onnx_equals_predict_pytorch(exported, trained_run, prepared_with_test, tmp_path, capfd):
    out, _ = exported
    files, _ = splits.read_split(prepared_with_test, "val")
    paths = [os.path.join(splits.image_root(prepared_with_test), f) for f in files[:10]]
    torch_top = [r[0][0] for r in predict.Predictor(trained_run["out_dir"]).predict(paths)]
    onnx_top = [r[0][0] for r in predict.OnnxPredictor(os.path.join(out, "model.onnx")).predict(paths)]
    assert onnx_top == torch_top
    code, text, _ = run_cli(predict.cli, [*paths[:3], "--onnx", os.path.join(out, "model.onnx"), "--json",
                                          str(tmp_path / "p.json")], capfd)
    assert code == 0 and len(json.load(open(tmp_path / "p.json"))["results"]) == 3
    code, _, err = run_cli(predict.cli, [paths[0], "--onnx", os.path.join(out, "model.onnx"), "--gradcam"], capfd)
    one_line_error(code, err, "Grad-CAM needs the PyTorch model")


def test_bad_inputs_are_one_line(trained_run, tmp_path, capfd):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    code, _, err = run_cli(export.cli, ["--checkpoint", str(text), "--arch", "resnet18", "--img_size", "32",
                                        "--classes", os.path.join(trained_run["out_dir"], "classes.txt")], capfd)
    one_line_error(code, err, "notes.pth")
    four = tmp_path / "four.txt"
    four.write_text("a\nb\nc\nd\n")
    code, _, err = run_cli(export.cli, ["--checkpoint", os.path.join(trained_run["out_dir"], "best.pth"),
                                        "--classes", str(four)], capfd)
    one_line_error(code, err, "3-class head but this model has 4 classes")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(export.cli, ["--checkpoint", trained_run["out_dir"], "--out", str(blocker / "sub")], capfd)
    one_line_error(code, err, "cannot write to")


@pytest.mark.slow
def test_a_mismatch_exits_naming_the_figures(trained_run, tmp_path, monkeypatch):
    real = torch.export.load

    def perturbed(path):  # an exported program that is off by 1e-2
        program = real(path)

        class Off(torch.nn.Module):
            def forward(self, x):
                return program.module()(x) + 1e-2
        return type("P", (), {"module": lambda self: Off()})()

    monkeypatch.setattr(torch.export, "load", perturbed)
    with pytest.raises(errors.ExportError, match="torch.export program differs .* max abs logit difference 0.01"):
        export.main(export.get_args_parser().parse_args(["--checkpoint", trained_run["out_dir"], "--format", "pt2",
                                                         "--out", str(tmp_path)]))


@pytest.mark.slow
def test_real_val_images_drive_the_check(real_root, tmp_path):
    """With the real data: a 101-class ResNet-18 (random weights: the check is about the export, not accuracy),
    exported and checked on real val images of the split."""

    model = model_utils.get_model(101)
    torch.save(model.state_dict(), tmp_path / "best.pth")
    (tmp_path / "classes.txt").write_text("\n".join(splits.read_classes(real_root)) + "\n")
    run = runs.open_run(str(tmp_path / "best.pth"), "resnet18", 64, str(tmp_path / "classes.txt"))
    report = exporter.export(run, str(tmp_path / "out"), ("onnx",), data_root=real_root, check_images=32)
    assert report["inputs"] == f"32 real val images of {real_root}"
    assert report["files"]["model.onnx"]["batch_8"]["top1_agreement"] == 1.0
