"""presets and the command line: the report's table, merge order (defaults, preset, config file, flags), other
kits' flag spellings, config files, and rejection of unknown or nonsense settings. All in-process."""
import json
import os

import pytest

import presets
import train_caltech101 as train
from conftest import ROOT
from kit.base import errors
from kit.settings import settings_cli

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
    # The fine-tuning tools are off in every report preset, so they mean what the report says.
    assert (cfg["ema_decay"], cfg["early_stop_patience"], cfg["freeze_epochs"], cfg["layer_decay"],
            cfg["stage_lrs"], cfg["trainable"]) == (0.0, 0, 0, 0.0, None, "all")


def test_default_preset_is_run_3_and_deeper_resnets_exist():
    assert presets.resolve()["exp"] == "r18_pretrain_main"
    for depth in (34, 50, 101):
        assert presets.resolve(f"r{depth}_pretrain")["arch"] == f"resnet{depth}"
        assert presets.resolve(f"r{depth}_pretrain")["pretrained"] is True
        assert presets.resolve(f"r{depth}_scratch")["pretrained"] is False
    smoke = presets.resolve("cpu_smoke")
    assert smoke["pretrained"] is False and smoke["img_size"] < 224 and smoke["device"] == "cpu"


def test_every_setting_has_a_meaning_and_a_kind():
    assert set(presets.HELP) == set(presets.DEFAULTS)
    assert all(len(text) > 10 for text in presets.HELP.values())
    assert all(isinstance(s, presets.Setting) and s.kind in presets.KINDS for s in presets.SETTINGS.values())
    # Every list of settings of one kind is derived from the records, so none can forget a setting.
    kinds = {kind: presets.of_kind(kind) for kind in presets.KINDS}
    assert sorted(k for keys in kinds.values() for k in keys) == sorted(presets.SETTINGS)
    assert presets.RUN_DEFINING == kinds["run"] and presets.PER_MACHINE == kinds["machine"]
    assert presets.LAUNCH_KEYS == ("resume",) and "loader" in presets.PER_MACHINE  # a machine's choice, not the run's
    assert "monitor" in presets.RUN_DEFINING and "monitor" not in presets.SWEEPABLE
    assert set(presets.COMPARED) == set(kinds["run"]) | {"data_root"}
    assert all(presets.SETTINGS[k].expected != "text or null" for k in presets.DEFAULTS if presets.DEFAULTS[k] is None)


def test_merge_order_defaults_then_preset_then_config_then_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("training:\n  lr_fc: 1e-3\n  epochs: 3\n  weight_decay: 0.01\n")
    cfg = presets.resolve("r18_pretrain_lowwd_mix02", {"epochs": 5}, config=str(config))
    assert cfg["lr_fc"] == 1e-3 and cfg["weight_decay"] == 0.01  # the file beats the preset (1e-3: YAML string)
    assert cfg["epochs"] == 5  # the flag beats the file
    assert cfg["batch_size"] == 96  # the preset beats the default (128)
    assert cfg["workers"] == presets.DEFAULTS["workers"]  # untouched defaults stay


@pytest.mark.parametrize("name", ["resnet34_finetune.yaml", "resnet34_scratch.yaml"])
def test_shipped_config_files_load(name):
    cfg = presets.resolve(None, config=os.path.join(ROOT, "configs", name))
    assert cfg["arch"] == "resnet34" and cfg["name"] == name.split(".")[0]
    assert cfg["exp"] == ("r34_pretrain" if "finetune" in name else "r34_scratch")
    assert cfg["pretrained"] is ("finetune" in name)


def test_a_runs_config_json_reruns_it(tmp_path):
    cfg = presets.resolve("cpu_smoke", {"epochs": 3, "lr_fc": 0.01})
    record = dict(cfg, split={"train": "abc"}, world_size=2)  # what a run writes
    path = tmp_path / "config.json"
    path.write_text(json.dumps(record))
    assert presets.resolve(None, config=str(path)) == cfg


@pytest.mark.parametrize("text,match", [("learning_rate: 1\n", "unknown setting.*learning_rate"),
                                        ("epochs: many\n", "bad.yaml: epochs='many'"),
                                        ("arch: vgg16\n", "arch='vgg16' is not valid"),
                                        ("- a\n- b\n", "mapping of settings"), ("a: [\n", "not valid YAML")])
def test_bad_config_files_fail_naming_file_and_key(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(errors.ConfigError, match=match) as err:
        presets.resolve("cpu_smoke", config=str(path))
    assert len(str(err.value).splitlines()) == 1
    assert "bad.yaml" in str(err.value) or "arch" in str(err.value)


@pytest.mark.parametrize("overrides,match", [
    ({"epochs": 0}, "epochs must be > 0"), ({"batch_size": 0}, "batch_size must be > 0"),
    ({"lr_fc": -1.0}, "lr_fc must be >= 0"), ({"img_size": 16}, "img_size must be >= 32"),
    ({"mixup_alpha": -0.1}, "mixup_alpha must be >= 0"), ({"arch": "vgg"}, "choose from resnet18"),
    ({"amp": "fp8"}, "choose from auto, bf16"), ({"learning_rate": 1.0}, "unknown setting"),
    ({"device": "tpu"}, "cuda:N"), ({"stage_lrs": "1e-3,x"}, "comma-separated"), ({"ema_decay": 1.0}, "ema_decay"),
    ({"freeze_epochs": 2}, "needs a frozen start"), ({"trainable": "head", "freeze_epochs": 40}, "leaves no epoch"),
])
def test_bad_values_are_rejected_with_the_valid_choices(overrides, match):
    with pytest.raises(errors.ConfigError, match=match):
        presets.resolve("cpu_smoke", overrides)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(errors.ConfigError) as err:
        presets.resolve("r18_best")
    assert "r18_pretrain_lowwd_mix02" in str(err.value) and "cpu_smoke" in str(err.value)


def parse(*argv):
    exp, config, overrides, show = settings_cli.settings_from_args(train.get_args_parser().parse_args(list(argv)))
    return presets.resolve(exp, overrides, config=config), show


def test_other_kits_flags_and_spellings():
    # The report kit's README, verbatim (its data root with a trailing slash).
    cfg, _ = parse("--exp", "r18_pretrain_main", "--data_root", "data/Caltech101/", "--output_dir", "checkpoints/")
    assert cfg["out_dir"] == "checkpoints/" and cfg["data_root"] == "data/Caltech101/"
    cfg, _ = parse("--scratch", "--workers", "3")
    assert cfg["pretrained"] is False and cfg["workers"] == 3
    # The transfer-learning reference's spellings.
    cfg, show = parse("--data-dir", "data", "--device", "cpu", "--epochs", "1", "--batch-size", "8",
                      "--num-workers", "2", "--seed", "1337", "--print-model", "1", "--lr", "0.001",
                      "--weight-decay", "0.0001", "--freeze-backbone", "1", "--unfreeze-last", "0", "--amp", "0")
    assert (cfg["data_root"], cfg["batch_size"], cfg["workers"], cfg["seed"], show) == ("data", 8, 2, 1337, True)
    assert cfg["lr_backbone"] == cfg["lr_fc"] == 0.001 and cfg["weight_decay"] == 0.0001
    assert cfg["trainable"] == "head" and cfg["amp"] == "off"
    cfg, _ = parse("--freeze", "layer4", "--num_workers", "4", "--gpu", "1", "--experiment_name", "mine")
    assert (cfg["trainable"], cfg["workers"], cfg["device"], cfg["name"]) == ("layer4+head", 4, "cuda:1", "mine")
    cfg, _ = parse("--unfreeze-all", "1", "--lr", "0.01", "--lr_fc", "0.1")
    assert cfg["trainable"] == "all" and cfg["lr_backbone"] == 0.01 and cfg["lr_fc"] == 0.1  # the exact flag wins


@pytest.mark.parametrize("yaml_text,flags", [
    ("amp: 0\n", ["--amp", "0"]), ("amp: off\n", ["--amp", "off"]), ("amp: bf16\n", ["--amp", "bf16"]),
    ("stage_lrs: [1e-3, 1e-4]\n", ["--stage_lrs", "1e-3,1e-4"]),
    ("stage_lrs: 1e-3,1e-4\n", ["--stage_lrs", "1e-3,1e-4"]),
    ("lr: 1e-3\n", ["--lr", "1e-3"]), ("freeze: layer4\n", ["--freeze", "layer4"]),
    ("freeze_backbone: true\nlr_fc: 0.1\n", ["--freeze-backbone", "--lr_fc", "0.1"]),
    ("scratch: true\n", ["--scratch"]), ("gpu: 1\n", ["--gpu", "1"]), ("unfreeze-last: 1\n", ["--unfreeze-last", "1"]),
    ("training:\n  lr: 0.01\n  lr_fc: 0.1\n", ["--lr", "0.01", "--lr_fc", "0.1"]),
    ("lr: 0.01\nlr-fc: 0.1\n", ["--lr", "0.01", "--lr-fc", "0.1"]),  # the setting beats the shorthand, any spelling
    ("freeze: head\nunfreeze_all: true\n", ["--freeze", "head", "--unfreeze-all"]),
])
def test_a_config_file_takes_what_the_command_line_takes(tmp_path, yaml_text, flags):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    from_file = presets.resolve("r18_pretrain_main", config=str(path))
    from_flags, _ = parse("--exp", "r18_pretrain_main", *flags)
    assert from_file == from_flags
    assert from_flags != presets.resolve("r18_pretrain_main")  # each line really changed something


def test_config_file_values_known_answers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("amp: 0\nstage_lrs: [1e-3, 1e-4]\nlr: 3e-4\n")
    cfg = presets.resolve("cpu_smoke", config=str(path))
    assert cfg["amp"] == "off" and presets.parse_stage_lrs(cfg["stage_lrs"]) == [1e-3, 1e-4]
    assert cfg["lr_backbone"] == cfg["lr_fc"] == 3e-4
    path.write_text("stage_lrs: {head: 1}\n")
    with pytest.raises(errors.ConfigError, match="expected LRs from the head down: a list or comma-separated"):
        presets.resolve("cpu_smoke", config=str(path))


def test_help_is_one_entry_per_setting_with_its_meaning(capsys):
    with pytest.raises(SystemExit):
        train.get_args_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--lr_backbone LR_BACKBONE" in out and "(default: 0.0002)" in out
    assert "peak LR of every non-head parameter" in out  # the meaning presets.py documents
    assert "--batch-size BATCH_SIZE" not in out and "--batch_size BATCH_SIZE" in out  # hyphens: work, not listed
    for flag in ("--output_dir", "--scratch", "--workers", "--num_workers", "--config", "--print_model"):
        assert flag in out, flag
    for name in presets.PRESETS:
        assert name in out


def test_the_settings_page_is_generated_from_the_records():
    """docs/settings.md is settings_cli.settings_markdown() exactly: a setting added or changed without regenerating the
    page fails here."""
    with open(os.path.join(ROOT, "docs", "settings.md"), encoding="utf-8") as f:
        page = f.read()
    assert page == settings_cli.settings_markdown(), (
        "docs/settings.md is out of date: python -c \"from kit.settings import settings_cli as s; "
        "print(s.settings_markdown(), end='')\" > docs/settings.md")
    assert all(f"| `{key}` | {s.kind} |" in page for key, s in presets.SETTINGS.items())
