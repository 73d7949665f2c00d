"""presets: the report's table, merge order, and rejection of unknown or nonsense settings."""
import pytest

import presets

# preset: (pretrained, epochs, batch, lr_backbone, lr_fc, weight_decay, mixup_alpha, cutmix_alpha), from the report
REPORT = {
    "r18_scratch_main": (False, 300, 64, 3e-3, 3e-3, 1e-3, 0.4, 1.0),
    "r18_scratch_wd2e3": (False, 300, 64, 2.5e-3, 2.5e-3, 2e-3, 0.4, 1.0),
    "r18_pretrain_main": (True, 200, 128, 2e-4, 5e-3, 1e-4, 0.4, 1.0),
    "r18_pretrain_lr3e4": (True, 200, 128, 3e-4, 5e-3, 1e-4, 0.4, 1.0),
    "r18_pretrain_lowwd_mix02": (True, 240, 96, 2e-4, 4e-3, 5e-5, 0.2, 1.0),
}
KEYS = ("pretrained", "epochs", "batch_size", "lr_backbone", "lr_fc", "weight_decay", "mixup_alpha", "cutmix_alpha")


@pytest.mark.parametrize("name", list(REPORT))
def test_report_runs_have_the_reports_values(name):
    cfg = presets.resolve(name)
    assert tuple(cfg[k] for k in KEYS) == REPORT[name]
    assert cfg["arch"] == "resnet18" and cfg["img_size"] == 224


def test_default_preset_is_run_3_and_deeper_resnets_exist():
    assert presets.resolve()["exp"] == "r18_pretrain_main"
    for depth in (34, 50, 101):
        assert presets.resolve(f"r{depth}_pretrain")["arch"] == f"resnet{depth}"
        assert presets.resolve(f"r{depth}_pretrain")["pretrained"] is True
        assert presets.resolve(f"r{depth}_scratch")["pretrained"] is False
    smoke = presets.resolve("cpu_smoke")
    assert smoke["pretrained"] is False and smoke["img_size"] < 224 and smoke["device"] == "cpu"


def test_merge_order_defaults_then_preset_then_flags():
    cfg = presets.resolve("r18_pretrain_lowwd_mix02", {"lr_fc": 1e-3, "epochs": 3})
    assert cfg["lr_fc"] == 1e-3 and cfg["epochs"] == 3  # flags win
    assert cfg["batch_size"] == 96  # the preset beats the default (128)
    assert cfg["workers"] == presets.DEFAULTS["workers"]  # untouched defaults stay


@pytest.mark.parametrize("overrides,match", [
    ({"epochs": 0}, "epochs must be > 0"), ({"batch_size": 0}, "batch_size must be > 0"),
    ({"lr_fc": -1.0}, "lr_fc must be >= 0"), ({"img_size": 16}, "img_size must be >= 32"),
    ({"mixup_alpha": -0.1}, "mixup_alpha must be >= 0"), ({"arch": "vgg"}, "choose from resnet18"),
    ({"amp": "fp8"}, "choose from auto, bf16"), ({"learning_rate": 1.0}, "unknown setting"),
])
def test_bad_values_are_rejected_with_the_valid_choices(overrides, match):
    with pytest.raises(presets.ConfigError, match=match):
        presets.resolve("cpu_smoke", overrides)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(presets.ConfigError) as err:
        presets.resolve("r18_best")
    assert "r18_pretrain_lowwd_mix02" in str(err.value) and "cpu_smoke" in str(err.value)
