"""engine: known-answer metrics, the LR schedule, EMA, early stopping, AMP choice, non-finite steps, the hot loop."""
import math

import pytest
import torch

import augment
import data_utils
import model_utils
import presets
from conftest import FixedBatches
from kit.base import devices, errors
from kit.data import sampling
from kit.training import checkpoint, engine, metrics

CPU = torch.device("cpu")


def test_split_metrics_known_answer():
    """Seven images over six classes, every figure computed by hand."""
    labels = torch.tensor([0, 0, 1, 2, 3, 3, 5])
    # Row i: the class order of image i's logits, most likely first (logits 6, 5, 4, ... down the order).
    orders = [[0, 1, 2, 3, 4, 5],   # correct
              [1, 0, 2, 3, 4, 5],   # top-1 wrong (1), top-5 right
              [1, 2, 3, 4, 5, 0],   # correct
              [0, 1, 3, 4, 5, 2],   # top-1 wrong (0); 2 is last: top-5 wrong
              [3, 0, 1, 2, 4, 5],   # correct
              [4, 0, 1, 2, 3, 5],   # top-1 wrong (4); 3 is fifth: top-5 right (top-4 would miss it)
              [5, 0, 1, 2, 3, 4]]   # correct
    logits = torch.zeros(7, 6)
    for i, order in enumerate(orders):
        logits[i, order] = torch.arange(6, 0, -1, dtype=torch.float32)
    m = metrics.split_metrics(logits, labels, 6)
    assert m["top1"] == pytest.approx(4 / 7)
    assert m["top5"] == pytest.approx(6 / 7)
    # support 2,1,1,2,0,1; correct 1,1,0,1,0,1 -> recall 1/2, 1, 0, 1/2, -, 1 (class 4 has no images: left out)
    assert m["support"] == [2, 1, 1, 2, 0, 1] and m["correct"] == [1, 1, 0, 1, 0, 1]
    assert m["recall"] == pytest.approx([0.5, 1.0, 0.0, 0.5, 0.0, 1.0])
    assert m["mean_class_acc"] == pytest.approx((0.5 + 1 + 0 + 0.5 + 1) / 5)
    # predicted 0: images 0,3 -> 2 predictions, 1 right; 1: images 1,2 -> 1 right; 3: image 4; 4: image 5; 5: image 6
    assert m["predicted"] == [2, 2, 0, 1, 1, 1]
    assert m["precision"] == pytest.approx([0.5, 0.5, 0.0, 1.0, 0.0, 1.0])
    expected = torch.zeros(6, 6, dtype=torch.long)
    for true, pred in [(0, 0), (0, 1), (1, 1), (2, 0), (3, 3), (3, 4), (5, 5)]:
        expected[true, pred] += 1
    assert torch.equal(m["confusion"], expected)
    log_softmax = torch.log_softmax(logits, 1)
    assert m["loss"] == pytest.approx(-log_softmax[torch.arange(7), labels].mean().item(), abs=1e-6)


def test_schedule_warms_up_then_decays():
    f = engine.lr_lambda(total_steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.0)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))
    late = engine.lr_lambda(100, 10, "cosine", 0.1, start_step=40)  # a stage unfrozen at step 40
    assert late(39) == 0.0 and late(40) == pytest.approx(0.1) and late(49) == pytest.approx(1.0)
    assert late(75) == pytest.approx(0.1 + 0.9 * 0.5) and late(100) == pytest.approx(0.1)
    linear = engine.lr_lambda(20, 0, "linear", 0.0)
    assert linear(10) == pytest.approx(0.5)
    constant = engine.lr_lambda(20, 0, "constant", 0.3)
    assert constant(0) == constant(19) == pytest.approx(1.0)
    with pytest.raises(errors.ConfigError, match="unknown schedule 'cosin': choose one of cosine, linear"):
        engine.lr_lambda(20, 0, "cosin", 0.0)  # never a silent constant LR


def test_every_registered_name_has_its_implementation():
    # A name a user can choose is one the code implements, and every implementation can be chosen: adding a
    # schedule or a loader without its registration line (or the other way round) fails here.
    assert tuple(engine.SCHEDULES) == presets.CHOICES["schedule"]
    assert ("auto", *data_utils.LOADERS) == presets.CHOICES["loader"]
    assert all(issubclass(cls, sampling.PlanPosition) for cls in data_utils.LOADERS.values())
    assert presets.CHOICES["monitor"] == tuple(f"val_{name}" for name in metrics.METRICS)
    assert presets.CHOICES["arch"] == model_utils.ARCHS and presets.CHOICES["trainable"] == tuple(model_utils.TRAINABLE)
    # split_metrics computes every metric the list names, and each is monitorable in its direction
    m = metrics.split_metrics(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]), 2)
    assert set(metrics.METRICS) <= set(m) and m["top1"] == 0.5
    stopper = engine.EarlyStopping("val_loss")
    assert stopper.step(1.0, 1)[0] and stopper.step(0.5, 2)[0] and not stopper.step(0.7, 3)[0]
    stopper = engine.EarlyStopping("val_top5")
    assert stopper.step(0.5, 1)[0] and not stopper.step(0.4, 2)[0] and stopper.step(0.6, 3)[0]


def test_metrics_rows_and_lines_round_trip():
    m = {"top1": 0.5, "top5": 0.75, "mean_class_acc": 0.25, "loss": 1.5, "images": 4, "support": [2, 2]}
    row = metrics.prefixed(m, "val")
    assert row == {"val_top1": 0.5, "val_top5": 0.75, "val_mean_class_acc": 0.25, "val_loss": 1.5, "val_images": 4}
    assert metrics.of_split({"epoch": 1, **row}, "val") == {"top1": 0.5, "top5": 0.75, "mean_class_acc": 0.25,
                                                             "loss": 1.5, "images": 4}
    assert metrics.of_split({"epoch": 1, "train_loss": 2.0}, "val") == {}
    assert metrics.describe(m) == "top-1 0.5000  top-5 0.7500  mean per-class 0.2500  loss 1.5000"


class FakeCuda:
    def __init__(self, capability):
        self.capability = capability

    def get_device_capability(self, device=None):
        return self.capability


@pytest.mark.parametrize("capability,expected", [((7, 5), (torch.float16, True)), ((7, 0), (torch.float16, True)),
                                                 ((8, 0), (torch.bfloat16, False)), ((9, 0), (torch.bfloat16, False))])
def test_amp_auto_picks_bf16_only_where_it_is_native(monkeypatch, capability, expected):
    # T4 (7.5) and V100 (7.0) report bf16 support (emulated): auto must choose fp16 with a GradScaler there.
    monkeypatch.setattr(torch.cuda, "get_device_capability", FakeCuda(capability).get_device_capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert devices.resolve_amp("auto", torch.device("cuda", 0)) == expected
    with pytest.raises(errors.ConfigError, match="fp16 needs CUDA"):
        devices.resolve_amp("fp16", CPU)


class FakeGpus:
    """Four visible CUDA devices, as far as the device choice can tell; set_device is recorded."""

    def __init__(self):
        self.current = 0

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "set_device", lambda index: setattr(self, "current", index))


def test_each_rank_and_its_dali_pipeline_use_cuda_local_rank(monkeypatch):
    from kit.data import dali_loader
    gpus = FakeGpus()
    gpus.install(monkeypatch)
    device = devices.resolve_device("cuda", local_rank=2)
    assert device == torch.device("cuda", 2) and gpus.current == 2
    # the pipeline follows the rank's GPU, whether the device names its index or not (not GPU 0 for every rank)
    assert dali_loader.dali_device_id(device) == 2 and dali_loader.dali_device_id(torch.device("cuda")) == 2
    assert devices.resolve_device("cuda:3") == torch.device("cuda", 3) and gpus.current == 3
    assert dali_loader.dali_device_id(CPU) is None
    with pytest.raises(errors.ConfigError, match="only 4 CUDA device"):
        devices.resolve_device("cuda:4")
    with pytest.raises(errors.ConfigError, match="CUDA_VISIBLE_DEVICES"):
        devices.resolve_device("cuda:1", local_rank=0)


def test_a_gpu_torch_cannot_use_is_said_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "nvidia_gpu_present", lambda: True)
    assert devices.resolve_device("auto") == CPU
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "NVIDIA GPU is present" in err and "driver" in err
    monkeypatch.setattr(devices, "nvidia_gpu_present", lambda: False)
    assert devices.resolve_device("auto") == CPU and capsys.readouterr().err == ""
    with pytest.raises(errors.ConfigError, match="no CUDA device is visible"):
        devices.resolve_device("cuda")


def test_auto_device_is_cuda_then_apples_mps_then_the_cpu(monkeypatch, capsys):
    """The order --device auto follows, with stubs for what this machine lacks; MPS has its own AMP choice (fp32
    unless asked) and never runs DALI."""
    mps = torch.device("mps")
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    FakeGpus().install(monkeypatch)
    assert devices.resolve_device("auto") == torch.device("cuda", 0)  # CUDA first, MPS or not
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto") == mps and devices.resolve_device("mps") == mps
    assert devices.resolve_device("auto", local_rank=0) == CPU  # torchrun ranks: CUDA or gloo on the CPU, not MPS
    assert devices.resolve_amp("auto", mps) == (None, False)
    assert devices.resolve_amp("bf16", mps) == (torch.bfloat16, False)
    with pytest.raises(errors.ConfigError, match="amp=fp16 needs CUDA; on mps use --amp bf16 or --amp off"):
        devices.resolve_amp("fp16", mps)
    assert data_utils.choose_loader("auto", mps) == ("torch", "DALI does not run on mps")
    with pytest.raises(data_utils.errors.DataError, match="DALI does not run on mps; use --loader torch"):
        data_utils.choose_loader("dali", mps)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert devices.resolve_device("auto") == CPU
    with pytest.raises(errors.ConfigError, match="device=mps but torch .* has no usable MPS backend here"):
        devices.resolve_device("mps")
    assert presets.resolve(overrides={"device": "mps"})["device"] == "mps"


def test_auto_loader_is_dali_where_it_imports_else_torch(monkeypatch):
    from kit.data import dali_loader

    assert data_utils.choose_loader("auto", CPU) == ("dali", f"DALI {dali_loader.VERSION} runs on cpu")
    assert data_utils.choose_loader("torch", CPU) == ("torch", "asked for")
    monkeypatch.setattr(dali_loader, "HAVE_DALI", False)
    name, why = data_utils.choose_loader("auto", CPU)
    assert name == "torch" and why == "DALI is not installed here (pip install nvidia-dali-cuda120: Linux wheels only)"
    assert data_utils.choose_loader("dali", CPU) == ("dali", "asked for")  # the loader itself says it is missing


def test_ema_is_the_hand_computed_average_including_batchnorm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = engine.ModelEma(model, decay=0.9, every=1, warmup=True)
    expected = {k: v.clone().double() for k, v in model.state_dict().items()}
    for n in range(4):
        model.train()
        model(torch.randn(8, 3))  # BatchNorm statistics move
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema.update(model)
        decay = min(0.9, (1 + n) / (10 + n))  # 0.1, 0.1818, 0.25, 0.3077: the warm-up copies the model at first
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                expected[k] = decay * expected[k] + (1 - decay) * v.double()
            else:
                expected[k] = v.clone()
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v.double(), expected[k], atol=1e-6), k
    assert ema.module.state_dict()["1.num_batches_tracked"] == 4
    plain = engine.ModelEma(model, decay=0.99, every=4, warmup=False)
    assert plain.current_decay() == pytest.approx(0.99 ** 4)
    assert plain.window_steps() == pytest.approx(4 / (1 - 0.99 ** 4))


def test_ema_state_round_trips():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = engine.ModelEma(model, 0.9)
    with torch.no_grad():
        model[0].weight.add_(2.0)
    ema.update(model)
    copy = engine.ModelEma(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)), 0.9)
    copy.load_state_dict(ema.state_dict())
    assert copy.updates == 1 and all(torch.equal(a, b) for a, b in zip(copy.module.state_dict().values(),
                                                                        ema.module.state_dict().values()))


def stop_epoch(values, monitor="val_top1", patience=3, min_delta=0.0):
    stopper = engine.EarlyStopping(monitor, patience, min_delta)
    for epoch, value in enumerate(values, 1):
        _, stop = stopper.step(value, epoch)
        if stop:
            return epoch, stopper
    return None, stopper


def test_early_stopping_scripted_sequences():
    epoch, s = stop_epoch([0.5, 0.6, 0.6, 0.59, 0.58])  # patience 3: three evaluations without a new best
    assert epoch == 5 and s.best_epoch == 2 and "did not improve" in s.reason
    epoch, s = stop_epoch([0.5, 0.6, 0.6, 0.59, 0.61, 0.55])  # 0.61 arrives after two misses: the count restarts
    assert epoch is None and s.best_epoch == 5 and s.wait == 1
    epoch, s = stop_epoch([0.5, 0.505, 0.509, 0.52], min_delta=0.01)  # 0.505 and 0.509 are not enough
    assert epoch is None and s.best == 0.52 and s.best_epoch == 4
    epoch, _ = stop_epoch([0.5, 0.505, 0.509, 0.51], min_delta=0.01)
    assert epoch == 4
    epoch, s = stop_epoch([1.0, 0.8, 0.9, 0.85, 0.81], monitor="val_loss")  # loss: lower is better
    assert epoch == 5 and s.best == 0.8
    epoch, s = stop_epoch([0.5, float("nan")])
    assert epoch == 2 and "nan" in s.reason
    epoch, s = stop_epoch([0.5, float("nan"), 0.6], patience=0)  # no early stopping: NaN is only never best
    assert epoch is None and s.best == 0.6


def test_early_stopping_resumes_where_it_was():
    full, _ = stop_epoch([0.5, 0.6, 0.55, 0.58, 0.57])
    first = engine.EarlyStopping("val_top1", 3)
    for epoch, value in enumerate([0.5, 0.6, 0.55], 1):
        first.step(value, epoch)
    second = engine.EarlyStopping("val_top1", 3)
    second.load_state_dict(first.state_dict())
    assert second.step(0.58, 4) == (False, False) and second.step(0.57, 5) == (False, True)
    assert full == 5


BF16_DATA = sampling.DataSettings(img_size=32, dtype=torch.bfloat16, workers=1)


def epoch_parts(model, loader, optimizer, scheduler, mixer, ema=None):
    """The checkpoint.Parts train_one_epoch steps: float32 weights, no GradScaler."""
    return checkpoint.Parts(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), mixer, loader,
                            ema)


def nan_steps_cfg(**kw):
    cfg = dict(grad_clip=0.0, log_every=1, progress=False, max_bad_steps=2, frozen_bn="eval")
    cfg.update(kw)
    return cfg


class PoisonedLoader:
    """Batches whose images turn the loss non-finite at the given steps (1-based)."""

    def __init__(self, bad, steps=6):
        self.bad, self.steps = bad, steps
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(steps, 4, 3, 32, 32, generator=g)

    def __len__(self):
        return self.steps

    def __iter__(self):
        for i in range(self.steps):
            images = self.images[i].clone()
            if i + 1 in self.bad:
                images[0, 0, 0, 0] = float("inf")
            yield images.contiguous(memory_format=torch.channels_last), torch.tensor([0, 1, 2, 0])


def run_poisoned(bad):
    torch.manual_seed(0)
    model = model_utils.get_model(num_classes=3).to(memory_format=torch.channels_last)
    optimizer = engine.build_optimizer(model_utils.param_groups(model, 1e-3, 1e-3, 0.0), {"optimizer": "adamw",
                                                                                        "momentum": 0.9})
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return engine.train_one_epoch(epoch_parts(model, PoisonedLoader(bad), optimizer, scheduler,
                                              augment.MixupCutmix(3, seed=0)), None, nan_steps_cfg(), 1), model


def test_interleaved_non_finite_steps_do_not_stop_but_consecutive_ones_do():
    stats, model = run_poisoned({1, 3, 5})  # max_bad_steps 2: never two in a row
    assert stats["skipped_steps"] == 3 and stats["completed"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(errors.TrainingError, match="2 non-finite losses in a row"):
        run_poisoned({3, 4})


def test_step_runs_channels_last_under_bf16_autocast(prepared_root):
    model = model_utils.get_model(num_classes=3).to(memory_format=torch.channels_last)
    seen = []
    model.conv1.register_forward_hook(lambda m, inp, out: seen.append(
        (inp[0].is_contiguous(memory_format=torch.channels_last), torch.is_autocast_enabled("cpu"),
         torch.get_autocast_dtype("cpu"), out.dtype)))
    optimizer = torch.optim.AdamW(model_utils.param_groups(model, 1e-3, 1e-3, 0.0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    loader = data_utils.build_loader(prepared_root, "train", 4, CPU, BF16_DATA)
    stats = engine.train_one_epoch(epoch_parts(model, loader, optimizer, scheduler, augment.MixupCutmix(3, 0.2, 1.0,
                                                                                                      seed=0)),
                                   torch.bfloat16, nan_steps_cfg(), 1)
    assert seen and all(s == (True, True, torch.bfloat16, torch.bfloat16) for s in seen)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert stats["train_images_per_s"] > 0 and math.isfinite(stats["train_loss"])


def test_no_device_reads_between_log_points(prepared_root, monkeypatch):
    # Every way a tensor's value can reach the host, counted: the count must not grow with the number of steps.
    cfg = nan_steps_cfg(log_every=10 ** 6)
    batches = list(data_utils.build_loader(prepared_root, "train", 4, CPU, BF16_DATA))
    reads = []
    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (
            reads.append(_n), _o(self, *a, **k))[1])

    def count(steps):
        model = model_utils.get_model(num_classes=3).to(memory_format=torch.channels_last)
        optimizer = engine.build_optimizer(model_utils.param_groups(model, 1e-3, 1e-3, 0.0),
                                           {"optimizer": "adamw", "momentum": 0.9})
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        ema = engine.ModelEma(model, 0.9)
        reads.clear()
        engine.train_one_epoch(epoch_parts(model, FixedBatches(batches, steps), optimizer, scheduler,
                                           augment.MixupCutmix(3, 0.2, 1.0, seed=0), ema), torch.bfloat16, cfg, 1)
        return len(reads)

    assert count(2) == count(6)  # reads happen at the (single, final) log point only


@pytest.mark.slow
def test_lr_finder_restores_everything_and_stops_on_divergence(prepared_root, tmp_path):
    import find_lr
    from conftest import tiny_cfg

    cfg = tiny_cfg(prepared_root, tmp_path, lr_fc=0.01, lr_backbone=0.001)
    model, optimizer, _ = engine.build_model(cfg, 3, CPU)
    loader = data_utils.build_loader(prepared_root, "train", 4, CPU, BF16_DATA)
    # One real step first, so the optimizer has state to restore.
    engine.train_step(model, *next(iter(loader)), optimizer, torch.amp.GradScaler("cpu", enabled=False),
                      augment.MixupCutmix(3, seed=0), torch.bfloat16)
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    before_opt = optimizer.state_dict()
    before_opt = {"state": {k: {n: t.clone() for n, t in v.items()} for k, v in before_opt["state"].items()},
                  "lrs": [g["lr"] for g in optimizer.param_groups]}
    records = find_lr.lr_find(model, loader, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                              augment.MixupCutmix(3, seed=0), torch.bfloat16, cfg, start=1e-4, end=1e4, steps=60)
    assert all(torch.equal(v, before_model[k]) for k, v in model.state_dict().items())  # BN buffers included
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(after[k][n], t) for k, v in before_opt["state"].items() for n, t in v.items())
    assert [g["lr"] for g in optimizer.param_groups] == before_opt["lrs"]
    # Up to 1e4 x the peak LR the loss explodes: the sweep stops at 4x its minimum, before the end.
    assert 3 <= len(records) < 60 and records[-1][2] > 4 * min(r[2] for r in records[:-1])
    mults = [r[0] for r in records]
    assert mults[0] == pytest.approx(1e-4) and mults[1] / mults[0] == pytest.approx((1e8) ** (1 / 59))
    found = find_lr.suggestions(records)
    assert set(found) == {"steepest", "minimum/10"} and all(mults[0] / 10 <= v <= mults[-1] for v in found.values())
    lowest = min(records, key=lambda r: r[2])[0]
    assert found["minimum/10"] == pytest.approx(lowest / 10)


def test_lr_finder_cli_writes_plot_and_table(prepared_root, tmp_path, capfd):
    import find_lr
    from conftest import run_cli, tiny_argv

    code, out, _ = run_cli(find_lr.cli, tiny_argv(prepared_root, tmp_path, "--steps", "12"), capfd)
    assert code == 0 and "suggestion (steepest): multiplier" in out and "head_decay" in out
    folder = tmp_path / "cpu_smoke_lr_find"
    assert (folder / "lr_find.png").stat().st_size > 1000
    lines = (folder / "lr_find.csv").read_text().splitlines()
    assert lines[0].startswith("multiplier,lr_backbone_decay") and len(lines) >= 4


def test_time_to_reach_known_answer():
    rows = [{"epoch": 1, "wall_time_s": 10.0, "train_loss": 3.0},  # not evaluated
            {"epoch": 2, "wall_time_s": 25.0, "val_top1": 0.40, "val_loss": 2.0},
            {"epoch": 3, "wall_time_s": 40.0, "val_top1": 0.35, "val_loss": 2.2},  # worse: no record
            {"epoch": 4, "wall_time_s": 55.0, "val_top1": 0.40, "val_loss": 1.9},  # equal: first reached at 2
            {"epoch": 5, "wall_time_s": 70.0, "val_top1": 0.62, "val_loss": 1.5},
            {"epoch": 6, "wall_time_s": 85.0, "val_top1": float("nan"), "val_loss": float("nan")}]
    assert metrics.time_to_reach(rows) == [{"val_top1": 0.40, "epoch": 2, "wall_time_s": 25.0},
                                           {"val_top1": 0.62, "epoch": 5, "wall_time_s": 70.0}]
    assert [r["epoch"] for r in metrics.time_to_reach(rows, "val_loss")] == [2, 4, 5]  # lower is better
    assert metrics.describe_time_to_reach(metrics.time_to_reach(rows)) == \
        "val_top1 first reached 0.4000 at 0.4 min (epoch 2), 0.6200 at 1.2 min (epoch 5)"
