"""Any machine: --loader auto without DALI (as on macOS and Windows), the torch loader under the `spawn` start
method (their default), and folders and classes with spaces and non-ASCII names through every step."""
import json
import multiprocessing
import shutil

import numpy as np
import pytest
import torch

import data_utils
import download
import export
import predict
import train_caltech101 as train
from conftest import make_image, one_line_error, run_cli, stopped_run, tiny_argv, tiny_cfg
from kit.data import dali_loader, sampling, splits


@pytest.mark.slow
def test_without_dali_auto_trains_with_the_torch_loader_and_says_why(prepared_root, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(dali_loader, "HAVE_DALI", False)
    code, out, err = run_cli(train.cli, tiny_argv(prepared_root, tmp_path, epochs=1), capfd)
    assert code == 0, err
    assert "loader auto: torch, since DALI is not installed here (pip install nvidia-dali-cuda120" in out
    assert "loader torch" in out  # the start-up line of what runs
    assert json.load(open(tmp_path / "cpu_smoke" / "config.json"))["loader"] == "torch"  # what ran is recorded
    code, _, err = run_cli(train.cli, tiny_argv(prepared_root, tmp_path / "b", "--loader", "dali", epochs=1), capfd)
    one_line_error(code, err, "DALI is not installed (pip install nvidia-dali-cuda120: Linux wheels only): use "
                              "--loader torch or auto")


def torch_epoch(prepared_root, method):
    """One epoch's batches of the torch loader with 2 worker processes started by `method`."""
    files, labels = splits.read_split(prepared_root, "train")
    data = sampling.DataSettings(img_size=32, seed=3, workers=2)
    plan = sampling.SamplePlan(len(files), 5, True, data, sizes=splits.image_sizes(splits.image_root(prepared_root),
                                                                                  files))
    previous = multiprocessing.get_start_method()
    torch.multiprocessing.set_start_method(method, force=True)
    try:
        loader = data_utils.TorchLoader(splits.image_root(prepared_root), files, labels, plan, torch.device("cpu"),
                                        data)
        batches = list(loader)
        del loader
        return batches
    finally:
        torch.multiprocessing.set_start_method(previous, force=True)


@pytest.mark.slow
def test_the_torch_loader_works_under_spawn(prepared_root):
    """spawn (macOS's and Windows' default) pickles the dataset into fresh interpreters that import the kit anew:
    one epoch with 2 workers gives the same batches as fork."""
    spawned, forked = torch_epoch(prepared_root, "spawn"), torch_epoch(prepared_root, "fork")
    assert len(spawned) == len(forked) > 1
    assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(spawned, forked))


@pytest.mark.slow
def test_spaces_and_non_ascii_names_through_every_step(tmp_path, capfd):
    """Class folders named `café` and `São Paulo` in a folder and a data root whose paths have spaces and accents:
    prepared, read by every loader, trained on, predicted and exported, the names intact in classes.txt, the
    prediction and preprocess.json."""
    rng = np.random.default_rng(0)
    source = tmp_path / "my photos ü"
    colours = {"café": (200, 60, 60), "São Paulo": (60, 60, 200), "plain": (60, 200, 60)}
    for name, colour in colours.items():
        (source / name).mkdir(parents=True)
        for i in range(6):
            make_image(colour, rng).save(source / name / f"foto {i} ñ.jpg")
    data_root = tmp_path / "data root é"
    code, out, err = run_cli(download.cli, ["--folder", str(source), "--data_root", str(data_root),
                                            "--train_per_class", "4"], capfd)
    assert code == 0, err
    assert splits.read_classes(str(data_root)) == sorted(colours)
    for loader, cache in (("dali", False), ("torch", False), ("dali", True)):
        for split in ("train", "val"):
            batches = data_utils.build_loader(str(data_root), split, 4, torch.device("cpu"), sampling.DataSettings(
                img_size=32, loader=loader, cache=cache, workers=1))
            assert sum(len(labels) for _, labels in batches) == (12 if split == "train" else 6)
    runs = tmp_path / "runs ø"
    argv = tiny_argv(str(data_root), runs, epochs=1)
    code, out, err = run_cli(train.cli, argv, capfd)
    assert code == 0, err
    run_dir = runs / "cpu_smoke"
    assert open(run_dir / "classes.txt", encoding="utf-8").read().split("\n")[:3] == sorted(colours)
    image = source / "São Paulo" / "foto 5 ñ.jpg"
    code, out, err = run_cli(predict.cli, [str(image), "--checkpoint", str(run_dir), "--topk", "3",
                                           "--json", str(tmp_path / "pred é.json")], capfd)
    assert code == 0, err
    assert str(image) in out
    predicted = json.load(open(tmp_path / "pred é.json", encoding="utf-8"))
    assert sorted(p["class"] for p in predicted["results"][0]["topk"]) == sorted(colours)
    code, _, err = run_cli(export.cli, ["--checkpoint", str(run_dir), "--check_images", "0"], capfd)
    assert code == 0, err
    spec = json.load(open(run_dir / "export" / "preprocess.json", encoding="utf-8"))
    assert spec["classes"] == sorted(colours)


@pytest.mark.slow
def test_a_dali_run_resumes_on_a_machine_without_dali(prepared_root, tmp_path, monkeypatch, capfd):
    """The loader is how a machine reads images, not what the run is: a run stopped in epoch 2 with DALI resumes
    where DALI is missing, with --loader torch and with --loader auto, saying so in one line, and finishes."""
    stopped = stopped_run(tiny_cfg(prepared_root, tmp_path / "runs", loader="dali", epochs=2), 4, monkeypatch)
    assert stopped["exit_code"] != 0
    monkeypatch.setattr(dali_loader, "HAVE_DALI", False)
    for asked in ("torch", "auto"):
        run = tmp_path / asked
        shutil.copytree(stopped["out_dir"], run)
        argv = tiny_argv(prepared_root, tmp_path / "runs", "--resume", str(run / "last.pth"), "--loader", asked)
        code, out, err = run_cli(train.cli, argv, capfd)
        assert code == 0, err
        assert "note (resume): this run was trained with the dali loader and continues with torch: the same images" \
            in out
        assert json.load(open(run / "summary.json"))["epochs_run"] == 2
        assert json.load(open(run / "config.json"))["loader"] == "torch"
