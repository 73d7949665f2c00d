"""archs.py, the architecture seam: every architecture's head, stages, freezing and Grad-CAM layers, checked against
answers worked out independently (output strides, module names), and a non-ResNet (MobileNetV3-Large) through
every step: training with gradual unfreezing, evaluate, predict with Grad-CAM, ONNX export, the report page."""
import json
import os

import numpy as np
import onnxruntime
import pytest
import torch

import evaluate
import export
import model_utils
import predict
from conftest import CLASS_COLOURS, make_image, run_cli, tiny_cfg
from kit.models import archs
from kit.reporting import gradcam
from kit.training import training

FAMILIES = ["resnet18", "mobilenet_v3_large"]


def stages_by_stride(model):
    """{top-level block: stage} from the blocks' output strides at 224 px, independently of archs.py: the stem is
    the first conv; stage k holds the blocks whose output is 224 / 2**(k+1) px (stride 2 and 4 both go to stage 1,
    where the stem's own output already is 112 px)."""
    sizes, hooks = {}, []
    blocks = list(model.features.named_children()) if hasattr(model, "features") else \
        [(n, m) for n, m in model.named_children() if n.startswith("layer")]
    prefix = "features." if hasattr(model, "features") else ""
    for name, block in blocks:
        hooks.append(block.register_forward_hook(lambda m, i, out, name=name: sizes.update({name: out.shape[-1]})))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for hook in hooks:
        hook.remove()
    names = archs.anatomy_of(model).stages[1:5][::-1]  # stage1 .. stage4 (layer1 .. layer4)
    by_size = {112: names[0], 56: names[0], 28: names[1], 14: names[2], 7: names[3]}
    out = {prefix + name: by_size[size] for name, size in sizes.items()}
    if prefix:
        out[prefix + "0"] = "stem"
    return out


@pytest.mark.parametrize("arch", FAMILIES)
def test_each_parameter_is_in_the_stage_its_output_stride_says(arch):
    model = model_utils.get_model(num_classes=7, arch=arch)
    anatomy = archs.anatomy_of(model)
    assert anatomy.head_linear(model).out_features == 7 and len(anatomy.stages) == 6
    expected = stages_by_stride(model)
    for name, _ in model.named_parameters():
        block = next((b for b in expected if name.startswith(b + ".")), None)
        if block is not None:
            assert anatomy.stage_of(name) == expected[block], name
        elif name.startswith(anatomy.head + "."):
            assert anatomy.stage_of(name) == "head", name
        else:
            assert anatomy.stage_of(name) == "stem", name  # ResNet's conv1, bn1
    assert {anatomy.stage_of(n) for n, _ in model.named_parameters()} == set(anatomy.stages)


@pytest.mark.parametrize("arch", FAMILIES)
def test_the_head_and_only_the_head_trains_at_lr_fc(arch):
    model = model_utils.get_model(num_classes=7, arch=arch)
    head = archs.ANATOMIES[arch].head
    for layer_decay in (0.0, 0.5):
        groups = model_utils.param_groups(model, 1e-4, 3e-2, 0.05, layer_decay=layer_decay)
        at_fc = {id(p) for g in groups if g["lr"] == 3e-2 for p in g["params"]}
        under_head = {id(p) for n, p in model.named_parameters() if n.startswith(head + ".")}
        assert at_fc == under_head and len(under_head) == (2 if arch.startswith("resnet") else 4)
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_mobilenet_freezing_follows_its_stages():
    model = model_utils.get_model(num_classes=7, arch="mobilenet_v3_large")
    model_utils.apply_freeze(model, "head")
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"classifier"}
    model_utils.apply_freeze(model, "layer4")  # the old --freeze layer4: the last stage and the head
    training = {".".join(n.split(".")[:2]) for n, p in model.named_parameters() if p.requires_grad}
    assert training == {"classifier.0", "classifier.3"} | {f"features.{i}" for i in range(13, 17)}
    model_utils.set_train_mode(model, "layer4+head")
    assert not model.features[12].block[0][1].training and model.features[13].block[0][1].training


def test_gradcam_takes_each_architectures_own_layers(tmp_path):
    model = model_utils.get_model(num_classes=3, arch="mobilenet_v3_large")
    heat = gradcam.class_activation_map(model, torch.randn(2, 3, 64, 64), 1)
    assert heat.shape == (2, 64, 64) and 0 <= float(heat.min()) and float(heat.max()) <= 1
    assert gradcam.layers(model) == ("stem", "stage1", "stage2", "stage3", "stage4")
    with pytest.raises(ValueError, match="choose from stem, stage1"):
        gradcam.class_activation_map(model, torch.randn(1, 3, 64, 64), 0, layer="layer4")


def test_imagenet_weights_of_a_mobilenet_load_offline(tmp_path, monkeypatch):
    """torchvision's file name in the hub cache, generated here: every tensor but the replaced Linear loads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = model_utils.hub_checkpoint_path("mobilenet_v3_large")
    os.makedirs(os.path.dirname(path))
    torch.manual_seed(5)
    reference = model_utils.torchvision.models.mobilenet_v3_large().state_dict()
    torch.save(reference, path)
    model = model_utils.get_model(num_classes=3, pretrained=True, arch="mobilenet_v3_large")
    state = model.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference if not k.startswith("classifier.3."))
    assert state["classifier.3.weight"].shape == (3, 1280)


@pytest.mark.slow
def test_a_mobilenet_trains_unfreezes_evaluates_predicts_exports_and_reports(prepared_with_test, tmp_path, capfd):
    """Epoch 1 trains only the head (the backbone stays bit-equal to its initial weights), epoch 2 everything;
    evaluate.py reproduces the run's figure; predict.py explains with Grad-CAM; the ONNX export gives the
    PyTorch logits; the report page is written."""
    torch.manual_seed(3)
    init = tmp_path / "init.pth"
    start = model_utils.get_model(num_classes=3, arch="mobilenet_v3_large").state_dict()
    torch.save(start, init)
    result = training.main(tiny_cfg(prepared_with_test, tmp_path / "runs", arch="mobilenet_v3_large", img_size=64,
                                 weights=str(init), trainable="head", freeze_epochs=1, epochs=2, keep_checkpoints=2,
                                 report_page=True))
    run = result["out_dir"]
    after = [torch.load(os.path.join(run, f"epoch_00{e}.pth"), weights_only=True)["model"] for e in (1, 2)]
    backbone = [k for k in start if k.startswith("features.") and start[k].is_floating_point()]
    assert all(torch.equal(after[0][k], start[k]) for k in backbone)  # frozen: weights and BatchNorm statistics
    assert not torch.equal(after[0]["classifier.3.weight"], start["classifier.3.weight"])
    assert not all(torch.equal(after[1][k], start[k]) for k in backbone)  # unfrozen in epoch 2

    report = evaluate.main(evaluate.get_args_parser().parse_args(["--checkpoint", run, "--out_dir",
                                                                  str(tmp_path / "eval")]))
    assert report["top1"] == result["summary"]["best"]["val_top1"]

    image = tmp_path / "red.jpg"
    make_image(CLASS_COLOURS["alpha"], np.random.default_rng(0)).save(image)
    code, _, err = run_cli(predict.cli, [str(image), "--checkpoint", run, "--gradcam", "--out_dir",
                                         str(tmp_path / "cams"), "--json", str(tmp_path / "p.json")], capfd)
    assert code == 0, err
    assert os.path.isfile(json.load(open(tmp_path / "p.json"))["results"][0]["gradcam"])

    assert export.cli(["--checkpoint", run, "--format", "onnx"]) == 0  # its own check against PyTorch passes
    predictor = predict.Predictor(run)
    batch = predictor.batch([predictor.load(str(image))] * 2)
    with torch.no_grad():
        expected = predictor.model(batch).numpy()
    session = onnxruntime.InferenceSession(os.path.join(run, "export", "model.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    assert np.allclose(got, expected, rtol=1e-3, atol=1e-4)

    page = open(os.path.join(run, "report.html"), encoding="utf-8").read()
    assert "mobilenet_v3_large" in page
