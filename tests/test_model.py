"""model_utils: construction, ImageNet loading from a seeded offline cache, local weights, groups, freezing."""
import os

import pytest
import torch

import model_utils
from kit.base import errors


def test_get_model_builds_each_arch_with_a_new_head():
    for arch, width in (("resnet18", 512), ("resnet50", 2048)):
        model = model_utils.get_model(num_classes=101, arch=arch)
        assert model.fc.in_features == width and model.fc.out_features == 101
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 101)
    with pytest.raises(errors.ModelError, match="resnet18, resnet34"):
        model_utils.get_model(arch="vgg16")


def test_pretrained_loads_torchvision_imagenet_weights_offline(seeded_torch_home):
    model = model_utils.get_model(num_classes=101, pretrained=True)
    state = model.state_dict()
    for key in ("conv1.weight", "layer4.1.bn2.running_var", "layer2.0.downsample.0.weight"):
        assert torch.equal(state[key], seeded_torch_home[key])
    assert state["fc.weight"].shape == (101, 512)


def test_pretrained_offline_without_cache_names_weights_flag_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    import urllib.error

    def offline(url, *args, **kwargs):  # what urllib raises with no network, whatever machine runs the test
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(errors.ModelError) as err:
        model_utils.get_model(pretrained=True)
    message = str(err.value)
    assert "--weights" in message and os.path.join(str(tmp_path / "empty_home"), "hub", "checkpoints") in message


def test_local_weights_drop_a_mismatched_head(seeded_torch_home, tmp_path, capsys):
    path = tmp_path / "imagenet.pth"
    torch.save({"module." + k: v for k, v in seeded_torch_home.items()}, path)  # a DDP-prefixed file
    model = model_utils.get_model(num_classes=101, weights=str(path))
    assert "dropping its 1000-class head" in capsys.readouterr().out
    assert torch.equal(model.state_dict()["conv1.weight"], seeded_torch_home["conv1.weight"])


def test_param_groups_lrs_and_no_decay_on_bn_and_bias():
    model = model_utils.get_model(num_classes=10)
    groups = {g["name"]: g for g in model_utils.param_groups(model, lr_backbone=1e-4, lr_fc=1e-2, weight_decay=0.05)}
    assert set(groups) == {"backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"}
    assert groups["backbone_decay"]["lr"] == 1e-4 and groups["head_decay"]["lr"] == 1e-2
    assert groups["backbone_decay"]["weight_decay"] == 0.05 and groups["backbone_no_decay"]["weight_decay"] == 0
    assert groups["head_no_decay"]["params"] == [model.fc.bias] and groups["head_decay"]["params"] == [model.fc.weight]
    assert all(p.ndim == 1 for p in groups["backbone_no_decay"]["params"])  # BN weights/biases
    assert all(p.ndim == 4 for p in groups["backbone_decay"]["params"])  # conv kernels
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))


@pytest.mark.parametrize("arch,blocks", [("resnet18", (2, 2, 2, 2)), ("resnet50", (3, 4, 6, 3))])
def test_layer_wise_lrs_for_every_depth(arch, blocks):
    model = model_utils.get_model(num_classes=10, arch=arch)
    decayed = {g["name"]: g for g in model_utils.param_groups(model, 1e-3, 1e-2, 0.05, layer_decay=0.5)}
    expected = {"head": 1e-2, "layer4": 1e-3, "layer3": 5e-4, "layer2": 2.5e-4, "layer1": 1.25e-4, "stem": 6.25e-5}
    for stage, lr in expected.items():
        assert decayed[f"{stage}_decay"]["lr"] == pytest.approx(lr)
        assert decayed[f"{stage}_no_decay"]["lr"] == pytest.approx(lr)
        assert decayed[f"{stage}_no_decay"]["weight_decay"] == 0.0
    assert [p.shape for p in decayed["stem_decay"]["params"]] == [model.conv1.weight.shape]
    convs_per_block = 3 if arch == "resnet50" else 2
    # layer3: its blocks' convs plus the downsample conv
    assert len(decayed["layer3_decay"]["params"]) == blocks[2] * convs_per_block + 1
    listed = {g["name"]: g for g in model_utils.param_groups(model, 0, 0, 0.05, stage_lrs=[1e-3, 1e-4, 1e-5, 1e-6])}
    # The example's list, head down; the last LR goes to every stage below it.
    got = {g["stage"]: g["lr"] for g in listed.values()}
    assert got == {"head": 1e-3, "layer4": 1e-4, "layer3": 1e-5, "layer2": 1e-6, "layer1": 1e-6, "stem": 1e-6}
    assert sum(len(g["params"]) for g in listed.values()) == len(list(model.parameters()))


@pytest.mark.parametrize("trainable,expected", [("head", {"fc"}), ("layer4+head", {"fc", "layer4"}),
                                                ("layer4", {"fc", "layer4"}), ("none", None), ("all", None)])
def test_trainable_names_and_their_old_aliases(trainable, expected):
    model = model_utils.get_model(num_classes=10)
    model_utils.apply_freeze(model, trainable)
    names = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert names == (expected or {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"})
    model_utils.set_train_mode(model, trainable)
    assert model.fc.training
    assert model.bn1.training == (expected is None)  # frozen BatchNorm keeps its running statistics
    model_utils.set_train_mode(model, trainable, frozen_bn="train")
    assert model.bn1.training


def test_export_state_dict_is_plain_and_nchw_contiguous():
    model = model_utils.get_model(num_classes=10).to(memory_format=torch.channels_last)
    assert not model.conv1.weight.is_contiguous()
    wrapped = torch.nn.DataParallel(model)
    state = model_utils.export_state_dict(wrapped)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)
    assert all(v.is_contiguous() for v in state.values())
    fresh = model_utils.get_model(num_classes=10)
    fresh.load_state_dict(state)  # strict
