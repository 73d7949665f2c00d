"""Faults made to happen for real: SIGKILL, SIGTERM inside an epoch, a double Ctrl-C (through the real CLI in a
subprocess), failed and disk-full saves of last.pth and best.pth (fsync observed), malicious and truncated
checkpoints, corrupt images, and one-line errors for every bad input."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import download
import evaluate
import model_utils
import predict
import train_caltech101 as train
from conftest import ROOT, one_line_error, run_cli, stopped_run, tiny_argv, tiny_cfg
from kit.base import errors
from kit.data import splits
from kit.training import checkpoint, runs, training

# Every stateful piece on (MixUp/CutMix, EMA, early stopping, gradual unfreezing at epoch 2, layer-wise LRs, label
# smoothing), as in test_train.EVERYTHING.
EVERYTHING = dict(mixup_alpha=0.2, cutmix_alpha=1.0, ema_decay=0.9, early_stop_patience=5, min_delta=10.0,
                  trainable="head", freeze_epochs=1, layer_decay=0.7, label_smoothing=0.1)
# One image per step: 12 steps per epoch, so a signal sent right after a step's checkpoint lands inside the epoch.
SLOW = ["--deterministic", "true", "--save_every_steps", "1", "--batch_size", "1", "--img_size", "64",
        *[part for key, value in EVERYTHING.items() for part in (f"--{key}", str(value))]]


def cli_cmd(data_root, out_dir, *extra, epochs=3):
    return [sys.executable, os.path.join(ROOT, "train_caltech101.py"), *tiny_argv(data_root, out_dir, *extra,
                                                                                   epochs=epochs)]


def resume_cmd(out_dir):
    """What a requeue script runs: the settings come from the run's own last.pth."""
    return [sys.executable, os.path.join(ROOT, "train_caltech101.py"), "--exp", "cpu_smoke", "--out_dir",
            str(out_dir), "--resume", "auto"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_training_state(run_a, run_b):
    """Weights, EMA weights, optimizer moments and steps, early-stopping state and metrics (times aside)."""
    a, b = (load(os.path.join(run, "last.pth")) for run in (run_a, run_b))
    rows = [[{k: v for k, v in r.items() if not k.endswith(("_time_s", "_per_s"))} for r in
             runs.read_metrics(run)] for run in (run_a, run_b)]
    moments_a, moments_b = a["optimizer"]["state"], b["optimizer"]["state"]
    return (same_weights(a["model"], b["model"]) and same_weights(a["ema"]["module"], b["ema"]["module"])
            and a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
            and all(same_weights(moments_a[k], moments_b[k]) for k in moments_a)
            and a["early_stopping"] == b["early_stopping"] and rows[0] == rows[1])


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def position(run_dir):
    try:
        state = load(os.path.join(run_dir, "last.pth"))
    except (OSError, RuntimeError, EOFError, model_utils.pickle.UnpicklingError):
        return None
    return state["next_epoch"], state["next_step"]


@pytest.fixture(scope="module")
def straight_run(prepared_root, module_tmp):
    out = module_tmp / "straight"
    result = training.main(tiny_cfg(prepared_root, out, epochs=3, deterministic=True, batch_size=1, img_size=64,
                                 **EVERYTHING))
    return result["out_dir"]


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_weights(straight_run, prepared_root, tmp_path):
    run_dir = str(tmp_path / "cpu_smoke")
    proc = subprocess.Popen(cli_cmd(prepared_root, tmp_path, *SLOW), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for(lambda: (position(run_dir) or (0, 0)) >= (2, 3), proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = position(run_dir)
    assert (2, 3) <= killed_at < (4, 0)  # it really was cut short
    resumed = subprocess.run(resume_cmd(tmp_path),
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"continuing at epoch {killed_at[0]} step {killed_at[1]}" in resumed.stdout
    assert same_training_state(straight_run, run_dir)


@pytest.mark.slow
def test_sigterm_inside_an_epoch_saves_that_step(straight_run, prepared_root, tmp_path):
    """The signal arrives while a step of epoch 2 runs (seen through the per-step checkpoints): the run finishes
    that step, saves it (next_step > 0), prints the resume command and exits 143; the resume ends as the
    uninterrupted run."""
    run_dir = str(tmp_path / "cpu_smoke")
    proc = subprocess.Popen(cli_cmd(prepared_root, tmp_path, *SLOW), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for(lambda: (position(run_dir) or (0, 0)) >= (2, 3), proc)  # 12 steps an epoch: well inside epoch 2
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: state saved" in out and "--resume" in out
    state = load(os.path.join(run_dir, "last.pth"))
    assert state["next_epoch"] == 2 and 3 <= state["next_step"] < 12, state["next_step"]
    resumed = subprocess.run(resume_cmd(tmp_path),
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert same_training_state(straight_run, run_dir)


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_and_keeps_the_checkpoint(prepared_root, tmp_path):
    """The second Ctrl-C is sent once the first one's message is out, while the step it lets finish is still
    running (224 px, batch 8: about a second a step here): no save completes, the process exits 130 with one line
    (not the abort a DALI pipeline torn down mid-run gives), and last.pth is byte for byte the one written before."""
    run_dir, err_path = tmp_path / "cpu_smoke", tmp_path / "stderr.txt"
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen(cli_cmd(prepared_root, tmp_path, "--img_size", "224", "--batch_size", "8",
                                        epochs=50), stdout=subprocess.DEVNULL, stderr=err_file, cwd=ROOT)
        wait_for(lambda: position(str(run_dir)) == (2, 0), proc)
        before = (run_dir / "last.pth").read_bytes()
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "SIGINT: stopping" in err_path.read_text(), proc)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    err = err_path.read_text()
    assert proc.returncode == 128 + signal.SIGINT, err  # 130, as a shell reports Ctrl-C
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted: stopped at once") and "Traceback" not in err
    assert sum("SIGINT: stopping after this step" in line for line in lines) == 1
    assert (run_dir / "last.pth").read_bytes() == before
    assert not [f for f in os.listdir(run_dir) if ".tmp" in f]


@pytest.mark.slow
def test_ctrl_c_with_the_torch_loader_is_one_message(prepared_root, tmp_path):
    run_dir = tmp_path / "cpu_smoke"
    proc = subprocess.Popen(cli_cmd(prepared_root, tmp_path, "--loader", "torch", "--workers", "2", epochs=50),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for(lambda: position(str(run_dir)) is not None, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT
    assert err.count("SIGINT") == 1 and "Traceback" not in err and "KeyboardInterrupt" not in err, err


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["exception", "enospc"])
@pytest.mark.parametrize("target", ["last.pth", "best.pth"])
def test_a_failed_save_keeps_the_previous_file(prepared_root, tmp_path, monkeypatch, fault, target):
    cfg = tiny_cfg(prepared_root, tmp_path, epochs=2)
    first = stopped_run(cfg, 3, monkeypatch)  # after epoch 1: last.pth and best.pth exist
    path = os.path.join(first["out_dir"], target)
    before = open(path, "rb").read()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the bytes reach the temporary file first
        if os.path.basename(f.name).startswith(target):
            if fault == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise RuntimeError("power cut simulation")

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    monkeypatch.setattr(training.engine.EarlyStopping, "step", lambda self, value, epoch: (True, False))  # a new best
    expected = (errors.TrainingError, "no space left on device") if fault == "enospc" \
        else (RuntimeError, "power cut")
    with pytest.raises(expected[0], match=expected[1]):
        training.main(dict(cfg, resume="auto"))
    assert open(path, "rb").read() == before
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp" in f]
    monkeypatch.undo()
    assert load(os.path.join(first["out_dir"], "last.pth"))["next_epoch"] == 2


def test_every_checkpoint_write_is_fsynced_before_the_rename(prepared_root, tmp_path, monkeypatch):
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst):
        assert src in synced, f"{src} renamed without fsync"
        renamed.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    training.main(tiny_cfg(prepared_root, tmp_path, epochs=1))
    for name in ("last.pth", "best.pth", "best_loss.pth", "config.json", "metrics.csv", "summary.json", "curves.png"):
        assert name in renamed, name


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path, prepared_root, capfd):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": RunsCode(str(marker))}, evil)
    with pytest.raises(errors.ModelError, match="refused"):
        model_utils.load_state_dict_file(str(evil))
    for flag in ("--weights", "--resume"):
        code, _, err = run_cli(train.cli, tiny_argv(prepared_root, tmp_path / "out", flag, str(evil)), capfd)
        one_line_error(code, err, "refused")
        assert "\x1b[" not in err  # no raw terminal colour codes from torch's message
    assert not marker.exists()


def test_truncated_and_foreign_checkpoints_are_named(tmp_path, prepared_root, capfd):
    model = model_utils.get_model(num_classes=3)
    good = tmp_path / "good.pth"
    torch.save(model.state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(errors.ModelError, match="truncated.pth"):
        model_utils.load_state_dict_file(str(truncated))
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(errors.ModelError, match="notes.pth"):
        model_utils.load_state_dict_file(str(text))
    code, _, err = run_cli(train.cli, tiny_argv(prepared_root, tmp_path / "out", "--resume", str(truncated)), capfd)
    one_line_error(code, err, "truncated.pth")


def test_prefixed_state_dicts_load_and_head_mismatch_is_explained(tmp_path):
    model = model_utils.get_model(num_classes=3)
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        path = tmp_path / "prefixed.pth"
        torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
        loaded = model_utils.load_trained(str(path), num_classes=3)
        assert torch.equal(loaded.fc.weight, model.fc.weight)
    imagenet = tmp_path / "imagenet.pth"
    torch.save(model_utils.torchvision.models.resnet18(num_classes=1000).state_dict(), imagenet)
    with pytest.raises(errors.ModelError, match="1000-class head.*--weights"):
        model_utils.load_trained(str(imagenet), num_classes=101)


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_a_corrupt_image_through_the_cli_is_one_line(prepared_root, tmp_path, capfd, loader):
    root = str(tmp_path / "root")
    shutil.copytree(prepared_root, root)
    files, _ = splits.read_split(root, "train")
    victim = os.path.join(splits.image_root(root), files[5])
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 3])
    code, _, err = run_cli(train.cli, tiny_argv(root, tmp_path / "out", "--loader", loader, "--workers", "2"), capfd)
    one_line_error(code, err, f"cannot decode {victim}")


@pytest.mark.parametrize("args,expected", [
    (("--batch_size", "0"), "batch_size must be > 0"), (("--lr_backbone=-1e-3",), "lr_backbone must be >= 0"),
    (("--cutmix_alpha", "-1"), "cutmix_alpha must be >= 0"), (("--arch", "vgg16"), "invalid choice"),
    (("--epochs", "-2"), "epochs must be > 0"), (("--exp", "nope"), "invalid choice"),
    (("--amp", "fp8"), "invalid choice"), (("--img_size", "8"), "img_size must be >= 32"),
    (("--workers", "0"), "at least 1 thread"), (("--sync_bn",), "sync_bn needs several CUDA"),
    (("--config", "/nonexistent.yaml"), "cannot read config file"), (("--device", "cuda:9"), "no CUDA device"),
])
def test_bad_flags_fail_in_one_line(args, expected, prepared_root, tmp_path, capfd):
    code, _, err = run_cli(train.cli, tiny_argv(prepared_root, tmp_path, *args), capfd)
    one_line_error(code, err, expected)


def test_bad_paths_fail_in_one_line(prepared_root, tmp_path, capfd):
    empty = tmp_path / "empty_root"
    empty.mkdir()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    broken_split = tmp_path / "broken_split"
    shutil.copytree(prepared_root, broken_split)
    os.remove(broken_split / splits.IMAGES_DIR / splits.read_split(prepared_root, "train")[0][0])
    cases = [(("--data_root", str(empty)), "download.py"),
             (("--data_root", str(broken_split)), "missing files"),
             (("--out_dir", str(blocker / "sub")), "cannot write to the output folder")]
    for args, expected in cases:
        code, _, err = run_cli(train.cli, tiny_argv(prepared_root, tmp_path / "out", *args), capfd)
        one_line_error(code, err, expected)


@pytest.mark.slow
def test_the_real_cli_prints_one_line(prepared_root, tmp_path):
    """Each script's own entry point, in a fresh interpreter: a bad input is one line on stderr and exit 1."""
    cases = [(["train_caltech101.py", "--data_root", str(tmp_path / "nowhere"), "--device", "cpu"], "download.py"),
             (["evaluate.py", "--checkpoint", str(tmp_path / "none.pth")], "no checkpoint at"),
             (["download.py", "--data_root", str(tmp_path / "r"), "--archive", str(tmp_path / "x.tar.gz")],
              "does not exist")]
    for argv, expected in cases:
        result = subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], capture_output=True,
                                text=True, cwd=ROOT, timeout=120)
        one_line_error(result.returncode, result.stderr, expected)


def test_predict_and_evaluate_errors_are_one_line(trained_run, prepared_with_test, tmp_path, capfd):
    files, _ = splits.read_split(prepared_with_test, "val")
    image = os.path.join(splits.image_root(prepared_with_test), files[0])
    run = trained_run["out_dir"]
    cases = [(predict.cli, [image, "--checkpoint", run, "--gradcam", "--layer", "layer9"], "layer9"),
             (predict.cli, [image, "--checkpoint", run, "--gradcam", "--layer", "fc"], "spatial map"),
             (predict.cli, [image, "--checkpoint", run, "--batch_size", "0"], "--batch_size must be at least 1"),
             (predict.cli, [image, "--checkpoint", os.path.join(run, "best.pth.missing")], "no checkpoint"),
             (evaluate.cli, ["--compare", str(tmp_path)], "is a training run folder"),
             (evaluate.cli, ["--checkpoint", run, "--batch_size", "0"], "--batch_size must be at least 1"),
             (download.cli, ["--data_root", str(tmp_path / "r"), "--archive", __file__], "not a readable")]
    for cli, argv, expected in cases:
        code, _, err = run_cli(cli, argv, capfd)
        one_line_error(code, err, expected)


def test_the_python_predictor_takes_one_image_or_none(trained_run, prepared_with_test):
    predictor = predict.Predictor(trained_run["out_dir"])
    files, _ = splits.read_split(prepared_with_test, "val")
    path = os.path.join(splits.image_root(prepared_with_test), files[0])
    assert predictor.predict([]) == []
    single = predictor.predict(path, topk=2)
    assert len(single) == 1 and single == predictor.predict([path], topk=2)
