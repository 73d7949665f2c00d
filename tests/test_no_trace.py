"""Nothing left behind: a skipped non-finite step leaves the model exactly as it was (BatchNorm statistics too),
an over-limit image is refused from its header in one line while the rest goes on, runs started together claim
different folders, and --keep_checkpoints keeps exactly the newest epochs, each of which resumes."""
import io
import math
import multiprocessing
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import augment
import evaluate
import model_utils
import predict
import train_caltech101 as train
from conftest import ROOT, FixedBatches, make_image, one_line_error, run_cli, tiny_argv, tiny_cfg
from kit.base import errors, fileio
from kit.data import split_writer, splits
from kit.training import checkpoint, engine, runs, training

CPU = torch.device("cpu")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# a non-finite step

def small_resnet(seed=0):
    torch.manual_seed(seed)
    model = model_utils.get_model(num_classes=3).train()
    optimizer = engine.build_optimizer(model_utils.param_groups(model, 1e-3, 1e-3, 1e-4),
                                       {"optimizer": "adamw", "momentum": 0.9})
    return model, optimizer


def batches(n, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 0])) for _ in range(n)]


def with_nan_pixel(batch):
    images = batch[0].clone()
    images[1, 2, 5, 7] = float("nan")
    return images, batch[1]


def optimizer_state(optimizer):
    return {(i, k): v.clone() for i, s in enumerate(optimizer.state.values()) for k, v in s.items()}


@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd"])
def test_a_nan_pixel_leaves_every_buffer_parameter_and_optimizer_state_as_it_was(optimizer_name):
    model, _ = small_resnet()
    optimizer = engine.build_optimizer(model_utils.param_groups(model, 1e-3, 1e-3, 1e-4),
                                       {"optimizer": optimizer_name, "momentum": 0.9})
    scaler, mixer = torch.amp.GradScaler("cpu", enabled=False), augment.MixupCutmix(3, seed=0)
    good, = batches(1)
    engine.train_step(model, *good, optimizer, scaler, mixer, None)  # a real step first: optimizer state exists
    before, opt_before = {k: v.clone() for k, v in model.state_dict().items()}, optimizer_state(optimizer)
    assert "bn1.running_mean" in before and before["bn1.num_batches_tracked"] == 1
    loss, finite, _ = engine.train_step(model, *with_nan_pixel(good), optimizer, scaler, mixer, None)
    assert not math.isfinite(loss.item()) and not finite.item()
    assert same_state(before, model.state_dict())  # running_mean/var and num_batches_tracked included
    assert same_state(opt_before, optimizer_state(optimizer))
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(good[0])).all()  # the next evaluation is finite


def test_a_skipped_step_is_as_if_the_batch_never_came():
    """Known answer: good, NaN, good gives bit for bit the model of good, good (constant LR, no mixing), and the
    EMA model takes no poisoned buffer."""
    data = batches(2)
    cfg = dict(grad_clip=0.0, log_every=1, max_bad_steps=5, progress=False, frozen_bn="eval")
    results = []
    for loader in (FixedBatches([data[0], with_nan_pixel(data[0]), data[1]], 3), FixedBatches(data, 2)):
        model, optimizer = small_resnet()
        ema = engine.ModelEma(model, 0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        parts = checkpoint.Parts(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                                 augment.MixupCutmix(3, seed=0), loader, ema)
        stats = engine.train_one_epoch(parts, None, cfg, 1)
        results.append((stats, model.state_dict(), ema.module.state_dict()))
    (poisoned_stats, poisoned, poisoned_ema), (_, clean, _) = results
    assert poisoned_stats["skipped_steps"] == 1
    assert same_state(poisoned, clean)
    assert all(torch.isfinite(v).all() for v in poisoned_ema.values())


@pytest.mark.slow
def test_a_run_with_injected_non_finite_batches_ends_finite(prepared_root, tmp_path, monkeypatch):
    """Two NaN batches in a short real run (the loader's images poisoned at steps 2 and 5): the run skips them,
    finishes with finite figures, and last.pth holds only finite buffers."""
    real_step, calls = engine.train_step, []

    def poisoned_step(model, images, *args, **kwargs):
        calls.append(1)
        if len(calls) in (2, 5):
            images = images.clone()
            images[0, 0, 0, 0] = float("nan")
        return real_step(model, images, *args, **kwargs)

    monkeypatch.setattr(engine, "train_step", poisoned_step)
    result = training.main(tiny_cfg(prepared_root, tmp_path, epochs=2))
    assert [r["skipped_steps"] for r in result["rows"]] == [1, 1]
    assert all(math.isfinite(r[k]) for r in result["rows"] for k in ("train_loss", "val_loss", "val_top1"))
    last = load(os.path.join(result["out_dir"], "last.pth"))
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    summary = result["summary"]["splits"]
    assert all(math.isfinite(m["loss"]) for m in summary.values())


# ---------------------------------------------------------------------------------------------
# hostile images

def png_claiming(width, height):
    """A valid PNG header claiming width x height pixels, in under 100 bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def jpeg_claiming(width, height):
    """A small real JPEG whose frame header claims width x height pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


HOSTILE = {"bomb.png": png_claiming(30000, 30000), "huge.jpg": jpeg_claiming(65000, 65000),
           "just_over.png": png_claiming(10000, 10000)}  # over PIL's limit but under its own error (2x)


@pytest.fixture
def hostile_files(tmp_path):
    paths = {}
    for name, data in HOSTILE.items():
        paths[name] = str(tmp_path / name)
        with open(paths[name], "wb") as f:
            f.write(data)
    return paths


@pytest.fixture
def no_decode(monkeypatch):
    """Any pixel decode fails the test: a hostile image must be refused from its header."""
    def load(self, *args, **kwargs):
        raise AssertionError(f"{self.filename} was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_over_limit_images_are_refused_from_the_header(hostile_files, no_decode):
    for name, path in hostile_files.items():
        with pytest.raises(errors.DataError) as info:
            splits.load_rgb(path)
        message = str(info.value)
        assert "\n" not in message and path in message and "pixel limit" in message and "89,478,485" in message
        with pytest.raises(errors.DataError, match="pixel limit"):
            splits.image_sizes(os.path.dirname(path), [name])
        assert "pixel limit" in split_writer.check_image(path)


def test_the_limit_is_pils_own(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    make_image((10, 200, 10), np.random.default_rng(0), size=(60, 40)).save(path)
    assert splits.load_rgb(str(path)).size == (60, 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60 * 40 - 1)  # a user who lowers it is obeyed
    with pytest.raises(errors.DataError, match="2,399-pixel limit"):
        splits.load_rgb(str(path))


def test_predict_counts_a_hostile_image_as_failed_and_predicts_the_rest(trained_run, prepared_with_test,
                                                                        hostile_files, tmp_path, capfd):
    good = tmp_path / "good.jpg"
    make_image((200, 40, 40), np.random.default_rng(1)).save(good)
    inputs = [str(good), hostile_files["bomb.png"], hostile_files["huge.jpg"]]
    code, out, err = run_cli(predict.cli, [*inputs, "--checkpoint", trained_run["out_dir"], "--json",
                                           str(tmp_path / "p.json")], capfd)
    assert code == 1
    assert out.startswith(f"{good}: ") and len(out.splitlines()) == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("pixel limit" in line for line in errors) and "Traceback" not in err
    assert "1 predicted, 2 failed" in err


def hostile_root(prepared_root, tmp_path, split):
    """A copy of the prepared root whose first `split` image is replaced by a PNG claiming 30,000 x 30,000."""
    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    files, _ = splits.read_split(str(root), split)
    with open(os.path.join(splits.image_root(str(root)), files[0]), "wb") as f:
        f.write(png_claiming(30000, 30000))
    return str(root), files[0]


def test_the_torch_loader_and_the_cache_refuse_a_hostile_training_image_in_one_line(prepared_root, tmp_path, capfd):
    root, name = hostile_root(prepared_root, tmp_path, "train")
    for extra in (["--loader", "torch"], ["--cache", "true"]):
        code, _, err = run_cli(train.cli, tiny_argv(root, tmp_path / "runs", *extra), capfd)
        one_line_error(code, err, "pixel limit")
        assert name in err


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_evaluate_refuses_a_hostile_val_image_in_one_line(trained_run, prepared_with_test, tmp_path, capfd, loader):
    """DALI decodes files itself: every split's headers are read first, so it never meets the file."""
    root, name = hostile_root(prepared_with_test, tmp_path, "val")
    code, _, err = run_cli(evaluate.cli, ["--checkpoint", trained_run["out_dir"], "--data_root", root, "--loader",
                                          loader, "--out_dir", str(tmp_path / "eval")], capfd)
    one_line_error(code, err, "pixel limit")
    assert name in err


# ---------------------------------------------------------------------------------------------
# run folders claimed together

def slow_claim(args):
    """new_run_dir with the existence check slowed down, so that every process checks before any claims."""
    out_dir, barrier = args
    real = runs.holds_run

    def slow(folder):
        answer = real(folder)
        time.sleep(0.3)
        return answer

    runs.holds_run = slow
    barrier.wait()
    return runs.new_run_dir(out_dir, "cpu_smoke")


def test_processes_claiming_at_once_get_different_folders(tmp_path):
    manager = multiprocessing.Manager()
    barrier = manager.Barrier(6)
    with multiprocessing.get_context("fork").Pool(6) as pool:
        folders = pool.map(slow_claim, [(str(tmp_path), barrier)] * 6)
    assert len(set(folders)) == 6
    assert sorted(os.listdir(tmp_path)) == sorted(["cpu_smoke"] + [f"cpu_smoke_{n}" for n in range(2, 7)])
    assert all(os.path.isfile(os.path.join(f, runs.CLAIM_FILE)) for f in folders)


@pytest.mark.slow
def test_runs_started_together_end_in_their_own_complete_folders(prepared_root, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train_caltech101.py"),
           *tiny_argv(prepared_root, tmp_path, epochs=1)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    said = sorted(line.split("run folder ", 1)[1] for out, _ in outs for line in out.splitlines()
                  if line.startswith("run folder "))
    assert said == sorted(str(tmp_path / n) for n in ("cpu_smoke", "cpu_smoke_2"))
    for folder in said:
        assert {"config.json", "last.pth", "best.pth", "metrics.csv", "summary.json", "curves.png",
                "run.claim"} <= set(os.listdir(folder))
        assert len(runs.read_metrics(folder)) == 1
        assert load(os.path.join(folder, "last.pth"))["finished"]


# ---------------------------------------------------------------------------------------------
# --keep_checkpoints

@pytest.mark.slow
def test_keep_checkpoints_keeps_the_newest_epochs_and_each_resumes(prepared_root, tmp_path, capfd):
    kw = dict(epochs=4, deterministic=True)
    result = training.main(tiny_cfg(prepared_root, tmp_path / "runs", keep_checkpoints=2, **kw))
    run_dir = result["out_dir"]
    kept = sorted(f for f in os.listdir(run_dir) if f.startswith("epoch_"))
    assert kept == ["epoch_003.pth", "epoch_004.pth"]
    assert load(os.path.join(run_dir, "epoch_003.pth"))["next_epoch"] == 4
    final = load(os.path.join(run_dir, "last.pth"))
    assert same_state(load(os.path.join(run_dir, "epoch_004.pth"))["model"], final["model"])
    # epoch 3's checkpoint, resumed in a copy of the run, trains epoch 4 to the same weights
    copy_dir = tmp_path / "copy" / "cpu_smoke"
    shutil.copytree(run_dir, copy_dir)
    code, out, err = run_cli(train.cli, ["--resume", str(copy_dir / "epoch_003.pth")], capfd)
    assert code == 0, err
    assert "continuing at epoch 4 step 0" in out
    assert same_state(load(copy_dir / "last.pth")["model"], final["model"])
    # epoch 4's is the finished run: said in one line, nothing trained
    code, out, err = run_cli(train.cli, ["--resume", os.path.join(run_dir, "epoch_004.pth")], capfd)
    assert code == 0 and "has finished all 4 epochs" in out and "nothing to do" in out, err


def test_epoch_checkpoints_are_pruned_by_number_not_by_name(tmp_path):
    last = tmp_path / "last.pth"
    for epoch in (998, 999):
        (tmp_path / f"epoch_{epoch:03d}.pth").write_bytes(b"old")
    last.write_bytes(b"epoch 1000")
    checkpoint.keep_epoch_checkpoints(str(last), str(tmp_path / "epoch_1000.pth"), 2)
    assert sorted(os.listdir(tmp_path)) == ["epoch_1000.pth", "epoch_999.pth", "last.pth"]  # 998 went, not 1000
    assert (tmp_path / "epoch_1000.pth").read_bytes() == b"epoch 1000"
    last.unlink()
    last.write_bytes(b"epoch 1001")  # as save_atomic does: a new file, never the old one rewritten
    assert (tmp_path / "epoch_1000.pth").read_bytes() == b"epoch 1000"


def test_a_write_interrupted_midway_leaves_the_previous_file(tmp_path):
    path = str(tmp_path / "summary.json")
    fileio.write_atomic("old\n", path)
    with pytest.raises(KeyboardInterrupt):
        with fileio.replacing(path, "w") as f:
            f.write("half of the new")
            raise KeyboardInterrupt  # a Ctrl-C mid-write
    assert open(path).read() == "old\n" and os.listdir(tmp_path) == ["summary.json"]  # no temporary file left
    fileio.write_atomic(b"\x00new", path)
    assert open(path, "rb").read() == b"\x00new" and os.listdir(tmp_path) == ["summary.json"]
