"""The GPU acceptance suite: run it first on a machine with a GPU (`pytest -m gpu`, a few minutes), before a long
run. Without CUDA every test here is skipped with the reason; the CPU suite covers the same logic on CPU operators.

What passes means: DALI's mixed (nvJPEG) pipelines give model-ready batches on the GPU that agree with the CPU
pipeline; their position resumes exactly; real training runs in bf16 (where native) and fp16 + GradScaler, and
with --cache, writing every output; the README's snippet loads the result; a --cache batch is a fixed number of
kernels; no host-device synchronisation happens between log points.
"""
import os
import warnings

import pytest
import torch

import augment
import data_utils
import model_utils
from conftest import CountOps, FixedBatches, tiny_cfg
from kit.base import devices
from kit.data import cache_loader, dali_loader, sampling, splits
from kit.training import checkpoint, engine, training

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device (this is the GPU suite: pytest -m gpu)")]
GPU = torch.device("cuda", 0) if torch.cuda.is_available() else None
CPU = torch.device("cpu")
MEAN = torch.tensor(splits.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(splits.IMAGENET_STD).view(1, 3, 1, 1)


def gpu_data(**settings):
    return sampling.DataSettings(**{**dict(img_size=64, loader="dali", workers=2), **settings})


def epoch_of(loader):
    images, labels = zip(*[(x.float().cpu(), y.cpu()) for x, y in loader])
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("split", ["train", "val"])
def test_mixed_pipeline_batches_are_model_ready_on_the_gpu(prepared_root, split):
    loader = data_utils.build_loader(prepared_root, split, 5, GPU, gpu_data(dtype=torch.float16))
    images, labels = next(iter(loader))
    assert images.device == GPU and labels.device == GPU and images.dtype == torch.float16
    assert images.shape == (5, 3, 64, 64) and images.is_contiguous(memory_format=torch.channels_last)
    pixels = images.float().cpu() * STD + MEAN
    assert pixels.min() >= -0.02 and pixels.max() <= 1.02 and pixels.std() > 0.05


def test_mixed_val_agrees_with_the_cpu_pipeline(prepared_root):
    """nvJPEG with fancy chroma upsampling (set on both decoders) against libjpeg-turbo: the same images in the same
    order; pixels within 0.03 mean (normalised units, about 2 grey levels: IDCT and resize rounding differ)."""
    gpu = epoch_of(data_utils.build_loader(prepared_root, "val", 8, GPU, gpu_data()))
    cpu = epoch_of(data_utils.build_loader(prepared_root, "val", 8, CPU, gpu_data()))
    assert torch.equal(gpu[1], cpu[1])
    assert (gpu[0] - cpu[0]).abs().mean() < 0.03


def test_mixed_pipeline_resumes_exactly(prepared_root):
    # hw_decoder_load=0: the A100/H100 hardware decoder's share of images must not differ between the two runs.
    first = data_utils.build_loader(prepared_root, "train", 3, GPU, gpu_data(hw_decoder_load=0.0))
    epoch_of(first)
    stream = iter(first)
    next(stream)
    state = first.state_dict()
    expected = [(x.cpu(), y.cpu()) for x, y in list(stream) + list(first)]
    resumed = data_utils.build_loader(prepared_root, "train", 3, GPU, gpu_data(hw_decoder_load=0.0))
    resumed.load_state_dict(state)
    got = [(x.cpu(), y.cpu()) for x, y in list(resumed) + list(resumed)]
    assert len(got) == len(expected) and all(torch.equal(a, b) and torch.equal(c, d)
                                             for (a, c), (b, d) in zip(got, expected))


AMP_MODES = ["fp16"] + (["bf16"] if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
                        else [])


@pytest.mark.parametrize("amp,cache", [(mode, False) for mode in AMP_MODES] + [("auto", True)])
def test_a_short_run_on_the_gpu_writes_every_output(prepared_root, tmp_path, amp, cache):
    result = training.main(tiny_cfg(prepared_root, tmp_path, device="cuda", amp=amp, cache=cache, epochs=2,
                                 workers=2))
    run_dir = result["out_dir"]
    for name in ("best.pth", "best_loss.pth", "last.pth", "config.json", "metrics.csv", "summary.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert all(r["gpu_peak_mem_gib"] > 0 for r in result["rows"])
    model = model_utils.get_model(num_classes=3, pretrained=False)  # the README's snippet
    model.load_state_dict(torch.load(os.path.join(run_dir, "best.pth"), map_location="cpu"))
    last = torch.load(os.path.join(run_dir, "last.pth"), map_location="cpu", weights_only=True)
    assert last["scaler"]["scale"] > 0 if amp == "fp16" else True


def test_amp_auto_follows_the_compute_capability():
    dtype, scaler = devices.resolve_amp("auto", GPU)
    native = torch.cuda.get_device_capability() >= (8, 0)
    assert (dtype, scaler) == ((torch.bfloat16, False) if native else (torch.float16, True))


def test_a_cache_batch_is_a_fixed_number_of_kernels_on_the_gpu(prepared_root):
    files, labels = splits.read_split(prepared_root, "train")
    root = splits.image_root(prepared_root)
    counts = []
    for batch in (2, 8):
        data = gpu_data(cache=True, dtype=torch.bfloat16)
        plan = sampling.SamplePlan(len(files), batch, True, data, sizes=splits.image_sizes(root, files))
        cache = cache_loader.CacheLoader(root, files, labels, plan, GPU, data)
        step = next(plan.epoch(0))
        with CountOps() as mode:
            images, _ = cache.train_batch(step, cache.img_size)
        torch.cuda.synchronize()
        assert images.shape[0] == batch and images.device == GPU
        counts.append(mode.ops)
    assert counts[0] == counts[1]


def test_no_host_device_sync_between_log_points(prepared_root):
    """torch's sync debug mode warns on every synchronising call it sees (.item(), .cpu(), nonzero, ...): their
    number must not grow with the number of steps between log points."""
    batches = list(data_utils.build_loader(prepared_root, "train", 4, GPU, gpu_data(dtype=torch.bfloat16)))

    def syncs(steps):
        model = model_utils.get_model(num_classes=3).to(GPU, memory_format=torch.channels_last)
        optimizer = engine.build_optimizer(model_utils.param_groups(model, 1e-3, 1e-3, 0.0),
                                           {"optimizer": "adamw", "momentum": 0.9})
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        cfg = dict(grad_clip=0.0, log_every=10 ** 6, progress=False, max_bad_steps=10, frozen_bn="eval")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                parts = checkpoint.Parts(model, optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=False),
                                         augment.MixupCutmix(3, 0.2, 1.0, seed=0), FixedBatches(batches, steps))
                engine.train_one_epoch(parts, torch.bfloat16, cfg, 1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return len([w for w in caught if "synchroniz" in str(w.message).lower()])

    torch.backends.cudnn.benchmark = False  # an earlier run turns autotuning on; its first shapes would differ
    syncs(1)  # warm-up: allocator and kernel selection
    assert syncs(2) == syncs(8)


def test_the_decode_pass_releases_dali_memory(prepared_root):
    files, _ = splits.read_split(prepared_root, "val")
    arrays = cache_loader.decode_all(splits.image_root(prepared_root), files, GPU, 2, True, img_size=64)
    assert len(arrays) == len(files) and arrays[0].shape == (64, 64, 3)
    dali_loader.release_unused_memory()  # callable on a GPU machine; the cache has its own copy


def test_an_fp16_overflow_step_leaves_the_model_and_its_batchnorm_as_they_were():
    """A forward pass that overflows in fp16 (inputs at 1e5) gives an infinite loss: GradScaler skips the update
    and the BatchNorm statistics the forward pass moved are put back; the next evaluation is finite."""
    torch.manual_seed(0)
    model = model_utils.get_model(num_classes=3).to(GPU, memory_format=torch.channels_last).train()
    optimizer = engine.build_optimizer(model_utils.param_groups(model, 1e-3, 1e-3, 1e-4),
                                       {"optimizer": "adamw", "momentum": 0.9})
    scaler, mixer = torch.amp.GradScaler("cuda"), augment.MixupCutmix(3, seed=0)
    images = torch.randn(4, 3, 64, 64, device=GPU).to(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 2, 0], device=GPU)
    engine.train_step(model, images, labels, optimizer, scaler, mixer, torch.float16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, finite, _ = engine.train_step(model, images * 1e5, labels, optimizer, scaler, mixer, torch.float16)
    assert not finite.item()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        assert torch.isfinite(model(images)).all()
