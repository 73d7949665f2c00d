"""Scale-out through the real torchrun: 2 CPU processes with the gloo backend, rendezvous on localhost:0 so that
parallel runs never share a port. A 2-rank run takes the 1-process run's steps and evaluates every image once;
only rank 0 writes; a killed worker is relaunched and resumes; SIGTERM stops both ranks at one step."""
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import evaluate
from conftest import ROOT
from kit.data import splits

DRIVER = os.path.join(ROOT, "tests", "ddp_driver.py")
# `--standalone` relaunches fail on torch 2.14 (the new gloo ranks dial the old ones' ports), so the README's
# --max_restarts command, and these tests, use a c10d rendezvous on an OS-chosen port instead.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", "localhost:0", "--nproc_per_node", "2"]


def settings(data_root, out_dir, *extra, epochs=2, batch=8):
    # 64 px: with one image per rank BatchNorm still sees 2x2 values per channel in layer4.
    return ["--exp", "cpu_smoke", "--data_root", data_root, "--out_dir", str(out_dir), "--img_size", "64",
            "--batch_size", str(batch), "--eval_batch_size", "8", "--workers", "1", "--epochs", str(epochs),
            "--eval_every", "1", "--warmup_epochs", "0.5", "--progress", "false", "--deterministic", "true",
            "--log_every", "1", "--report_page", "false", *extra]


def run(cmd, env=None, timeout=300):
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                            env=dict(os.environ, **(env or {})))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def rows(run_dir):
    return list(csv.DictReader(open(os.path.join(run_dir, "metrics.csv"))))


@pytest.mark.slow
def test_two_ranks_take_the_one_process_steps_and_evaluate_alike(prepared_root, trained_run, tmp_path):
    """11 train images, global batch 6: a full step (3 + 3), then a short one (3 + 2), whose loss the ranks weight
    by their share, at 48 px in epoch 1 and 64 px in epoch 2 (progressive resizing: both ranks change size together).
    BatchNorm runs in eval mode (ddp_driver.py) so a step does not depend on how its batch is split,
    starting from trained weights (--weights) so that eval-mode BatchNorm normalises; every layer trains; SGD, fp32.
    Observed after 2 epochs: max weight difference 2.1e-7 (float summation order) while weights move up to 0.28.
    (From a random init, eval-mode BatchNorm does not normalise, activations explode and float noise grows to
    1e-4 within 4 steps, in one process or two.)"""
    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    lines = (root / "train.txt").read_text().splitlines()
    (root / "train.txt").write_text("\n".join(lines[:11]) + "\n")
    common = settings(str(root), tmp_path / "one", "--optimizer", "sgd", "--lr_backbone", "0.002", "--lr_fc",
                      "0.002", "--amp", "off", "--weights", os.path.join(trained_run["out_dir"], "best.pth"),
                      "--report_page", "true",
                      "--img_size_start", "48", "--img_size_ramp", "1,2",  # a size change between the epochs
                      batch=6)
    env = {"KIT_TEST_BN_EVAL": "1"}
    run([sys.executable, DRIVER, *common], env)
    two = run([*TORCHRUN, DRIVER, *settings(str(root), tmp_path / "two", *common[common.index("--optimizer"):],
                                            batch=6)], env)
    one_dir, two_dir = str(tmp_path / "one" / "cpu_smoke"), str(tmp_path / "two" / "cpu_smoke")
    a, b = load(os.path.join(one_dir, "last.pth"))["model"], load(os.path.join(two_dir, "last.pth"))["model"]
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-6
    assert load(os.path.join(two_dir, "last.pth"))["world_size"] == 2
    assert json.load(open(os.path.join(two_dir, "config.json")))["world_size"] == 2
    # Only rank 0 writes and prints: one run folder, one line per epoch.
    assert sorted(os.listdir(tmp_path / "two")) == ["cpu_smoke"]
    assert two.stdout.count("epoch 1/2:") == 1 and two.stdout.count("processes: world size 2, per-rank batch 3") == 1
    assert "progressive resizing: train crops 48 px epoch 1, 64 px epoch 2" in two.stdout
    # Every val image counted once, in fp32: the same figures as one process (the loss to float noise).
    for r1, r2 in zip(rows(one_dir), rows(two_dir)):
        assert (r1["val_images"], r1["val_top1"], r1["val_top5"], r1["val_mean_class_acc"]) == \
            (r2["val_images"], r2["val_top1"], r2["val_top5"], r2["val_mean_class_acc"]) == \
            ("33", r2["val_top1"], r2["val_top5"], r2["val_mean_class_acc"])
        assert abs(float(r1["val_loss"]) - float(r2["val_loss"])) < 1e-5
    # ... and the 2-rank run's own evaluation of its best.pth equals a 1-process evaluate.py of that file.
    report = evaluate.main(evaluate.get_args_parser().parse_args(["--checkpoint", two_dir, "--out_dir",
                                                                  str(tmp_path / "eval")]))
    best = json.load(open(os.path.join(two_dir, "summary.json")))["best"]
    assert (report["top1"], report["mean_class_acc"]) == (best["val_top1"], best["val_mean_class_acc"])
    summary = json.load(open(os.path.join(two_dir, "summary.json")))["splits"]
    assert summary["val"]["images"] == 33 and summary["train"]["images"] == 11
    # The 2-rank run's page names the mistakes one process finds in its best.pth, with the same predictions: the
    # gathered logits map to the right files (rank 1's half included).
    page = json.load(open(os.path.join(two_dir, "report.json")))["most_confident_wrong"]
    val_files = splits.read_split(str(root), "val")[0]
    assert max(val_files.index(w["file"]) for w in page) >= 16  # rank 1's part among them
    assert [(w["file"], w["predicted"]) for w in page] == [(w["file"], w["predicted"])
                                                           for w in report["most_confident_wrong"]]
    assert [w["confidence"] for w in page] == pytest.approx([w["confidence"] for w in report["most_confident_wrong"]],
                                                            abs=1e-5)
    assert os.path.isfile(os.path.join(two_dir, "report.html"))


@pytest.mark.slow
def test_a_nan_on_one_rank_makes_every_rank_skip_and_leaves_no_trace(prepared_root, tmp_path):
    """Rank 0's second step sees a NaN pixel: both ranks skip that step (rank 1's own loss was finite), rank 0 puts
    its BatchNorm statistics back (the ones DDP broadcasts to every rank), and the run ends with finite figures and
    a finite last.pth."""
    run([*TORCHRUN, DRIVER, *settings(prepared_root, tmp_path, epochs=1, batch=4)], {"KIT_TEST_NAN_AT": "2"})
    run_dir = str(tmp_path / "cpu_smoke")
    (row,) = rows(run_dir)
    assert row["skipped_steps"] == "1"
    assert all(math.isfinite(float(row[k])) for k in ("train_loss", "val_loss", "val_top1"))
    state = load(os.path.join(run_dir, "last.pth"))["model"]
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.fixture(scope="module")
def straight_two_ranks(prepared_root, module_tmp):
    out = module_tmp / "ddp_straight"
    run([*TORCHRUN, os.path.join(ROOT, "train_caltech101.py"), *settings(prepared_root, out, epochs=3, batch=2)])
    return os.path.join(str(out), "cpu_smoke")


def workers_of(proc):
    """{rank: pid} of a torchrun's worker processes."""
    found = {}
    for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(pid)
    return found


def wait_for_rows(run_dir, proc, count=1, timeout=180):
    deadline = time.time() + timeout
    while not (os.path.isfile(os.path.join(run_dir, "metrics.csv")) and len(rows(run_dir)) >= count):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)


@pytest.mark.slow
def test_a_killed_worker_is_relaunched_and_the_run_resumes_by_itself(straight_two_ranks, prepared_root, tmp_path):
    """The requeue command (--resume auto from the start) under --max_restarts 1: rank 1 is SIGKILLed inside epoch
    2; torchrun relaunches both ranks, they resume from last.pth and end with the uninterrupted run's weights."""
    cmd = [*TORCHRUN, "--max_restarts", "1", os.path.join(ROOT, "train_caltech101.py"),
           *settings(prepared_root, tmp_path, "--save_every_steps", "1", "--resume", "auto", epochs=3, batch=2)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    run_dir = str(tmp_path / "cpu_smoke")
    wait_for_rows(run_dir, proc)
    time.sleep(0.5)
    os.kill(workers_of(proc)[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in out and out.count("no last.pth of cpu_smoke") == 1
    a, b = load(os.path.join(straight_two_ranks, "last.pth")), load(os.path.join(run_dir, "last.pth"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_sigterm_stops_both_ranks_at_one_step_and_saves_once(straight_two_ranks, prepared_root, tmp_path):
    cmd = [*TORCHRUN, os.path.join(ROOT, "train_caltech101.py"), *settings(prepared_root, tmp_path, epochs=3,
                                                                           batch=2)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    run_dir = str(tmp_path / "cpu_smoke")
    wait_for_rows(run_dir, proc)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    out, err = proc.communicate(timeout=120)
    assert out.count("SIGTERM: state saved") == 1  # rank 0 alone reports (and writes)
    state = load(os.path.join(run_dir, "last.pth"))
    assert (2, 0) <= (state["next_epoch"], state["next_step"]) < (4, 0) and len(state["ranks"]) == 2
    assert "exitcode  : 143" in err or "Sending process" in err  # the workers stopped with 128 + SIGTERM
    run([*TORCHRUN, os.path.join(ROOT, "train_caltech101.py"), "--exp", "cpu_smoke", "--out_dir", str(tmp_path),
         "--resume", "auto"])
    a, b = load(os.path.join(straight_two_ranks, "last.pth")), load(os.path.join(run_dir, "last.pth"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_a_batch_that_does_not_divide_is_one_line(prepared_root, tmp_path):
    result = subprocess.run([*TORCHRUN, os.path.join(ROOT, "train_caltech101.py"),
                             *settings(prepared_root, tmp_path, batch=5)], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr  # said once, by rank 0, not once per rank
    assert "batch_size 5 (the global batch) does not divide over 2 processes; valid world sizes: 1, 5" in errors[0]
