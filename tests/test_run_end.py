"""Finished means finished: a relaunch of a finished or early-stopped run says so and touches nothing, a signal or a
kill during the end-of-run work leaves nothing missing after --resume, a resumed run's config.json reruns it in a
new folder, and the epoch a run resumed in reports the whole epoch. Through the real command line."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_caltech101 as train
from conftest import ROOT, one_line_error, run_cli, stopped_run, tiny_argv, tiny_cfg
from kit.training import checkpoint, runs, training

DRIVER = os.path.join(ROOT, "tests", "ddp_driver.py")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def snapshot(folder):
    """{relative path: (sha256, mtime_ns)} of every file below folder."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


def relaunch(out_dir, capfd, *extra):
    return run_cli(train.cli, ["--exp", "cpu_smoke", "--out_dir", str(out_dir), "--resume", "auto", *extra], capfd)


@pytest.mark.slow
def test_a_finished_run_relaunched_says_so_and_touches_nothing(prepared_root, tmp_path, capfd):
    result = training.main(tiny_cfg(prepared_root, tmp_path, epochs=2))
    run_dir = result["out_dir"]
    before = snapshot(tmp_path)
    for extra in ([], ["--resume", os.path.join(run_dir, "last.pth")]):
        code, out, err = relaunch(tmp_path, capfd, *extra)
        assert code == 0, err
        lines = out.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{run_dir} has finished all 2 epochs (best val_top1 ")
        assert lines[0].endswith(f"at epoch {result['best_epoch']}): nothing to do") and not err.strip()
        assert snapshot(tmp_path) == before  # no file written, not even rewritten with the same bytes


@pytest.mark.slow
def test_an_early_stopped_run_stays_stopped(prepared_root, tmp_path, capfd):
    # min_delta 10: nothing after the first evaluation counts as an improvement, so patience 1 stops after epoch 2
    result = training.main(tiny_cfg(prepared_root, tmp_path, epochs=5, early_stop_patience=1, monitor="val_loss",
                                 min_delta=10.0))
    assert [r["epoch"] for r in result["rows"]] == [1, 2] and result["summary"]["early_stop"]
    before = snapshot(tmp_path)
    for _ in range(2):  # every relaunch, not just the first
        code, out, err = relaunch(tmp_path, capfd)
        assert code == 0 and "has stopped early after epoch 2 (best val_loss" in out and "nothing to do" in out, err
    assert snapshot(tmp_path) == before
    assert [int(r["epoch"]) for r in runs.read_metrics(result["out_dir"])] == [1, 2]


def end_of_run_files(run_dir):
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    summary.pop("wall_time_s")
    for record in summary["time_to_val_top1"]:  # when it got there is the machine's; what and at which epoch, not
        record.pop("wall_time_s")
    return summary, os.path.getsize(os.path.join(run_dir, "curves.png")) > 10_000


def interrupted_at_the_end(prepared_root, out_dir, signum):
    """A deterministic 2-epoch run through the real CLI, sent `signum` during its end-of-run work."""
    cmd = [sys.executable, DRIVER, *tiny_argv(prepared_root, out_dir, "--deterministic", "true")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, KIT_TEST_SLOW_END="3"))
    lines = []
    for line in proc.stdout:  # the driver says when the end-of-run work starts, then waits 3 s inside it
        lines.append(line)
        if line.startswith("end-of-run work"):
            break
    assert any(line.startswith("epoch 2/2") for line in lines), lines
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, "".join(lines) + out, err


@pytest.mark.slow
def test_sigterm_during_the_end_of_run_work_finishes_it(prepared_root, tmp_path, capfd):
    straight = training.main(tiny_cfg(prepared_root, tmp_path / "straight", epochs=2, deterministic=True))
    code, out, err = interrupted_at_the_end(prepared_root, tmp_path / "runs", signal.SIGTERM)
    run_dir = str(tmp_path / "runs" / "cpu_smoke")
    assert code == 0, err
    assert "SIGTERM arrived during the end-of-run work: the end-of-run work was finished first" in out
    assert "(Ctrl-C again" not in err  # a SIGTERM is not a Ctrl-C
    assert end_of_run_files(run_dir) == end_of_run_files(straight["out_dir"])
    code, out, _ = relaunch(tmp_path / "runs", capfd)
    assert code == 0 and "nothing to do" in out


@pytest.mark.slow
def test_a_kill_during_the_end_of_run_work_is_completed_by_resume(prepared_root, tmp_path, capfd):
    straight = training.main(tiny_cfg(prepared_root, tmp_path / "straight", epochs=2, deterministic=True))
    code, _, _ = interrupted_at_the_end(prepared_root, tmp_path / "runs", signal.SIGKILL)
    run_dir = str(tmp_path / "runs" / "cpu_smoke")
    assert code == -signal.SIGKILL
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
    weights = snapshot(run_dir)
    code, out, err = relaunch(tmp_path / "runs", capfd)
    assert code == 0, err
    assert "has finished all 2 epochs" in out and "writing its missing end-of-run files (curves.png, summary.json)" \
        in out
    assert end_of_run_files(run_dir) == end_of_run_files(straight["out_dir"])
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if k not in ("summary.json", "curves.png")} == weights  # nothing else
    code, out, _ = relaunch(tmp_path / "runs", capfd)
    assert code == 0 and "nothing to do" in out


@pytest.mark.slow
def test_a_resumed_runs_config_json_reruns_it_in_a_new_folder(prepared_root, tmp_path, monkeypatch, capfd):
    stopped = stopped_run(tiny_cfg(prepared_root, tmp_path, epochs=2), at=4, monkeypatch=monkeypatch)
    code, _, err = relaunch(tmp_path, capfd)
    assert code == 0, err
    config_path = os.path.join(stopped["out_dir"], "config.json")
    config = json.load(open(config_path))
    assert "resume" not in config  # how a process was launched is not part of the run
    code, out, err = run_cli(train.cli, ["--config", config_path], capfd)
    assert code == 0, err
    assert f"run folder {tmp_path / 'cpu_smoke_2'}" in out and "resumed from" not in out
    # an older config.json (or a user's file) that says resume: it is ignored, with a note
    with open(tmp_path / "old.json", "w") as f:
        json.dump(dict(config, resume="auto", epochs=1), f)
    code, out, err = run_cli(train.cli, ["--config", str(tmp_path / "old.json")], capfd)
    assert code == 0 and "'resume' says how a process is launched" in err
    assert f"run folder {tmp_path / 'cpu_smoke_3'}" in out


def test_a_finished_run_with_a_changed_split_and_missing_files_is_refused(prepared_root, tmp_path, capfd):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    result = training.main(tiny_cfg(str(root), tmp_path / "runs", epochs=1))
    os.remove(os.path.join(result["out_dir"], "summary.json"))
    lines = (root / "train.txt").read_text().splitlines()
    (root / "train.txt").write_text("\n".join(lines[1:]) + "\n")
    code, _, err = relaunch(tmp_path / "runs", capfd)
    one_line_error(code, err, "the run has finished but lacks summary.json")


def test_the_signal_message_offers_a_second_ctrl_c_only_for_ctrl_c(capsys):
    stop = checkpoint.GracefulStop()
    try:
        stop._handle(signal.SIGTERM, None)
        assert capsys.readouterr().err.strip() == "SIGTERM: stopping after this step"
        signal.signal(signal.SIGINT, stop._handle)
        stop._handle(signal.SIGINT, None)
        assert capsys.readouterr().err.strip() == "SIGINT: stopping after this step (Ctrl-C again to abort now)"
    finally:
        stop.restore()


@pytest.mark.slow
def test_the_duration_estimate_is_per_phase_and_rough_where_it_must_be(prepared_root, tmp_path, capfd):
    training.main(tiny_cfg(prepared_root, tmp_path / "a", epochs=2, trainable="head", freeze_epochs=1))
    out = capfd.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("estimate:"))
    assert "s per step frozen, " in line and "s per step training everything" in line and "rough:" in line
    training.main(tiny_cfg(prepared_root, tmp_path / "b", epochs=1))
    line = next(line for line in capfd.readouterr().out.splitlines() if line.startswith("estimate:"))
    assert "per step frozen" not in line and "rough:" in line  # 3 steps: start-up and evaluation dominate


@pytest.mark.slow
def test_the_resumed_epoch_counts_the_time_before_the_stop(prepared_root, tmp_path, monkeypatch):
    """Epoch 2's first two steps take at least 1.5 s each (a sleep), then the run stops and resumes: epoch 2's row
    counts those 3 s in its train time and its wall time, as the uninterrupted epoch would."""
    from kit.training import engine

    real_step, calls = engine.optimizer_step, []

    def slow_step(*args, **kwargs):
        calls.append(1)
        if len(calls) in (4, 5):  # 3 steps per epoch: epoch 2, steps 1 and 2
            time.sleep(1.5)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "optimizer_step", slow_step)
    stopped_run(tiny_cfg(prepared_root, tmp_path, epochs=2), at=5, monkeypatch=monkeypatch)
    resumed = training.main(tiny_cfg(prepared_root, tmp_path, epochs=2, resume="auto"))
    first, second = resumed["rows"]
    assert second["train_time_s"] >= 3.0
    assert second["wall_time_s"] - first["wall_time_s"] >= 3.0


@pytest.mark.slow
def test_a_last_pth_from_before_newer_settings_resumes(prepared_root, tmp_path, monkeypatch, capfd):
    """A last.pth whose config lacks settings added since (keep_checkpoints) resumes with their defaults."""
    stopped = stopped_run(tiny_cfg(prepared_root, tmp_path, epochs=2), at=4, monkeypatch=monkeypatch)
    path = os.path.join(stopped["out_dir"], "last.pth")
    state = load(path)
    del state["config"]["keep_checkpoints"]
    torch.save(state, path)
    code, out, err = relaunch(tmp_path, capfd)
    assert code == 0 and "continuing at epoch 2 step 1" in out, err


def test_an_unfinished_epochs_tally_moves_to_another_world_size():
    """Known answer: two ranks' sums go to rank 0 once; the skip count and streak, which ranks share, stay."""
    def tally(loss, correct, good, seen, skipped):
        return {"loss_sum": torch.tensor(loss), "correct": torch.tensor(correct), "good_images": torch.tensor(good),
                "skipped": torch.tensor(skipped), "bad_streak": torch.tensor(0), "seen": seen, "seconds": 4.0}

    two = [tally(3.0, 5, 8, 8, 1), tally(2.5, 4, 8, 8, 1)]
    rank0, rank1 = checkpoint.moved_tally(two, 0), checkpoint.moved_tally(two, 1)
    assert (rank0["loss_sum"].item(), rank0["correct"].item(), rank0["good_images"].item(), rank0["seen"]) == \
        (5.5, 9, 16, 16)
    assert (rank1["loss_sum"].item(), rank1["correct"].item(), rank1["good_images"].item(), rank1["seen"]) == \
        (0.0, 0, 0, 0)
    assert rank0["skipped"].item() == rank1["skipped"].item() == 1  # skipped_steps = sum over ranks / world = 1
    assert checkpoint.moved_tally([None, None], 0) is None  # saved at an epoch end: nothing to move
