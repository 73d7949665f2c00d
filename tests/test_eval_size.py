"""--eval_img_size: a run trained at one resolution and evaluated at another; config.json, evaluate.py --img_size,
preprocess.json, the ONNX export and predict.py all use the evaluation resolution."""
import json
import os

import pytest
import torch
from PIL import Image

import data_utils
import evaluate
import export
import model_utils
import predict
import presets
from conftest import tiny_cfg
from kit.base import devices, errors
from kit.data import sampling, splits
from kit.training import engine, training

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run_at_48(prepared_root, module_tmp):
    """Trained on 32 px crops, evaluated on 48 px centre crops."""
    return training.main(tiny_cfg(prepared_root, module_tmp / "eval48", epochs=1, eval_img_size=48))


def direct_val_top1(run_dir, data_root, size):
    """best.pth's val top-1 at `size`, through a loader built here (not from the run's settings)."""
    loader = data_utils.build_loader(data_root, "val", 8, CPU, sampling.DataSettings(img_size=size, loader="torch",
                                                                                   workers=0))
    model = model_utils.load_trained(os.path.join(run_dir, "best.pth"), 3).to(memory_format=torch.channels_last)
    amp_dtype, _ = devices.resolve_amp("auto", CPU)
    return engine.evaluate(model, loader, 3, amp_dtype)["val_top1"]


@pytest.mark.slow
def test_training_evaluates_at_the_eval_size_and_evaluate_can_choose_another(run_at_48, prepared_root, tmp_path):
    run_dir = run_at_48["out_dir"]
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert (config["img_size"], config["eval_img_size"]) == (32, 48)
    assert presets.resolve(config=config)["eval_img_size"] == 48  # the rerun file keeps it
    row = run_at_48["rows"][-1]
    args = ["--checkpoint", run_dir, "--loader", "torch", "--out_dir", str(tmp_path / "own")]
    own = evaluate.main(evaluate.get_args_parser().parse_args(args))
    assert own["eval_img_size"] == 48 and own["top1"] == row["val_top1"]  # training's figure is the 48 px one
    assert own["top1"] == direct_val_top1(run_dir, prepared_root, 48)
    at_32 = evaluate.main(evaluate.get_args_parser().parse_args(["--checkpoint", run_dir, "--img_size", "32",
                                                                 "--loader", "torch"]))
    assert at_32["eval_img_size"] == 32 and at_32["top1"] == direct_val_top1(run_dir, prepared_root, 32)
    assert os.path.isfile(os.path.join(run_dir, "eval_val_32px", "report.json"))  # not over the 48 px report


@pytest.mark.slow
def test_export_and_predict_use_the_eval_size(run_at_48, tmp_path):
    run_dir = run_at_48["out_dir"]
    report = export.main(export.get_args_parser().parse_args(["--checkpoint", run_dir, "--out", str(tmp_path),
                                                              "--format", "onnx"]))
    spec = json.load(open(os.path.join(tmp_path, "preprocess.json")))
    assert (spec["input"]["height"], spec["resize"]["shorter_side"], spec["center_crop"]["size"]) == \
        (48, splits.resize_size(48), 48)
    assert report["files"]["model.onnx"]["batch_1"]["top1_agreement"] == 1.0  # checked at 48 px against eager
    image = Image.new("RGB", (70, 50), (200, 40, 40))
    predictor = predict.Predictor(run_dir)
    assert predictor.img_size == 48 and predictor.batch([image]).shape == (1, 3, 48, 48)
    onnx = predict.OnnxPredictor(os.path.join(tmp_path, "model.onnx"))
    assert onnx.img_size == 48
    assert torch.allclose(torch.as_tensor(onnx.probabilities([image])), predictor.probabilities([image]), atol=1e-4)


def test_eval_size_is_checked():
    with pytest.raises(errors.ConfigError, match="eval_img_size must be >= 32 pixels, or 0 for img_size"):
        presets.resolve("cpu_smoke", {"eval_img_size": 16})
    assert presets.eval_size(presets.resolve("cpu_smoke")) == 96  # 0: the training size
