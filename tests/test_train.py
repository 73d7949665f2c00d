"""train_caltech101: end-to-end runs on the synthetic split, outputs, the user snippet, the CLI, AMP + layout."""
import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import augment
import checkpoint
import data_utils
import engine
import model_utils
import presets
import train_caltech101 as train
from conftest import ROOT

CPU = torch.device("cpu")


def tiny_cfg(data_root, out_dir, **overrides):
    base = dict(data_root=data_root, out_dir=str(out_dir), img_size=32, epochs=2, batch_size=4, eval_batch_size=8,
                workers=1, device="cpu", amp="bf16", warmup_epochs=0.5, pretrained=False, log_every=2)
    base.update(overrides)
    return presets.resolve("r18_pretrain_lowwd_mix02", base)


@pytest.fixture(scope="module")
def finished_run(prepared_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = tiny_cfg(prepared_root, out)
    result = train.main(cfg)
    return cfg, result


def test_two_epoch_run_writes_every_output(finished_run):
    cfg, result = finished_run
    run_dir = result["out_dir"]
    assert sorted(os.listdir(run_dir)) == ["best.pth", "config.json", "curves.png", "last.pth", "metrics.csv", "tb"]
    assert json.load(open(os.path.join(run_dir, "config.json"))) == cfg
    rows = list(csv.DictReader(open(os.path.join(run_dir, "metrics.csv"))))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for col in ("train_loss", "train_acc", "train_images_per_s", "val_top1", "val_top5", "val_mean_class_acc"):
        assert all(float(r[col]) >= 0 for r in rows), col
    assert float(rows[1]["val_top5"]) == 1.0  # 3 classes: the top-5 always holds the answer
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run_dir, "tb")))
    best = torch.load(os.path.join(run_dir, "best.pth"), map_location="cpu", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in best)
    assert all(v.is_contiguous() for v in best.values())
    last = torch.load(os.path.join(run_dir, "last.pth"), map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "best_top1", "rng"} <= set(last)
    assert last["epoch"] == 2 and not [f for f in os.listdir(run_dir) if ".tmp" in f]


def test_user_snippet_reproduces_the_saved_model(finished_run, prepared_root):
    cfg, result = finished_run
    path = os.path.join(result["out_dir"], "best.pth")
    # Verbatim user code (with our class count), in a fresh interpreter.
    code = ("import sys, torch; sys.path.insert(0, %r); import model_utils; "
            "model = model_utils.get_model(num_classes=3, pretrained=False); "
            "model.load_state_dict(torch.load(%r, map_location='cpu')); model.eval(); print('ok')") % (ROOT, path)
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"
    model = model_utils.get_model(num_classes=3)
    model.load_state_dict(torch.load(path, map_location="cpu"))
    model = model.to(memory_format=torch.channels_last)
    val = data_utils.build_loader(prepared_root, "val", 32, 8, CPU, dtype=torch.bfloat16, workers=1)
    metrics = engine.evaluate(model, val, 3, torch.bfloat16)
    best_row = result["rows"][result["best_epoch"] - 1]
    assert metrics["val_top1"] == best_row["val_top1"]
    assert metrics["val_loss"] == pytest.approx(best_row["val_loss"], rel=1e-6)


def test_resume_continues_from_last(finished_run):
    cfg, result = finished_run
    more = dict(cfg, epochs=3, resume="auto")
    more.pop("exp")
    resumed = train.main(presets.resolve("r18_pretrain_lowwd_mix02", more))
    assert [r["epoch"] for r in resumed["rows"]] == [1, 2, 3]
    assert resumed["rows"][0] == result["rows"][0]


def test_pretrained_path_runs_offline(prepared_root, tmp_path, seeded_torch_home):
    cfg = tiny_cfg(prepared_root, tmp_path, pretrained=True, epochs=1, freeze="layer4", amp="off")
    result = train.main(cfg)
    best = torch.load(os.path.join(result["out_dir"], "best.pth"), weights_only=True)
    assert torch.equal(best["conv1.weight"], seeded_torch_home["conv1.weight"])  # frozen and ImageNet-initialised
    assert torch.equal(best["bn1.running_mean"], seeded_torch_home["bn1.running_mean"])
    assert not torch.equal(best["layer4.0.conv1.weight"], seeded_torch_home["layer4.0.conv1.weight"])


def test_step_runs_channels_last_under_bf16_autocast(prepared_root):
    cfg = tiny_cfg(prepared_root, "unused")
    model = model_utils.get_model(num_classes=3).to(memory_format=torch.channels_last)
    seen = []
    model.conv1.register_forward_hook(lambda m, inp, out: seen.append(
        (inp[0].is_contiguous(memory_format=torch.channels_last), torch.is_autocast_enabled("cpu"),
         torch.get_autocast_dtype("cpu"), out.dtype)))
    groups = model_utils.param_groups(model, 1e-3, 1e-3, 0.0)
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    loader = data_utils.build_loader(prepared_root, "train", 32, 4, CPU, dtype=torch.bfloat16, workers=1)
    stats = engine.train_one_epoch(model, loader, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                                  augment.MixupCutmix(3, 0.2, 1.0, seed=0), torch.bfloat16, cfg, 1)
    assert seen and all(s == (True, True, torch.bfloat16, torch.bfloat16) for s in seen)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert stats["train_images_per_s"] > 0 and torch.isfinite(torch.tensor(stats["train_loss"]))


def test_schedule_warms_up_then_decays():
    f = engine.lr_lambda(total_steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.0)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_caltech101.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_flags_beat_the_preset(prepared_root, tmp_path):
    result = run_cli("--exp", "cpu_smoke", "--data_root", prepared_root, "--out_dir", str(tmp_path),
                     "--epochs", "1", "--img_size", "32", "--batch_size", "4", "--workers", "1", "--lr_fc", "0.05",
                     "--loader", "torch", "--channels_last", "false")
    assert result.returncode == 0, result.stderr
    cfg = json.load(open(tmp_path / "cpu_smoke" / "config.json"))
    assert (cfg["epochs"], cfg["lr_fc"], cfg["loader"], cfg["channels_last"]) == (1, 0.05, "torch", False)
    assert cfg["lr_backbone"] == presets.PRESETS["cpu_smoke"]["lr_backbone"]
    assert "steps/epoch" in result.stdout and "peak lr 0.05" in result.stdout


@pytest.mark.parametrize("args,expected", [
    (("--exp", "nope"), "r18_pretrain_lowwd_mix02"), (("--epochs", "0"), "epochs must be > 0"),
    (("--amp", "fp8"), "choose from"), (("--img_size", "8"), "img_size must be >= 32"),
    (("--data_root", "/nonexistent/root"), "download.py"),
])
def test_cli_errors_are_one_line(args, expected, tmp_path):
    result = run_cli("--exp", "cpu_smoke", "--out_dir", str(tmp_path), *args) if args[0] != "--exp" else run_cli(*args)
    assert result.returncode != 0
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_help_lists_flags_defaults_and_presets():
    out = run_cli("--help").stdout
    assert "--lr_backbone" in out and "(default: 0.0002)" in out
    for name in presets.PRESETS:
        assert name in out


def test_cached_run_evaluates_as_dali_does_and_resumes_exactly(prepared_root, tmp_path):
    import evaluate

    straight = train.main(tiny_cfg(prepared_root, tmp_path / "straight", cache=True, deterministic=True))
    # evaluate.py reads val through DALI: the cache's val tensors are DALI's, so the top-1 is the run's own.
    report = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--checkpoint", os.path.join(straight["out_dir"], "last.pth")]))
    assert report["top1"] == straight["rows"][-1]["val_top1"]

    class StopAtOnce(checkpoint.GracefulStop):  # as if SIGTERM arrived during the first step
        signum = property(lambda self: signal.SIGTERM, lambda self, value: None)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "GracefulStop", StopAtOnce)
        stopped = train.main(tiny_cfg(prepared_root, tmp_path / "halves", cache=True, deterministic=True))
    assert stopped["exit_code"] == 128 + signal.SIGTERM  # stopped after epoch 1, step 1
    resumed = train.main(tiny_cfg(prepared_root, tmp_path / "halves", cache=True, deterministic=True, resume="auto"))
    a = torch.load(os.path.join(straight["out_dir"], "last.pth"), weights_only=True)["model"]
    b = torch.load(os.path.join(resumed["out_dir"], "last.pth"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_device_reads_between_log_points(prepared_root, monkeypatch):
    # Every way a tensor's value can reach the host, counted: the count must not grow with the number of steps.
    cfg = tiny_cfg(prepared_root, "unused", log_every=10 ** 6, progress=False)
    batches = list(data_utils.build_loader(prepared_root, "train", 32, 4, CPU, dtype=torch.bfloat16, workers=1))
    reads = []
    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (
            reads.append(_n), _o(self, *a, **k))[1])

    def count(steps):
        model = model_utils.get_model(num_classes=3).to(memory_format=torch.channels_last)
        optimizer = engine.build_optimizer(model_utils.param_groups(model, 1e-3, 1e-3, 0.0), cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        loader = (batches * 4)[:steps]
        reads.clear()
        engine.train_one_epoch(model, loader, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                              augment.MixupCutmix(3, 0.2, 1.0, seed=0), torch.bfloat16, cfg, 1)
        return list(reads)

    assert count(2) == count(7)  # only the end-of-epoch reads (one log point in both)


def test_compiled_run_releases_plain_weights(prepared_root, tmp_path):
    result = train.main(tiny_cfg(prepared_root, tmp_path, compile=True, epochs=1, amp="off"))
    best = torch.load(os.path.join(result["out_dir"], "best.pth"), weights_only=True)
    last = torch.load(os.path.join(result["out_dir"], "last.pth"), weights_only=True)
    assert not any("_orig_mod" in k for k in list(best) + list(last["model"]))
    model = model_utils.get_model(num_classes=3)
    model.load_state_dict(best)
    assert torch.equal(model.fc.weight, last["model"]["fc.weight"])
