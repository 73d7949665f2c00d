"""Faults made to happen for real: SIGKILL and SIGTERM mid-run, exceptions and a full disk mid-save, NaN losses,
malicious and truncated checkpoints, corrupt images and bad flags. Tiny synthetic data, tiny images."""
import csv
import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import data_utils
import engine
import model_utils
import presets
import train_caltech101 as train
from conftest import ROOT

TINY = ["--exp", "cpu_smoke", "--img_size", "32", "--batch_size", "4", "--eval_batch_size", "16", "--workers", "1",
        "--epochs", "4", "--eval_every", "1", "--warmup_epochs", "1", "--deterministic", "true",
        "--progress", "false"]


def cli(data_root, out_dir, *extra):
    return [sys.executable, os.path.join(ROOT, "train_caltech101.py"), *TINY, "--data_root", data_root,
            "--out_dir", str(out_dir), *extra]


def epochs_logged(run_dir):
    try:
        with open(os.path.join(run_dir, "metrics.csv")) as f:
            return len(list(csv.DictReader(f)))
    except (OSError, csv.Error):
        return 0


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def run_until(cmd, run_dir, rows, sig):
    """Start a training process, wait until `rows` epochs are logged, then send it `sig`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 300
    while epochs_logged(run_dir) < rows:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def straight_run(prepared_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = subprocess.run(cli(prepared_root, out), capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return os.path.join(str(out), "cpu_smoke")


def test_sigkill_then_resume_gives_identical_weights(straight_run, prepared_root, tmp_path):
    run_dir = str(tmp_path / "cpu_smoke")
    code, _, _ = run_until(cli(prepared_root, tmp_path), run_dir, rows=2, sig=signal.SIGKILL)
    assert code == -signal.SIGKILL
    killed_at = load(os.path.join(run_dir, "last.pth"))["next_epoch"]
    assert 2 <= killed_at <= 4  # it really was cut short
    resumed = subprocess.run(cli(prepared_root, tmp_path, "--resume", "auto"), capture_output=True, text=True,
                             cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert f"continuing at epoch {killed_at}" in resumed.stdout
    assert_same_weights(load(os.path.join(straight_run, "last.pth"))["model"],
                        load(os.path.join(run_dir, "last.pth"))["model"])
    assert_same_weights(load(os.path.join(straight_run, "best.pth")), load(os.path.join(run_dir, "best.pth")))


def test_sigterm_saves_mid_run_and_resume_matches(straight_run, prepared_root, tmp_path):
    run_dir = str(tmp_path / "cpu_smoke")
    code, out, err = run_until(cli(prepared_root, tmp_path, "--epochs", "4"), run_dir, rows=1, sig=signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert "--resume auto" in out and "SIGTERM" in out
    state = load(os.path.join(run_dir, "last.pth"))
    assert (state["next_epoch"], state["next_step"]) < (5, 0)
    resumed = subprocess.run(cli(prepared_root, tmp_path, "--resume", "auto"), capture_output=True, text=True,
                             cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(load(os.path.join(straight_run, "last.pth"))["model"],
                        load(os.path.join(run_dir, "last.pth"))["model"])


def test_second_sigint_exits_at_once_leaving_a_loadable_checkpoint(prepared_root, tmp_path):
    run_dir = str(tmp_path / "cpu_smoke")
    proc = subprocess.Popen(cli(prepared_root, tmp_path, "--epochs", "50", "--save_every_steps", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    while epochs_logged(run_dir) < 1:
        assert proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in err
    state = load(os.path.join(run_dir, "last.pth"))  # whichever save was last completed, whole and loadable
    assert (state["next_epoch"], state["next_step"]) >= (1, 1) and "optimizer" in state
    assert not [f for f in os.listdir(run_dir) if ".tmp" in f]


def tiny_cfg(data_root, out_dir, **overrides):
    base = dict(data_root=data_root, out_dir=str(out_dir), img_size=32, batch_size=4, eval_batch_size=16, workers=1,
                epochs=1, warmup_epochs=0.5, progress=False)
    base.update(overrides)
    return presets.resolve("cpu_smoke", base)


@pytest.mark.parametrize("fault", ["exception", "enospc"])
def test_a_failed_save_keeps_the_previous_checkpoint(prepared_root, tmp_path, monkeypatch, fault):
    cfg = tiny_cfg(prepared_root, tmp_path)
    train.main(cfg)
    last = os.path.join(str(tmp_path), "cpu_smoke", "last.pth")
    before = open(last, "rb").read()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save({"half": torch.zeros(1000)}, f)  # some bytes reach the temporary file first
        if fault == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("power cut simulation")

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    more = dict(cfg, epochs=2, resume="auto")
    more.pop("exp")
    expected = (engine.TrainingError, "no space left on device") if fault == "enospc" else (RuntimeError, "power cut")
    with pytest.raises(expected[0], match=expected[1]):
        train.main(presets.resolve("cpu_smoke", more))
    assert open(last, "rb").read() == before
    assert not [f for f in os.listdir(os.path.dirname(last)) if ".tmp" in f]
    monkeypatch.undo()
    assert load(last)["next_epoch"] == 2


def nan_injecting_get_model(bad_steps):
    """get_model whose fc output becomes NaN on the given training forward calls (1-based)."""
    real = model_utils.get_model

    def get_model(*args, **kwargs):
        model = real(*args, **kwargs)
        calls = {"n": 0}

        def hook(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] in bad_steps:
                    return output * float("nan")
            return output
        model.fc.register_forward_hook(hook)
        return model
    return get_model


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_few_nan_losses_are_skipped_and_counted(prepared_root, tmp_path, monkeypatch, optimizer):
    # The very first step is one of them: a skipped first step must leave the optimizer state usable.
    monkeypatch.setattr(train.model_utils, "get_model", nan_injecting_get_model({1, 4}))
    result = train.main(tiny_cfg(prepared_root, tmp_path, epochs=2, max_bad_steps=3, optimizer=optimizer))
    assert sum(r["skipped_steps"] for r in result["rows"]) == 2
    state = load(os.path.join(result["out_dir"], "last.pth"))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert result["best_top1"] >= 0


def test_persistent_nan_stops_and_keeps_the_last_good_checkpoint(prepared_root, tmp_path, monkeypatch):
    monkeypatch.setattr(train.model_utils, "get_model", nan_injecting_get_model(set(range(4, 1000))))
    with pytest.raises(engine.TrainingError, match="3 non-finite losses in a row"):
        train.main(tiny_cfg(prepared_root, tmp_path, epochs=5, max_bad_steps=3))
    state = load(os.path.join(str(tmp_path), "cpu_smoke", "last.pth"))
    assert state["next_epoch"] == 2  # epoch 1 (3 good steps) is the last good state
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path, prepared_root):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": RunsCode(str(marker))}, evil)
    with pytest.raises(model_utils.ModelError, match="refused"):
        model_utils.load_state_dict_file(str(evil))
    for flag in ("--weights", "--resume"):
        result = subprocess.run(cli(prepared_root, tmp_path / "out", flag, str(evil)), capture_output=True,
                                text=True, cwd=ROOT)
        assert result.returncode != 0 and "refused" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_truncated_and_foreign_checkpoints_are_named(tmp_path, prepared_root):
    model = model_utils.get_model(num_classes=3)
    good = tmp_path / "good.pth"
    torch.save(model.state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(model_utils.ModelError, match="truncated.pth"):
        model_utils.load_state_dict_file(str(truncated))
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(model_utils.ModelError, match="notes.pth"):
        model_utils.load_state_dict_file(str(text))
    result = subprocess.run(cli(prepared_root, tmp_path / "out", "--resume", str(truncated)), capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode != 0 and "truncated.pth" in result.stderr and "Traceback" not in result.stderr


def test_prefixed_state_dicts_load_and_head_mismatch_is_explained(tmp_path):
    model = model_utils.get_model(num_classes=3)
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        path = tmp_path / "prefixed.pth"
        torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
        loaded = model_utils.load_trained(str(path), num_classes=3)
        assert torch.equal(loaded.fc.weight, model.fc.weight)
    imagenet = tmp_path / "imagenet.pth"
    torch.save(model_utils.torchvision.models.resnet18(num_classes=1000).state_dict(), imagenet)
    with pytest.raises(model_utils.ModelError, match="1000-class head.*--weights"):
        model_utils.load_trained(str(imagenet), num_classes=101)


def test_corrupt_image_reaching_the_loader_is_named(prepared_root, tmp_path):
    root = str(tmp_path / "root")
    shutil.copytree(prepared_root, root)
    files, _ = data_utils.read_split(root, "val")
    victim = os.path.join(root, data_utils.IMAGES_DIR, files[5])
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 3])
    with pytest.raises(data_utils.DataError, match=files[5]):
        loader = data_utils.build_loader(root, "val", 32, 4, torch.device("cpu"), workers=1)
        for _ in loader:
            pass


@pytest.mark.parametrize("args,expected", [
    (("--batch_size", "0"), "batch_size must be > 0"), (("--lr_backbone=-1e-3",), "lr_backbone must be >= 0"),
    (("--cutmix_alpha", "-1"), "cutmix_alpha must be >= 0"), (("--arch", "vgg16"), "invalid choice"),
    (("--epochs", "-2"), "epochs must be > 0"),
])
def test_bad_flags_fail_in_one_line(args, expected, prepared_root, tmp_path):
    result = subprocess.run(cli(prepared_root, tmp_path, *args), capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_bad_paths_fail_in_one_line(prepared_root, tmp_path):
    empty = tmp_path / "empty_root"
    empty.mkdir()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    broken_split = tmp_path / "broken_split"
    shutil.copytree(prepared_root, broken_split)
    os.remove(broken_split / data_utils.IMAGES_DIR / data_utils.read_split(prepared_root, "train")[0][0])
    cases = [(("--data_root", str(empty)), "download.py"),
             (("--data_root", str(broken_split)), "missing files"),
             (("--data_root", prepared_root, "--out_dir", str(blocker / "sub")), "cannot write to the output folder")]
    for args, expected in cases:
        cmd = cli(prepared_root, tmp_path / "out") + list(args)
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert result.returncode != 0 and expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_resume_into_a_different_architecture_is_refused(prepared_root, tmp_path):
    train.main(tiny_cfg(prepared_root, tmp_path))
    last = os.path.join(str(tmp_path), "cpu_smoke", "last.pth")
    result = subprocess.run(cli(prepared_root, tmp_path / "other", "--arch", "resnet34", "--resume", last),
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "resnet18" in result.stderr and "resnet34" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_mid_epoch_checkpoint_resumes_exactly(straight_run, prepared_root, tmp_path):
    """--save_every_steps: a checkpoint taken after step 1 of epoch 2 resumes to the straight run's weights."""
    first = tmp_path / "first"
    script = f"""
import shutil, sys
sys.path.insert(0, {ROOT!r})
import train_caltech101 as train
import checkpoint
real_save = checkpoint.save_atomic
def save_and_keep(obj, path):
    real_save(obj, path)
    if isinstance(obj, dict) and (obj.get("next_epoch"), obj.get("next_step")) == (2, 1):
        shutil.copyfile(path, {str(tmp_path / "mid.pth")!r})
checkpoint.save_atomic = save_and_keep
args = train.get_args_parser().parse_args(sys.argv[1:])
cfg = vars(args)
exp = cfg.pop("exp")
sys.exit(train.main(train.presets.resolve(exp, cfg))["exit_code"])
"""
    cmd = cli(prepared_root, first, "--save_every_steps", "1")
    result = subprocess.run([sys.executable, "-c", script, *cmd[2:]], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    # Saving every step changes nothing about the training itself.
    assert_same_weights(load(os.path.join(straight_run, "last.pth"))["model"],
                        load(os.path.join(str(first), "cpu_smoke", "last.pth"))["model"])
    mid = load(str(tmp_path / "mid.pth"))
    assert (mid["next_epoch"], mid["next_step"]) == (2, 1)
    resumed = subprocess.run(cli(prepared_root, tmp_path / "second", "--resume", str(tmp_path / "mid.pth")),
                             capture_output=True, text=True, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing at epoch 2 step 1" in resumed.stdout
    assert_same_weights(load(os.path.join(straight_run, "last.pth"))["model"],
                        load(os.path.join(str(tmp_path / "second"), "cpu_smoke", "last.pth"))["model"])
