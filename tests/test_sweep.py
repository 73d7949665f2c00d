"""sweep.py: workers sharing one study (SQLite, and a real PostgreSQL server where installed) run --trials in total
with no trial run twice; pruning stops a trial that cannot learn; a SIGKILLed worker's trial continues from its
last.pth to the weights of an uninterrupted trial; the best configuration reruns to its figure; one-line errors."""
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import optuna
import pytest
import torch

import sweep
from conftest import ROOT, one_line_error, run_cli
from kit.sweeps import sweep_report
from kit.training import training

SWEEP = os.path.join(ROOT, "sweep.py")
TWO = "lr_backbone: {log_uniform: [1.0e-3, 1.0e-2]}\nweight_decay: {log_uniform: [1.0e-3, 1.0e-1]}\n"


def flags(data_root, out_dir, space, *extra, trials=2, epochs=1):
    return [SWEEP, "--exp", "cpu_smoke", "--space", str(space), "--trials", str(trials), "--out_dir", str(out_dir),
            "--data_root", data_root, "--epochs", str(epochs), "--img_size", "32", "--img_size_start", "0",
            "--batch_size", "4", "--eval_batch_size", "8", "--workers", "1", "--eval_every", "1", "--warmup_epochs",
            "0.5", "--loader", "torch", "--report_page", "false", "--deterministic", "true", "--heartbeat", "1",
            "--grace", "3", *extra]


def space_file(tmp_path, text=TWO, name="space.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def start(cmd):
    return subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def study_of(url, name):
    return optuna.load_study(study_name=name, storage=url)


def two_workers_share(data_root, tmp_path, storage_flags, url, join_by_name):
    """Two worker processes, one study of 3 trials: 3 run in all, each by one worker."""
    space = space_file(tmp_path)
    cmd = flags(data_root, tmp_path / "sw", space, "--study", "shared", *storage_flags, trials=3)
    first = start(cmd)
    if join_by_name:  # no space, no training flags: the second takes the study's definition and pruner
        cmd = [SWEEP, "--study", "shared", "--trials", "3", "--out_dir", str(tmp_path / "sw"), "--data_root",
               data_root, "--workers", "1", "--loader", "torch", "--report_page", "false", *storage_flags]
        deadline = time.time() + 60
        while not (tmp_path / "sw" / "shared" / "sweep.json").is_file():  # the study exists once recorded
            assert time.time() < deadline and first.poll() is None, first.communicate()[0][-3000:]
            time.sleep(0.1)
    logs = [finish(p) for p in [first, start(cmd)]]  # else both start at once: the study made by either
    assert "pruner median (after 2 trials, 0 warm-up epochs)" in logs[1]
    study = study_of(url, "shared")
    trials = study.get_trials()
    ran = [t for t in trials if not t.user_attrs.get("surplus")]
    assert len(ran) == 3 and {t.state.name for t in ran} <= {"COMPLETE", "PRUNED"}
    numbers = [[int(m) for m in re.findall(r"^trial (\d+): ", log, re.M)] for log in logs]
    assert sorted(numbers[0] + numbers[1]) == sorted(t.number for t in ran)  # each trial run once, by one worker
    assert numbers[0] and numbers[1]  # both worked
    assert len({tuple(sorted(t.params.items())) for t in ran}) == 3  # seeded by trial number: no two drew alike
    for t in ran:  # each trial an ordinary run with the values the study holds
        cfg = json.load(open(os.path.join(t.user_attrs["run_dir"], "config.json")))
        assert cfg["lr_backbone"] == t.params["lr_backbone"] and cfg["name"] == f"trial_{t.number:04d}"
        assert os.path.isfile(os.path.join(t.user_attrs["run_dir"], "best.pth"))
    assert len([d for d in os.listdir(tmp_path / "sw" / "shared") if d.startswith("trial_")]) == 3


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(prepared_root, tmp_path):
    two_workers_share(prepared_root, tmp_path, [], "sqlite:///" + str(tmp_path / "sw" / "shared" / "study.db"),
                      join_by_name=False)


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster on a free localhost port (its own folder under the system temp dir, which the
    server's user can reach); its URL."""
    initdb, pg_ctl, createdb = (shutil.which(n) for n in ("initdb", "pg_ctl", "createdb"))
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL is not installed (no initdb / pg_ctl on PATH)")
    as_user = []
    folder = tempfile.mkdtemp(prefix="kit-pg-")
    data = os.path.join(folder, "data")
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        subprocess.run([*as_user, initdb, "-D", data, "-U", "kit", "--auth=trust"], check=True, capture_output=True)
        subprocess.run([*as_user, pg_ctl, "-D", data, "-l", os.path.join(folder, "log"), "-w", "-o",
                        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"], check=True,
                       capture_output=True)
        subprocess.run([*as_user, createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "kit", "sweeps"], check=True,
                       capture_output=True)
        yield f"postgresql://kit@127.0.0.1:{port}/sweeps"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_one_postgresql_study(prepared_root, tmp_path, postgres):
    two_workers_share(prepared_root, tmp_path, ["--storage", postgres], postgres, join_by_name=True)


@pytest.mark.slow
def test_a_trial_that_cannot_learn_is_pruned_and_the_best_config_reruns(prepared_root, tmp_path, capfd):
    """Trial 0 (LR 0.001) runs its 4 epochs (val top-1 0.33, 0.42, 0.55, 0.91); trial 1 (LR 0: it cannot learn) is
    pruned at its third evaluation, ending as an early stop does. (Optuna's median rule compares a trial's best
    value so far, and the LR-0 model, whose BatchNorm statistics still move, scores 0.42 at epoch 1, then 0.24 and
    0.36.) best_config.yaml reruns trial 0 to its val top-1 (deterministic mode)."""
    space = space_file(tmp_path, "lr: {choice: [0.001, 0.0]}\n")
    code, out, err = run_cli(sweep.cli, flags(prepared_root, tmp_path / "sw", space, "--prune_startup", "1", "--seed",
                                              "2", trials=2, epochs=4)[1:], capfd)
    assert code == 0, err[-2000:]
    study = study_of("sqlite:///" + str(tmp_path / "sw" / "cpu_smoke_space" / "study.db"), "cpu_smoke_space")
    good, bad = study.get_trials()
    assert (good.user_attrs["values"], bad.user_attrs["values"]) == ({"lr": 0.001}, {"lr": 0.0}), out[-2000:]
    assert good.state.name == "COMPLETE" and bad.state.name == "PRUNED"
    summary = json.load(open(os.path.join(bad.user_attrs["run_dir"], "summary.json")))
    assert summary["epochs_run"] == 3 and summary["early_stop"].startswith("pruned by the sweep (median) at epoch 3")
    assert json.load(open(os.path.join(good.user_attrs["run_dir"], "summary.json")))["epochs_run"] == 4
    torch.load(os.path.join(bad.user_attrs["run_dir"], "best.pth"), weights_only=True)  # a valid best.pth
    assert json.load(open(os.path.join(bad.user_attrs["run_dir"], "config.json")))["lr_fc"] == 0.0

    code, printed, err = run_cli(sweep.cli, ["--report", str(tmp_path / "sw" / "cpu_smoke_space")], capfd)
    assert code == 0 and "| 0 | complete | 0.001 |" in printed and "| 1 | pruned | 0 |" in printed, printed + err
    folder = tmp_path / "sw" / "cpu_smoke_space"
    for name in ("trials.md", "best_config.yaml", "importances.json", "history.png", "sweep.html"):
        assert (folder / name).is_file(), name
    html = (folder / "sweep.html").read_text()
    assert "http://" not in html and "https://" not in html and "src=\"data:image/png" in html
    best = best_config_is_the_trial(folder, good)
    assert best["data_root"] == os.path.abspath(prepared_root)  # said, so it never silently trains on other data
    result = training.main(*rerun(folder / "best_config.yaml", tmp_path / "rerun"))
    assert result["summary"]["best"]["val_top1"] == good.value

    # A sweep folder moved elsewhere reports from its own database (sweep.json names it relative to the folder).
    assert json.load(open(folder / "sweep.json"))["storage"] == "study.db"
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    shutil.rmtree(tmp_path / "sw")
    code, again, err = run_cli(sweep.cli, ["--report", str(moved)], capfd)
    assert code == 0 and again.splitlines()[:4] == printed.splitlines()[:4], again + err


def best_config_is_the_trial(folder, trial):
    """best_config.yaml resolves to exactly the trial's config.json in every setting that defines, watches or
    stops a run, and in its data root; returns its values."""
    import presets

    values = presets.load_config_file(str(folder / "best_config.yaml"))
    cfg = presets.resolve(None, config=values)
    ran = json.load(open(os.path.join(trial.user_attrs["run_dir"], "config.json")))
    keys = [*presets.of_kind(presets.RUN, presets.CONTROL), "data_root"]
    assert {k: cfg[k] for k in keys} == {k: ran[k] for k in keys}
    return values


def rerun(config, out_dir):
    import presets

    values = presets.load_config_file(str(config))
    return presets.resolve(None, {"out_dir": str(out_dir), "loader": "torch", "workers": 1, "report_page": False},
                           config=values), None


def wait_for_epochs(run_dir, epochs, proc):
    deadline = time.time() + 120
    while not (run_dir / "metrics.csv").is_file() or \
            len((run_dir / "metrics.csv").read_text().splitlines()) < epochs + 1:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)


@pytest.mark.slow
def test_a_stopped_then_killed_trial_continues_to_the_uninterrupted_weights(prepared_root, tmp_path):
    """SIGTERM after epoch 1: the worker stops after the run saves and the trial is queued; the next worker
    continues it and is SIGKILLed after epoch 2; a restarted worker finds the trial's heartbeat stale, continues the
    continuation and ends with the weights of a trial that ran straight through."""
    space = space_file(tmp_path)
    assert sweep.cli(flags(prepared_root, tmp_path / "straight", space, trials=1, epochs=4)[1:]) == 0
    cmd = flags(prepared_root, tmp_path / "sw", space, trials=1, epochs=4)
    run_dir = tmp_path / "sw" / "cpu_smoke_space" / "trial_0000"
    worker = start(cmd)
    wait_for_epochs(run_dir, 1, worker)
    worker.send_signal(signal.SIGTERM)
    out, _ = worker.communicate(timeout=120)
    assert worker.returncode != 0 and "it continues when a worker of study 'cpu_smoke_space' runs next" in out, out
    worker = start(cmd)
    wait_for_epochs(run_dir, 2, worker)
    worker.send_signal(signal.SIGKILL)
    out, _ = worker.communicate()
    assert "trial 1 continues trial 0 from " in out and not (run_dir / "summary.json").exists(), out[-2000:]
    out = finish(start(cmd))
    assert "trial 2 continues trial 1 from " in out and "resumed from " in out, out[-2000:]
    study = study_of("sqlite:///" + str(tmp_path / "sw" / "cpu_smoke_space" / "study.db"), "cpu_smoke_space")
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "FAIL", "COMPLETE"]
    code_rows = sweep_report.trial_rows(study)
    assert [r["state"] for r in code_rows] == ["continued by 1", "continued by 2", "complete"]
    # A continued trial's row shows how far it got itself, not its continuation's whole run.
    assert [r["epochs_run"] for r in code_rows] == [max(t.intermediate_values) for t in study.get_trials()[:2]] + [4]
    assert code_rows[0]["epochs_run"] < 4 and code_rows[0]["wall_time_s"] < code_rows[2]["wall_time_s"]
    assert sweep.cli(["--report", str(tmp_path / "sw" / "cpu_smoke_space")]) == 0
    best_config_is_the_trial(tmp_path / "sw" / "cpu_smoke_space", study.get_trials()[2])
    straight = tmp_path / "straight" / "cpu_smoke_space" / "trial_0000"
    a = torch.load(straight / "last.pth", map_location="cpu", weights_only=True)["model"]
    b = torch.load(run_dir / "last.pth", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert study.get_trials()[2].value == json.load(open(straight / "summary.json"))["best"]["value"]


@pytest.mark.parametrize("text, expected", [
    ("learning_rate: {uniform: [0.1, 0.2]}\n", "unknown setting in"),
    ("lr_fc: {uniform: [0.2, 0.1]}\n", "bad range [0.2, 0.1] for uniform"),
    ("lr_fc: {log_uniform: [0.0, 0.1]}\n", "both > 0"),
    ("lr_fc: {normal: [0.0, 0.1]}\n", "expected one of"),
    ("epochs: {uniform: [2, 8]}\n", "use int or choice"),
    ("trainable: {choice: [all, everything]}\n", "trainable"),
    ("data_root: {choice: [a, b]}\n", "give it as a flag of sweep.py"),
    ("monitor: {choice: [val_loss]}\n", "monitor decides what the study optimises and in which direction"),
    ("eval_every: {choice: [1, 2]}\n", "how a run is watched, saved and stopped"),
    ("[not, a, mapping]\n", "a space maps settings to distributions"),
])
def test_bad_space_files_are_one_line_errors(prepared_root, tmp_path, capfd, text, expected):
    space = space_file(tmp_path, text)
    code, out, err = run_cli(sweep.cli, flags(prepared_root, tmp_path / "sw", space)[1:], capfd)
    one_line_error(code, err, expected)
    assert not (tmp_path / "sw").exists()


@pytest.mark.slow
def test_storage_and_study_errors_are_one_line(prepared_root, tmp_path, capfd):
    space = space_file(tmp_path)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = run_cli(sweep.cli, flags(prepared_root, tmp_path / "sw", space, "--storage",
                                              f"postgresql://kit:secret@127.0.0.1:{port}/none")[1:], capfd)
    one_line_error(code, err, f"cannot use storage postgresql://kit@127.0.0.1:{port}/none")
    assert "secret" not in err
    db = "sqlite:///" + str(tmp_path / "shared.db")
    code, out, err = run_cli(sweep.cli, flags(prepared_root, tmp_path / "a", space, "--storage", db, "--study", "s",
                                              trials=1)[1:], capfd)
    assert code == 0, err
    other = space_file(tmp_path, "lr_fc: {log_uniform: [1.0e-3, 1.0e-2]}\n", "other.yaml")
    code, out, err = run_cli(sweep.cli, flags(prepared_root, tmp_path / "b", other, "--storage", db, "--study", "s",
                                              trials=1)[1:], capfd)
    one_line_error(code, err, "study 's' in sqlite:///")
    assert "exists with another space" in err
    code, out, err = run_cli(sweep.cli, flags(prepared_root, tmp_path / "a", other, "--study", "s", trials=1)[1:],
                             capfd)
    one_line_error(code, err, "holds another sweep")
    code, out, err = run_cli(sweep.cli, flags(str(tmp_path / "no_data"), tmp_path / "c", space, trials=1)[1:], capfd)
    one_line_error(code, err, "no prepared dataset at")
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_workers_started_together_on_a_new_database_all_open_it(tmp_path):
    """Four processes open one new SQLite study at once: they race to write the schema (IntegrityError, 'table
    already exists'); each loser retries and joins (this failed once in CI before the retry)."""
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import sweep, types\n"
            f"a = types.SimpleNamespace(storage='sqlite:///{tmp_path}/s.db', heartbeat=1, grace=3, study='s')\n"
            "sweep.open_study(a, {'exp': 'cpu_smoke', 'flags': {}, 'monitor': 'val_top1', 'space': {}, 'pruning': "
            "{'pruner': 'median', 'prune_startup': 2, 'prune_warmup': 0}, 'heartbeat': [1, 3]}, create=True)\n"
            "print('joined')")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 and out.strip().endswith("joined") for p, out in zip(procs, outs)), outs


def test_a_flag_that_a_sampled_shorthand_would_override_is_refused(prepared_root, tmp_path, capfd):
    """`lr` in the space sets lr_fc and lr_backbone for each trial: --lr_fc beside it is one of the two, said."""
    space = space_file(tmp_path, "lr: {log_uniform: [1.0e-4, 1.0e-3]}\n")
    code, out, err = run_cli(sweep.cli, flags(prepared_root, tmp_path / "sw", space, "--lr_fc", "0.05")[1:], capfd)
    one_line_error(code, err, "samples lr, and --lr_fc sets it for every trial: give one or the other")
    assert not (tmp_path / "sw").exists()


@pytest.mark.slow
def test_a_trial_that_crashes_fails_and_the_worker_goes_on(prepared_root, tmp_path, capfd, monkeypatch):
    """Any error inside a trial (here a library's RuntimeError in the first trial) fails that trial with its reason;
    the worker runs the next one, and the study ends with its trials."""
    real, calls = training.main, []

    def crashes_first(cfg, explicit=None, judge=None):
        calls.append(cfg["name"])
        if len(calls) == 1:
            raise RuntimeError("boom in a library")
        return real(cfg, explicit, judge=judge)

    monkeypatch.setattr(training, "main", crashes_first)
    space = space_file(tmp_path, "lr: {log_uniform: [1.0e-4, 1.0e-3]}\n")
    code, out, err = run_cli(sweep.cli, flags(prepared_root, tmp_path / "sw", space, trials=2)[1:], capfd)
    assert code == 0, err[-2000:]
    study = study_of("sqlite:///" + str(tmp_path / "sw" / "cpu_smoke_space" / "study.db"), "cpu_smoke_space")
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "COMPLETE"], out + err
    assert "trial 0 failed: RuntimeError: boom in a library" in err


@pytest.mark.slow
def test_a_run_config_file_defines_a_sweep_as_it_defines_a_run(trained_run, prepared_root, tmp_path, capfd):
    """A run's config.json (with its record keys split, world_size, ran_on and exp) beside --exp: the trial
    trains the file's settings under the space's values (`lr` beats the file's lr_fc and lr_backbone) and the
    flags; best_config.yaml resolves to the trial's settings."""
    space = space_file(tmp_path, "lr: {choice: [0.0007]}\n")
    config = os.path.join(trained_run["out_dir"], "config.json")
    code, out, err = run_cli(sweep.cli, flags(prepared_root, tmp_path / "sw", space, "--config", config, trials=1)[1:],
                             capfd)
    assert code == 0, err[-2000:]
    ran = json.load(open(tmp_path / "sw" / "cpu_smoke_space" / "trial_0000" / "config.json"))
    source = json.load(open(config))
    assert ran["lr_fc"] == ran["lr_backbone"] == 0.0007 != source["lr_fc"]  # the space's value beats the file
    assert ran["epochs"] == 1 != source["epochs"]  # a flag beats the file
    same = ("crop_scale_min", "label_smoothing", "seed", "warmup_epochs", "weight_decay")
    assert {k: ran[k] for k in same} == {k: source[k] for k in same}
    assert sweep.cli(["--report", str(tmp_path / "sw" / "cpu_smoke_space")]) == 0
    study = study_of("sqlite:///" + str(tmp_path / "sw" / "cpu_smoke_space" / "study.db"), "cpu_smoke_space")
    best_config_is_the_trial(tmp_path / "sw" / "cpu_smoke_space", study.get_trials()[0])
