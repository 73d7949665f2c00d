"""Shared fixtures: a small synthetic Caltech-like tree with class-dependent content, and the real archive.

Synthetic classes have a distinct dominant colour (plus noise and a random bright square), so a loader's
labels can be checked against the pixels and a model can learn them in a couple of epochs. The tree also holds
the awkward files the real world has: grayscale and CMYK JPEGs, a PNG named .jpg, a truncated JPEG, an empty
file and a non-image file (like the real BACKGROUND_Google/tmp).
"""
import collections
import io
import os
import shutil
import signal
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import download
import model_utils
from kit.training import checkpoint

# Under pytest-xdist (pytest.ini's -n 2) each worker computes on one thread, and so do the processes its tests
# start: two workers with torch's default of a thread per core oversubscribe the cores (measured: slower than one
# worker with two threads).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the kit (pytest.ini puts it on the path)

CLASS_COLOURS = {"alpha": (200, 40, 40), "bravo": (40, 200, 40), "charlie": (40, 40, 200)}
IMAGES_PER_CLASS = 14
BAD_FILES = {"alpha/truncated.jpg", "bravo/empty.jpg", "charlie/notes.jpg"}


def make_image(colour, rng, size=None):
    w, h = size or (int(rng.integers(60, 100)), int(rng.integers(50, 90)))
    pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    pixels[y:y + h // 4, x:x + w // 4] = 255
    return Image.fromarray(pixels)


def jpeg_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def make_tree(root, with_bad_files=True, seed=0):
    """root/101_ObjectCategories/<class>/... ; returns the images dir."""
    rng = np.random.default_rng(seed)
    images_dir = os.path.join(root, download.IMAGES_DIR)
    for cls, colour in CLASS_COLOURS.items():
        os.makedirs(os.path.join(images_dir, cls))
        for i in range(IMAGES_PER_CLASS):
            with open(os.path.join(images_dir, cls, f"image_{i:04d}.jpg"), "wb") as f:
                f.write(jpeg_bytes(make_image(colour, rng)))
    os.makedirs(os.path.join(images_dir, "BACKGROUND_Google"))
    make_image((128, 128, 128), rng).save(os.path.join(images_dir, "BACKGROUND_Google", "image_0001.jpg"))
    with open(os.path.join(images_dir, "BACKGROUND_Google", "tmp"), "w") as f:
        f.write("not an image\n")
    # Valid but awkward: grayscale, CMYK, and a PNG named .jpg (all decodable, all must become RGB).
    make_image(CLASS_COLOURS["alpha"], rng).convert("L").save(os.path.join(images_dir, "alpha", "gray.jpg"))
    with open(os.path.join(images_dir, "bravo", "cmyk.jpg"), "wb") as f:
        f.write(jpeg_bytes(make_image(CLASS_COLOURS["bravo"], rng).convert("CMYK")))
    make_image(CLASS_COLOURS["charlie"], rng).save(os.path.join(images_dir, "charlie", "png_named.jpg"), format="PNG")
    if with_bad_files:
        good = jpeg_bytes(make_image(CLASS_COLOURS["alpha"], rng))
        with open(os.path.join(images_dir, "alpha", "truncated.jpg"), "wb") as f:
            f.write(good[: len(good) // 2])
        open(os.path.join(images_dir, "bravo", "empty.jpg"), "wb").close()
        with open(os.path.join(images_dir, "charlie", "notes.jpg"), "w") as f:
            f.write("this is text, not a JPEG\n")
    return images_dir


def make_targz(src_root, path):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(os.path.join(src_root, download.IMAGES_DIR), arcname=download.IMAGES_DIR)
    return path


def pytest_collection_modifyitems(items):
    """Files with the most slow tests first, each file's tests in their own order: pytest.ini hands whole files to
    two xdist workers as they come free, so the longest start first and the short ones fill in at the end (in file
    order the last long file ran alone for about 100 s)."""
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    order = {path: i for i, path in enumerate(dict.fromkeys(item.path for item in items))}
    items.sort(key=lambda item: (-slow[item.path], order[item.path]))


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """A folder for the runs one test module shares, removed when its tests are done: a run folder holds a 135 MB
    last.pth, and a module's shared runs would otherwise stay until the session ends (the suite's temp files stay
    under 2 GB)."""
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_src")
    make_tree(str(root))
    return str(root)


@pytest.fixture(scope="session")
def prepared_root(synthetic_tree, tmp_path_factory):
    """A prepared data root (4 train images per class) shared by the loader and training tests."""
    data_root = str(tmp_path_factory.mktemp("prepared"))
    download.prepare(data_root, archive=os.path.join(synthetic_tree, download.IMAGES_DIR), train_per_class=4,
                     seed=0, workers=1, quiet=True)
    return data_root


@pytest.fixture(scope="session")
def real_root(tmp_path_factory):
    """The real Caltech-101 prepared with defaults, when CALTECH101_ARCHIVE names the archive."""
    archive = os.environ.get("CALTECH101_ARCHIVE")
    if not archive:
        pytest.skip("CALTECH101_ARCHIVE is not set: real-data test not run")
    if not os.path.exists(archive):
        pytest.fail(f"CALTECH101_ARCHIVE={archive} does not exist")
    data_root = str(tmp_path_factory.mktemp("real"))
    download.prepare(data_root, archive=archive, quiet=True)
    return data_root


@pytest.fixture
def seeded_torch_home(tmp_path, monkeypatch):
    """A TORCH_HOME whose hub cache holds a locally generated 'ImageNet' resnet18 under torchvision's file name."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    path = model_utils.hub_checkpoint_path("resnet18")
    assert path.startswith(str(tmp_path))
    os.makedirs(os.path.dirname(path))
    torch.manual_seed(123)
    reference = model_utils.torchvision.models.resnet18(num_classes=1000).state_dict()
    torch.save(reference, path)
    return reference


@pytest.fixture(scope="session")
def prepared_with_test(synthetic_tree, tmp_path_factory):
    """A root with a test split too: 4 train, 2 test per class, the rest val."""
    data_root = str(tmp_path_factory.mktemp("prepared_test"))
    download.prepare(data_root, archive=os.path.join(synthetic_tree, download.IMAGES_DIR), train_per_class=4,
                     test_per_class=2, seed=0, workers=1, quiet=True)
    return data_root


# report_page off: the page's own tests turn it on (it re-evaluates best.pth on val at the end of every run).
TINY = dict(img_size=32, batch_size=4, eval_batch_size=8, workers=1, warmup_epochs=0.5, eval_every=1,
            log_every=2, progress=False, report_page=False)


def tiny_cfg(data_root, out_dir, exp="cpu_smoke", **overrides):
    """Settings of a run that trains in seconds on the synthetic data."""
    import presets

    settings = dict(TINY, data_root=data_root, out_dir=str(out_dir), epochs=2, pretrained=False)
    settings.update(overrides)
    return presets.resolve(exp, settings)


def tiny_argv(data_root, out_dir, *extra, exp="cpu_smoke", epochs=2):
    args = ["--exp", exp, "--data_root", data_root, "--out_dir", str(out_dir), "--epochs", str(epochs)]
    for key, value in TINY.items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args + list(extra)


@pytest.fixture(scope="session")
def trained_run(prepared_with_test, tmp_path_factory):
    """One finished 3-epoch run (with a test split) that evaluation, prediction and export tests read, never
    change."""
    from kit.training import training

    return training.main(tiny_cfg(prepared_with_test, tmp_path_factory.mktemp("trained"), epochs=3))


def run_cli(cli, argv, capfd):
    """A script's cli(argv) in-process: (exit code, stdout, stderr), stderr captured at the file-descriptor level
    (DALI's and worker processes' own writes included). A string exit is what the interpreter prints on stderr."""
    capfd.readouterr()
    try:
        code = cli(argv)
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    if isinstance(code, str):
        err, code = err + code + "\n", 1
    return code or 0, out, err


def one_line_error(code, err, expected):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), err
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err, err


class StopAfter(checkpoint.GracefulStop):
    """As if SIGTERM arrived during optimizer step `at` (counted from this process's start)."""
    at, steps = 1, 0

    @property
    def requested(self):
        if StopAfter.steps >= self.at and self.signum is None:
            self.signum = signal.SIGTERM
        return self.signum is not None


def counting_step(real):
    def step(*args, **kwargs):
        StopAfter.steps += 1
        return real(*args, **kwargs)
    return step


def stop_at(at, monkeypatch):
    from kit.training import checkpoint, engine

    StopAfter.at, StopAfter.steps = at, 0
    monkeypatch.setattr(checkpoint, "GracefulStop", StopAfter)
    monkeypatch.setattr(engine, "optimizer_step", counting_step(engine.optimizer_step))


def stopped_run(cfg, at, monkeypatch):
    from kit.training import training

    stop_at(at, monkeypatch)
    result = training.main(cfg)
    monkeypatch.undo()
    return result


class CountOps(TorchDispatchMode):
    """Records every aten operation dispatched inside it (what a GPU would launch as kernels)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class FixedBatches:
    """A loader giving `steps` batches from a list, round robin: a step count independent of the data."""

    def __init__(self, batches, steps):
        self.batches, self.steps = batches, steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        for i in range(self.steps):
            yield self.batches[i % len(self.batches)]
