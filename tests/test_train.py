"""train_caltech101, in-process: a run's outputs, the user snippet, the run-folder rules, resuming (settings from the
checkpoint, exact with every loader), the other kits' interfaces, and the fine-tuning tools end to end."""
import csv
import json
import os
import shutil
import signal

import pytest
import torch

import model_utils
import presets
import train_caltech101 as train
from conftest import one_line_error, run_cli, stop_at, stopped_run, tiny_argv, tiny_cfg
from kit.base import devices
from kit.data import sampling
from kit.settings import resolution
from kit.training import engine, runs, training


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_writes_every_output(trained_run, prepared_with_test):
    run_dir = trained_run["out_dir"]
    assert sorted(os.listdir(run_dir)) == ["best.pth", "best_loss.pth", "classes.txt", "config.json", "curves.png",
                                           "last.pth", "metrics.csv", "run.claim", "summary.json", "tb",
                                           "train_list.txt"]
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["split"]["train"] and config["world_size"] == 1 and config["epochs"] == 3
    assert open(os.path.join(run_dir, "train_list.txt")).read() == \
        open(os.path.join(prepared_with_test, "train.txt")).read()
    rows = list(csv.DictReader(open(os.path.join(run_dir, "metrics.csv"))))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run_dir, "tb")))
    best = load(os.path.join(run_dir, "best.pth"))
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in best)
    assert all(v.is_contiguous() for v in best.values())
    last = load(os.path.join(run_dir, "last.pth"))
    assert {"model", "optimizer", "scheduler", "scaler", "early_stopping", "ranks", "loader", "config",
            "split"} <= set(last)
    assert last["next_epoch"] == 4 and last["finished"] and not [f for f in os.listdir(run_dir) if ".tmp" in f]
    assert "resume" not in config  # how the process was launched is not part of the run


def test_best_checkpoints_are_the_best_epochs(trained_run, prepared_with_test):
    """best.pth is the epoch with the highest val top-1, best_loss.pth the one with the lowest val loss: each file,
    evaluated again, gives that epoch's logged figures exactly."""
    import data_utils

    rows = trained_run["rows"]
    by_top1 = max(rows, key=lambda r: r["val_top1"])  # first of equals, as the monitor keeps it
    by_loss = min(rows, key=lambda r: r["val_loss"])
    amp_dtype, _ = devices.resolve_amp("auto", torch.device("cpu"))  # as the run chose: bf16 only where native
    val = data_utils.build_loader(prepared_with_test, "val", 8, torch.device("cpu"),
                                  sampling.DataSettings(img_size=32, dtype=amp_dtype or torch.float32, workers=1))
    for name, row in (("best.pth", by_top1), ("best_loss.pth", by_loss)):
        model = model_utils.load_trained(os.path.join(trained_run["out_dir"], name), 3)
        m = engine.evaluate(model.to(memory_format=torch.channels_last), val, 3, amp_dtype)
        assert m["val_loss"] == row["val_loss"] and m["val_top1"] == row["val_top1"], name
    summary = json.load(open(os.path.join(trained_run["out_dir"], "summary.json")))
    assert summary["best"]["epoch"] == by_top1["epoch"]


def test_user_snippet_loads_the_released_weights(trained_run):
    path = os.path.join(trained_run["out_dir"], "best.pth")
    scope = {}
    exec("import torch, model_utils\n"  # the README's snippet, verbatim apart from the path and class count
         "model = model_utils.get_model(num_classes=3, pretrained=False)\n"
         f"model.load_state_dict(torch.load({path!r}, map_location='cpu'))\n"
         "model.eval()\n", scope)
    assert torch.equal(scope["model"].fc.weight, load(path)["fc.weight"])


def test_train_val_test_table(trained_run, prepared_with_test):
    """summary.json holds best.pth's figures on train (through the val transform), val and test; each equals
    evaluate.py's evaluation of the same file."""
    import evaluate

    summary = json.load(open(os.path.join(trained_run["out_dir"], "summary.json")))
    assert set(summary["splits"]) == {"train", "val", "test"}
    assert summary["splits"]["train"]["images"] == 12 and summary["splits"]["test"]["images"] == 6
    for split in ("val", "test"):
        report = evaluate.main(evaluate.get_args_parser().parse_args(
            ["--checkpoint", trained_run["out_dir"], "--split", split, "--out_dir",
             os.path.join(trained_run["out_dir"], "..", f"check_{split}")]))
        assert report["top1"] == summary["splits"][split]["top1"]
        assert report["mean_class_acc"] == summary["splits"][split]["mean_class_acc"]
    table = evaluate.compare_runs([trained_run["out_dir"]]).splitlines()
    assert "train top-1" in table[0] and "test top-1" in table[0] and "best epoch" in table[0]
    assert f"{summary['splits']['test']['top1']:.4f}" in table[2]
    # Time to accuracy, from metrics.csv read here: each evaluated value's first arrival, and the best epoch's time
    with open(os.path.join(trained_run["out_dir"], "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["val_top1"]]
    expected, best_so_far = [], -1.0
    for r in rows:
        if float(r["val_top1"]) > best_so_far:
            best_so_far = float(r["val_top1"])
            expected.append((int(r["epoch"]), float(r["val_top1"])))
    assert [(r["epoch"], r["val_top1"]) for r in summary["time_to_val_top1"]] == expected
    head = [c.strip() for c in table[0].strip("|").split("|")]
    to_best = float(next(r["wall_time_s"] for r in rows if int(r["epoch"]) == summary["best"]["epoch"]))
    assert [c.strip() for c in table[2].strip("|").split("|")][head.index("time to best")] == f"{to_best / 60:.1f} min"


@pytest.mark.slow
def test_a_new_run_never_reuses_a_run_folder(prepared_root, tmp_path):
    first = training.main(tiny_cfg(prepared_root, tmp_path, epochs=1))
    config = os.path.join(first["out_dir"], "config.json")
    before = open(config, "rb").read()
    second = training.main(tiny_cfg(prepared_root, tmp_path, epochs=1))
    assert first["out_dir"].endswith("cpu_smoke") and second["out_dir"].endswith("cpu_smoke_2")
    assert open(config, "rb").read() == before


@pytest.mark.parametrize("argv,expected", [(("--data_root", "/nonexistent/root"), "download.py"),
                                           (("--amp", "fp16", "--device", "cpu"), "fp16 needs CUDA"),
                                           (("--weights", "/nonexistent.pth"), "does not exist"),
                                           (("--loader", "dali", "--workers", "0"), "at least 1 thread"),
                                           (("--batch_size", "0"), "batch_size must be > 0")])
def test_a_run_that_fails_at_start_up_writes_nothing(prepared_root, tmp_path, capfd, argv, expected):
    training.main(tiny_cfg(prepared_root, tmp_path, epochs=1))
    run_dir = tmp_path / "cpu_smoke"
    before = {name: (run_dir / name).read_bytes() for name in ("config.json", "last.pth", "metrics.csv")}
    code, _, err = run_cli(train.cli, tiny_argv(prepared_root, tmp_path, *argv), capfd)
    one_line_error(code, err, expected)
    assert sorted(os.listdir(tmp_path)) == ["cpu_smoke"]  # no cpu_smoke_2 either
    assert all((run_dir / name).read_bytes() == data for name, data in before.items())


# Every stateful piece of a run at once: MixUp and CutMix draws, EMA, early stopping's best value and counter
# (min_delta 10: only the first evaluation improves, so the counter runs), gradual unfreezing (head only in epoch 1,
# everything from epoch 2), layer-wise LRs, label smoothing, progressive resizing (32, 36, 40 px: the stop in epoch 2
# is mid-ramp), the class-balanced sampler.
EVERYTHING = dict(mixup_alpha=0.2, cutmix_alpha=1.0, ema_decay=0.9, early_stop_patience=5, min_delta=10.0,
                  trainable="head", freeze_epochs=1, layer_decay=0.7, label_smoothing=0.1, epochs=3, img_size=40,
                  img_size_start=32, img_size_ramp="0,3", img_size_step=4, class_balance="sampler")


def same_optimizer_state(a, b):
    return a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys() and all(
        same_weights(a["state"][k], b["state"][k]) for k in a["state"])


def without_times(row):
    return {k: v for k, v in row.items() if not k.endswith(("_time_s", "_per_s"))}


@pytest.mark.parametrize("loader,cache,at", [("torch", False, 5), ("dali", False, 5), ("dali", True, 5),
                                             ("dali", False, 2)])
@pytest.mark.slow
def test_a_mid_epoch_stop_resumes_to_the_same_state(prepared_root, tmp_path, monkeypatch, loader, cache, at):
    """Every loader, every stateful piece on: stop inside epoch 2 (the first that trains everything; at=2: inside
    the frozen epoch 1), resume, end bit-identical to an uninterrupted run (weights, EMA weights, optimizer state,
    early-stopping state), and metrics.csv the same, times aside: the resumed epoch reports the whole epoch. The
    torch loader's crops come from the plan, not from worker RNGs."""
    kw = dict(EVERYTHING, loader=loader, cache=cache, deterministic=True, workers=2 if loader == "torch" else 1)
    assert resolution.train_sizes(tiny_cfg(prepared_root, tmp_path, **kw)) == [32, 36, 40]
    straight = training.main(tiny_cfg(prepared_root, tmp_path / "straight", **kw))
    stopped = stopped_run(tiny_cfg(prepared_root, tmp_path / "halves", **kw), at=at, monkeypatch=monkeypatch)
    assert stopped["exit_code"] == 128 + signal.SIGTERM
    state = load(os.path.join(stopped["out_dir"], "last.pth"))
    assert (state["next_epoch"], state["next_step"]) == (at // 3 + 1, at % 3)  # 3 steps per epoch
    resumed = training.main(tiny_cfg(prepared_root, tmp_path / "halves", resume="auto", **kw))
    assert resumed["out_dir"] == stopped["out_dir"]
    a, b = (load(os.path.join(r["out_dir"], "last.pth")) for r in (straight, resumed))
    assert same_weights(a["model"], b["model"])
    assert same_weights(a["ema"]["module"], b["ema"]["module"]) and a["ema"]["updates"] == b["ema"]["updates"]
    assert same_optimizer_state(a["optimizer"], b["optimizer"])
    assert a["early_stopping"] == b["early_stopping"] and a["scheduler"] == b["scheduler"]
    rows = [[without_times(r) for r in runs.read_metrics(x["out_dir"])] for x in (straight, resumed)]
    assert rows[0] == rows[1] and len(rows[0]) == 3


@pytest.mark.slow
def test_resume_takes_the_runs_settings_from_its_checkpoint(prepared_root, tmp_path, monkeypatch, capfd):
    """A run started with --img_size 48 --epochs 3, then resumed with --resume auto alone, goes on at 48 px for 3
    epochs; a run-defining flag that differs is refused; an operational one is applied with a note."""
    first = tiny_argv(prepared_root, tmp_path, "--img_size", "48", epochs=3)
    stop_at(4, monkeypatch)
    code, out, _ = run_cli(train.cli, first, capfd)
    monkeypatch.undo()
    assert code == 128 + signal.SIGTERM
    command = next(line.strip() for line in out.splitlines() if line.strip().startswith("python train_caltech101"))
    assert "--img_size 48" in command and f"--out_dir {tmp_path}" in command and "--epochs 3" in command
    bare = ["--exp", "cpu_smoke", "--out_dir", str(tmp_path), "--resume", "auto"]
    code, _, err = run_cli(train.cli, bare + ["--img_size", "64"], capfd)
    one_line_error(code, err, "img_size was 48 in this run")
    code, out, _ = run_cli(train.cli, bare + ["--eval_every", "2"], capfd)
    assert code == 0 and "note (resume): eval_every 1 -> 2" in out
    saved = json.load(open(tmp_path / "cpu_smoke" / "config.json"))
    assert (saved["img_size"], saved["epochs"], saved["eval_every"]) == (48, 3, 2)
    rows = list(csv.DictReader(open(tmp_path / "cpu_smoke" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_resume_refuses_a_changed_split(prepared_root, tmp_path, capfd, monkeypatch):
    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    stopped_run(tiny_cfg(str(root), tmp_path / "runs", epochs=2), at=2, monkeypatch=monkeypatch)  # unfinished
    lines = (root / "train.txt").read_text().splitlines()
    (root / "train.txt").write_text("\n".join(lines[1:]) + "\n")  # a re-split, as download.py --force would
    code, _, err = run_cli(train.cli, ["--out_dir", str(tmp_path / "runs"), "--exp", "cpu_smoke", "--resume", "auto"],
                           capfd)
    one_line_error(code, err, "not the ones this run was trained on")


def test_resume_auto_without_a_checkpoint_starts_fresh(prepared_root, tmp_path, capfd):
    code, out, _ = run_cli(train.cli, tiny_argv(prepared_root, tmp_path, "--resume", "auto", epochs=1), capfd)
    assert code == 0 and "no last.pth of cpu_smoke" in out and "starting a fresh run" in out
    assert os.path.isfile(tmp_path / "cpu_smoke" / "best.pth")


def test_warmup_longer_than_the_run_is_flagged(prepared_root, tmp_path, capfd):
    code, out, err = run_cli(train.cli, tiny_argv(prepared_root, tmp_path, "--warmup_epochs", "2", epochs=1), capfd)
    assert code == 0 and "never reaches its peak" in err


@pytest.mark.slow
def test_the_report_kits_readme_command(prepared_root, tmp_path, capfd):
    """Its quick start, verbatim (trailing slashes, --output_dir), plus --scratch and size flags for a CPU."""
    argv = ["--exp", "r18_pretrain_main", "--data_root", prepared_root + "/", "--output_dir", str(tmp_path) + "/",
            "--scratch", "--epochs", "1", "--img_size", "32", "--batch_size", "4", "--workers", "1",
            "--progress", "false", "--eval_batch_size", "8", "--device", "cpu"]
    code, out, _ = run_cli(train.cli, argv, capfd)
    assert code == 0, out
    config = json.load(open(tmp_path / "r18_pretrain_main" / "config.json"))
    assert config["pretrained"] is False and config["out_dir"] == str(tmp_path) + "/"


def test_print_model_shows_both_heads_and_what_trains(prepared_root, capfd):
    code, out, _ = run_cli(train.cli, ["--data_root", prepared_root, "--print-model", "1", "--freeze", "layer4"],
                           capfd)
    assert code == 0
    assert "Linear(in_features=512, out_features=1000" in out and "Linear(in_features=512, out_features=3" in out
    assert "head, layer4 train" in out and "trainable=layer4+head" in out


@pytest.mark.slow
def test_compiled_run_releases_plain_weights(prepared_root, tmp_path, monkeypatch):
    # The kit's job is what happens around torch.compile (prefix-free checkpoints, static shapes); the backend is
    # swapped for the eager one so the test does not pay for Inductor's code generation.
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="eager"))
    result = training.main(tiny_cfg(prepared_root, tmp_path, compile=True, epochs=1))
    for name in ("best.pth", "last.pth"):
        state = load(os.path.join(result["out_dir"], name))
        state = state.get("model", state)
        assert not any(k.startswith("_orig_mod.") for k in state)
        model_utils.get_model(num_classes=3).load_state_dict(state)
    assert result["rows"][0]["train_time_s"] > 0
    assert len(list(csv.DictReader(open(os.path.join(result["out_dir"], "metrics.csv"))))) == 1


@pytest.mark.slow
def test_pretrained_path_runs_offline(prepared_root, tmp_path, seeded_torch_home):
    result = training.main(tiny_cfg(prepared_root, tmp_path, pretrained=True, epochs=1, trainable="layer4+head",
                                 amp="off"))
    best = load(os.path.join(result["out_dir"], "best.pth"))
    assert torch.equal(best["conv1.weight"], seeded_torch_home["conv1.weight"])  # frozen and ImageNet-initialised
    assert torch.equal(best["bn1.running_mean"], seeded_torch_home["bn1.running_mean"])
    assert not torch.equal(best["layer4.0.conv1.weight"], seeded_torch_home["layer4.0.conv1.weight"])


@pytest.mark.slow
def test_ema_run_reports_and_releases_the_average(prepared_root, tmp_path, monkeypatch):
    cfg = tiny_cfg(prepared_root, tmp_path / "a", epochs=2, ema_decay=0.5, deterministic=True)
    result = training.main(cfg)
    rows = result["rows"]
    assert all("raw_val_top1" in r for r in rows)
    last = load(os.path.join(result["out_dir"], "last.pth"))
    assert last["ema"]["updates"] == 6  # 3 steps per epoch
    best = load(os.path.join(result["out_dir"], "best.pth"))
    assert same_weights(best, last["ema"]["module"]) or result["best_epoch"] == 1
    stopped = stopped_run(tiny_cfg(prepared_root, tmp_path / "b", epochs=2, ema_decay=0.5, deterministic=True), 4,
                          monkeypatch)
    assert stopped["exit_code"] == 128 + signal.SIGTERM
    resumed = training.main(tiny_cfg(prepared_root, tmp_path / "b", epochs=2, ema_decay=0.5, deterministic=True,
                                  resume="auto"))
    again = load(os.path.join(resumed["out_dir"], "last.pth"))
    assert same_weights(again["ema"]["module"], last["ema"]["module"])


@pytest.mark.slow
def test_early_stopping_stops_where_an_uninterrupted_run_stops(prepared_root, tmp_path, monkeypatch):
    """monitor val_loss with a min_delta no epoch can beat: the first evaluation is the best, patience 2 stops
    after epoch 3, also across a resume after epoch 2."""
    kw = dict(epochs=6, monitor="val_loss", early_stop_patience=2, min_delta=100.0, deterministic=True)
    straight = training.main(tiny_cfg(prepared_root, tmp_path / "a", **kw))
    assert [r["epoch"] for r in straight["rows"]] == [1, 2, 3] and straight["best_epoch"] == 1
    summary = straight["summary"]
    assert "did not improve by more than 100.0 for 2 evaluations" in summary["early_stop"]
    stopped = stopped_run(tiny_cfg(prepared_root, tmp_path / "b", **kw), 6, monkeypatch)
    assert load(os.path.join(stopped["out_dir"], "last.pth"))["early_stopping"]["wait"] == 1
    resumed = training.main(tiny_cfg(prepared_root, tmp_path / "b", resume="auto", **kw))
    assert [r["epoch"] for r in resumed["rows"]] == [1, 2, 3]


@pytest.mark.slow
def test_gradual_unfreezing_switches_and_resumes_exactly(prepared_root, tmp_path, monkeypatch, capfd):
    kw = dict(epochs=3, trainable="head", freeze_epochs=1, deterministic=True)
    code, out, _ = run_cli(train.cli, tiny_argv(prepared_root, tmp_path / "c", "--freeze", "head", "--freeze_epochs",
                                                "1", epochs=2), capfd)
    assert code == 0 and "epoch 2: unfreezing every stage" in out
    straight = training.main(tiny_cfg(prepared_root, tmp_path / "a", **kw))
    # The logged LR is the next step's: after epoch 1 the backbone takes its first warmup step (2 warmup steps,
    # peak 0.002), while the head is past its own warmup.
    assert straight["rows"][0]["lr_layer1_decay"] == pytest.approx(0.001)
    assert straight["rows"][1]["lr_layer1_decay"] < 0.002 and straight["rows"][0]["lr_head_decay"] > 0.001
    stopped = stopped_run(tiny_cfg(prepared_root, tmp_path / "b", **kw), 3, monkeypatch)  # at the unfreeze point
    assert load(os.path.join(stopped["out_dir"], "last.pth"))["next_epoch"] == 2
    resumed = training.main(tiny_cfg(prepared_root, tmp_path / "b", resume="auto", **kw))
    assert same_weights(load(os.path.join(straight["out_dir"], "last.pth"))["model"],
                        load(os.path.join(resumed["out_dir"], "last.pth"))["model"])
    first = load(os.path.join(straight["out_dir"], "best.pth"))
    assert not torch.equal(first["conv1.weight"], model_utils.get_model(3).conv1.weight)  # trained after unfreeze


def test_layer_wise_lrs_are_printed_per_group(prepared_root, tmp_path, capfd):
    code, out, _ = run_cli(train.cli, tiny_argv(prepared_root, tmp_path, "--stage_lrs", "1e-3,1e-4,1e-5,1e-6",
                                                epochs=1), capfd)
    assert code == 0
    for name, lr in (("head_decay", "0.001"), ("layer4_decay", "0.0001"), ("layer3_decay", "1e-05"),
                     ("layer2_decay", "1e-06"), ("stem_decay", "1e-06")):
        assert f"group {name}:" in out and f"peak lr {lr}" in out.split(f"group {name}:")[1].splitlines()[0]


def test_help_lists_settings_with_meanings(capfd):
    code, out, _ = run_cli(train.cli, ["--help"], capfd)
    assert code == 0 and "--lr_backbone" in out and "(default: 0.0002)" in out
    for name in presets.PRESETS:
        assert name in out


def test_a_last_step_of_one_image_is_left_out_at_small_sizes(prepared_root, tmp_path, capfd):
    """12 train images in batches of 11 at 32 px: the last step would hold one image, and ResNet's last stage is
    1x1 there, which BatchNorm refuses to train on (one value per channel). The step is left out and said."""
    code, out, err = run_cli(train.cli, tiny_argv(prepared_root, tmp_path, "--batch_size", "11", epochs=1), capfd)
    assert code == 0, err
    assert "each epoch leaves out 1 of its 12 train draws" in out
    assert "1 steps/epoch" in out
