"""Progressive resizing: the train-resolution schedule (sizes per epoch for a few specs, worked out by hand), a
preset's schedule under overrides, every loader giving the scheduled size from the same crop boxes, torch.compile
taking one static graph per size, and the duration estimate and ETA weighting epochs by their pixels. Exact
mid-ramp resume is in test_train.py (every loader), equal DDP steps across a size change in test_ddp.py."""
import time

import pytest
import torch

import data_utils
import presets
import train_caltech101 as train
from conftest import one_line_error, run_cli, tiny_argv
from kit.base import devices
from kit.data import sampling, splits
from kit.reporting import run_report
from kit.settings import resolution
from kit.training import engine

CPU = torch.device("cpu")


def sizes(img_size, epochs, start=0, ramp=None, step=16):
    return resolution.train_sizes(dict(presets.DEFAULTS, img_size=img_size, epochs=epochs, img_size_start=start,
                                    img_size_ramp=ramp, img_size_step=step))


@pytest.mark.parametrize("spec,expected", [
    # No start: img_size throughout.
    ((96, 5), [96] * 5),
    # Up to epoch 8 at 64; epoch e of 9-23 at 64 + 32 (e - 8) / 16 rounded down to 16s (80 from e = 16); 96 from 24.
    ((96, 32, 64, "8,24"), [64] * 15 + [80] * 8 + [96] * 9),
    # The default ramp is a quarter to three quarters of the run: 8,24 for 32 epochs.
    ((96, 32, 64), [64] * 15 + [80] * 8 + [96] * 9),
    # 128 + 96 (e - 2) / 4 rounded down to 32s: 152 -> 128, 176 -> 160, 200 -> 192; 224 from epoch 6.
    ((224, 8, 128, "2,6", 32), [128, 128, 128, 160, 192, 224, 224, 224]),
    # A start off the step's grid: 72 + 24 e / 3 = 80, 88 -> 80; then 96.
    ((96, 4, 72, "0,3"), [80, 80, 96, 96]),
    # Too short for the default ramp (a quarter to three quarters of 1 epoch: 0, 0): the final size.
    ((96, 1, 64), [96]),
    ((96, 3, 64), [80, 96, 96]),  # A = 3 // 4 = 0, B = 9 // 4 = 2: epoch 1 at 64 + 32 / 2
])
def test_sizes_per_epoch(spec, expected):
    assert sizes(*spec) == expected


def test_the_schedule_is_described_by_epoch_spans():
    assert resolution.describe_sizes([64] * 15 + [80] * 8 + [96] * 9) == \
        "64 px epochs 1-15, 80 px epochs 16-23, 96 px epochs 24-32"
    assert resolution.describe_sizes([80, 96]) == "80 px epoch 1, 96 px epoch 2"


def test_a_presets_schedule_gives_way_to_overrides(capfd, tmp_path):
    """cpu_smoke ramps 64 -> 96 px over the middle half of its epochs: other epochs keep the shares, another
    img_size drops the schedule with one note, an explicit ramp from a config file scales with --epochs."""
    assert resolution.train_sizes(presets.resolve("cpu_smoke")) == [64] * 15 + [80] * 8 + [96] * 9
    assert resolution.train_sizes(presets.resolve("cpu_smoke", {"epochs": 16})) == [64] * 7 + [80] * 4 + [96] * 5
    capfd.readouterr()
    cfg = presets.resolve("cpu_smoke", {"img_size": 32, "epochs": 1})
    assert (cfg["img_size_start"], resolution.train_sizes(cfg)) == (0, [32])
    out = capfd.readouterr().out
    assert out.count("\n") == 1 and "preset cpu_smoke's resolution schedule (img_size_start 64) dropped" in out
    config = tmp_path / "ramp.yaml"
    config.write_text("img_size_start: 64\nimg_size_ramp: 8,24\n")
    cfg = presets.resolve("cpu_smoke", {"epochs": 16}, config=str(config))
    assert cfg["img_size_ramp"] == "4,12" and resolution.train_sizes(cfg) == [64] * 7 + [80] * 4 + [96] * 5
    # Given on the command line, the schedule is the user's: it is checked, not adapted.
    cfg = presets.resolve("cpu_smoke", {"img_size": 128, "img_size_start": 64, "img_size_ramp": "1,3", "epochs": 4})
    assert resolution.train_sizes(cfg) == [64, 96, 128, 128]


@pytest.mark.parametrize("flags,expected", [
    (["--img_size_start", "32"], "img_size_start must be >= 32 and below img_size 32"),
    (["--img_size", "64", "--img_size_start", "16"], "img_size_start must be >= 32"),
    (["--img_size", "64", "--img_size_start", "32", "--img_size_ramp", "2,9"], "needs 0 <= A < B <= epochs (2)"),
    (["--img_size", "64", "--img_size_start", "32", "--img_size_ramp", "two"], "expected two epochs 'A,B'"),
    (["--img_size_start", "0", "--img_size_ramp", "0,1"], "img_size_ramp='0,1' needs img_size_start"),
    (["--img_size_step", "0"], "img_size_step must be > 0"),
])
def test_bad_schedules_are_one_line_errors(prepared_root, tmp_path, capfd, flags, expected):
    code, _, err = run_cli(train.cli, tiny_argv(prepared_root, tmp_path, *flags), capfd)
    one_line_error(code, err, expected)


@pytest.mark.parametrize("kind", [("dali", False), ("torch", False), ("dali", True)])
def test_every_loader_gives_the_scheduled_size_from_the_same_crops(prepared_root, kind):
    """Epochs 0-3 of a [32, 40, 48] schedule come out at 32, 40, 48, 48 px (the stream runs past the schedule at
    its last size), each one the crops an unscheduled loader at that size cuts: the boxes stay, the size moves."""
    files, labels = splits.read_split(prepared_root, "train")
    root = splits.image_root(prepared_root)

    def loader(img_size, out_sizes=None):
        data = sampling.DataSettings(img_size=img_size, loader=kind[0], cache=kind[1], workers=1, seed=3,
                                     out_sizes=out_sizes or ())
        return data_utils.loader_over(root, files, labels, 5, CPU, data)

    scheduled = loader(48, [32, 40, 48])
    for epoch, size in enumerate([32, 40, 48, 48]):
        images = torch.cat([batch for batch, _ in scheduled])
        assert images.shape[1:] == (3, size, size), (epoch, images.shape)
        plain = loader(size)
        plain.load_state_dict({"epoch": epoch, "batches_done": 0})
        expected = torch.cat([batch for batch, _ in plain])
        if kind[1]:  # the cache's pyramid has a level more for the schedule's smallest size: its filters differ
            assert (images - expected).abs().mean() < 0.03, epoch
        else:
            assert torch.equal(images, expected), epoch


def test_compile_takes_one_static_graph_per_size(monkeypatch):
    """Four calls at 32, 48, 40 and 32 px: three graphs, each for fixed shapes (by default the second size would
    turn into one dynamic-shape graph that serves the third too), and room for every size of a long schedule."""
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append([tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)])
        return graph.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kw: real(model, backend=counting_backend, **kw))
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
    cfg = dict(presets.DEFAULTS, img_size=224, img_size_start=64, img_size_ramp="0,20", img_size_step=16,
               epochs=24, compile=True)
    assert len(set(resolution.train_sizes(cfg))) == 11  # 64, 80, ..., 224
    with torch._dynamo.config.patch(recompile_limit=8):  # torch's default; restored after
        step_model = engine.step_model_for(model, cfg, CPU, world=1)
        assert torch._dynamo.config.recompile_limit >= 12  # 11 train sizes and evaluation's
        for size in (32, 48, 40, 32):
            step_model(torch.zeros(2, 3, size, size))
    assert len(graphs) == 3
    assert all(isinstance(d, int) for shapes in graphs for shape in shapes for d in shape)
    torch._dynamo.reset()


def test_the_estimate_and_the_eta_weigh_epochs_by_their_pixels(monkeypatch):
    """A step costs 1e-4 s per pixel (stubbed timing): cpu_smoke's 15 epochs at 64, 8 at 80 and 9 at 96 px with 10
    steps each take 10 * 1e-4 * (15 * 64**2 + 8 * 80**2 + 9 * 96**2) = 195.584 s, against 294.912 s at 96 px
    throughout. ETA after epoch 1 (64 px) took 30 s: 16 s training, 10 s evaluating, 4 s else: the 31 epochs left
    train (14 * 4096 + 8 * 6400 + 9 * 9216) / 4096 = 46.75 times as long (748 s), evaluate 8 times (epochs 4, 8, ...,
    32: 80 s) and spend 4 s each else (124 s): 952 s, printed as 16 min."""
    monkeypatch.setattr(run_report, "time_step", lambda probe, images, *a: 1e-4 * images.shape[-1] ** 2)
    cfg = presets.resolve("cpu_smoke", {"eval_every": 32})
    lines = []
    model = torch.nn.Linear(2, 2)
    rt = devices.Runtime(CPU, None, False, batch=8, eval_batch=8)
    total = run_report.estimate_duration(cfg, rt, model, 10, 0, lines.append)
    assert total == pytest.approx(195.584)
    plain = run_report.estimate_duration(dict(cfg, img_size_start=0), rt, model, 10, 0, lines.append)
    assert plain == pytest.approx(294.912)
    cfg = presets.resolve("cpu_smoke")
    row = {"epoch": 1, "train_time_s": 16.0, "val_images": 100, "val_images_per_s": 10.0, "wall_time_s": 30.0}
    assert run_report.eta_seconds(cfg, 1, [row], 1, 30.0) == pytest.approx(952.0)
    stats = {"train_loss": 1.0, "train_acc": 0.5, "train_images_per_s": 100.0}
    line = run_report.epoch_line(cfg, 1, stats, {"wall_time_s": 30.0}, None, None, time.perf_counter() - 30.0,
                                 {"next_epoch": 1, "rows": [row]})
    assert line.endswith("ETA 16 min"), line
