"""What every loader agrees on: the split lists download.py writes (split_writer.py writes them), their identity,
how an image is read, and the sampling plan that says which images each step of an epoch gives each rank, with
each image's crop box and flip.

    files, labels = splits.read_split("data/Caltech101", "train")
    plan = splits.SamplePlan(len(files), batch_size=64, train=True, seed=0, sizes=splits.image_sizes(root, files))
    for step in plan.epoch(3): ...          # (positions, image indices, y, x, h, w, flip) of each step

The plan is a pure function of (seed, epoch, rank, world size), so the DALI, torch and cache loaders draw the very
same order, crops and flips, a resumed run only needs (epoch, batches done), and `--seed` changes the order on
every loader. RandomResizedCrop follows torchvision's rules (area uniform in [scale_min, 1], aspect ratio
log-uniform in [3/4, 4/3], 10 attempts, then a central fallback).
"""
import hashlib
import json
import os
import re
import warnings

import numpy as np

from kit.base import errors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGES_DIR = "101_ObjectCategories"  # where download.py puts Caltech-101's images inside a data root
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".webp")




def resize_size(img_size):
    """Shorter side before the val centre crop: the 256/224 ratio of the ImageNet recipe."""
    return int(img_size * 256 / 224)


def per_class_range(labels, classes):
    """{"fewest": [class, images], "most": [class, images]} of a split's labels (split.json keeps the train split's)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    fewest, most = int(counts.argmin()), int(counts.argmax())
    return {"fewest": [classes[fewest], int(counts[fewest])], "most": [classes[most], int(counts[most])]}


def describe_per_class(per_class):
    """'train images per class: 30 each', or its smallest and largest class and their ratio (download.py's summary
    and a run's start-up line)."""
    (few_name, fewest), (most_name, most) = per_class["fewest"], per_class["most"]
    if fewest == most:
        return f"train images per class: {fewest} each"
    return (f"train images per class: smallest {fewest} ({few_name}), largest {most} ({most_name}), ratio "
            f"{most / max(fewest, 1):.1f}")


def read_split_meta(data_root):
    """split.json of a prepared root ({} for roots prepared before it existed)."""
    try:
        with open(os.path.join(data_root, "split.json"), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise errors.DataError(f"{os.path.join(data_root, 'split.json')} is not valid JSON ({e}): run download.py "
                               f"again") \
            from None


def image_root(data_root):
    """The folder the split lists' paths are relative to: Caltech's images inside the root, or the user's own
    image tree that `download.py --folder` recorded (absolute, or relative to the data root)."""
    recorded = read_split_meta(data_root).get("image_root")
    return os.path.join(data_root, recorded) if recorded else os.path.join(data_root, IMAGES_DIR)


def read_classes(data_root):
    path = os.path.join(data_root, "classes.txt")
    if not os.path.isfile(path):
        if os.path.isdir(os.path.join(data_root, "train")):
            raise errors.DataError(f"{data_root} is an image-folder tree without split lists: run "
                                   f"`python download.py --folder {data_root}` first")
        raise errors.DataError(f"no prepared dataset at {data_root} (missing classes.txt): "
                               f"run `python download.py --data_root {data_root}` first")
    return read_class_file(path, hint=f"run `python download.py --data_root {data_root}` again")


def read_class_file(path, hint="one class name per line"):
    try:
        with open(path, encoding="utf-8") as f:
            classes = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise errors.DataError(f"cannot read the class list {path}: {e.strerror}") from None
    if not classes:
        raise errors.DataError(f"{path} is empty: {hint}")
    return classes


def read_split_lines(path):
    """(files, labels) of one list file, without checking that the files exist."""
    files, labels = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                name, label = line.rstrip("\n").rsplit(" ", 1)
                labels.append(int(label))
            except ValueError:
                raise errors.DataError(f"{path}:{lineno}: expected '<relative path> <label>', got "
                                       f"{line.strip()!r}") from None
            files.append(name)
    return files, labels


def test_split_advice(data_root):
    """How to get a test split for runs trained on data_root: a prepared root is never re-split (its runs trained
    on its lists), so a new root, drawn with the same parameters (each class's training images are the first of
    its seeded order, so they stay the same) plus test images taken from what was val."""
    meta = read_split_meta(data_root)
    evaluate = ("then `python evaluate.py --checkpoint RUN --data_root NEW_ROOT --split test --allow_other_split` "
                "(refused if any test image is one the run trained on); a run's val figures stay comparable only on "
                "its own split")
    if meta.get("layout") == "train/val":
        return (f"add a test/ folder of class folders beside {meta.get('folder')}/train and val, prepare a new root "
                f"with `python download.py --folder {meta.get('folder')} --data_root NEW_ROOT`, {evaluate}")
    draw = (f"--train_fraction {meta['train_fraction']}" if meta.get("train_fraction")
            else f"--train_per_class {meta.get('train_per_class', 30)}")
    source = f"--folder {meta['folder']}" if meta.get("folder") else f"--archive {image_root(data_root)}"
    return (f"prepare a new root with the same training images and a test split, `python download.py --data_root "
            f"NEW_ROOT {source} {draw} --seed {meta.get('seed', 0)} --min_val_per_class "
            f"{meta.get('min_val_per_class', 1)} --test_per_class 10 --small_classes shrink_test`, {evaluate}")


def read_split(data_root, split):
    """(files, labels) of one split list; paths are relative to image_root(data_root)."""
    path = os.path.join(data_root, f"{split}.txt")
    if not os.path.isfile(path):
        if split == "test":
            raise errors.DataError(f"{data_root} has no test split: {test_split_advice(data_root)}")
        raise errors.DataError(f"no {split} split at {path}: run `python download.py --data_root {data_root}`")
    files, labels = read_split_lines(path)
    if not files:
        raise errors.DataError(f"{path} lists no images: run `python download.py --data_root {data_root}` again")
    root = image_root(data_root)
    missing = [p for p in files if not os.path.isfile(os.path.join(root, p))]
    if missing:
        raise errors.DataError(f"{path} names {len(missing)} missing files (first: {os.path.join(root, missing[0])}): "
                               f"re-run `python download.py --data_root {data_root}`")
    return files, labels


def file_digest(path):
    """sha256 of a file's bytes (None if it does not exist): the identity of a split list."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


def split_identity(data_root):
    """What a run records about the data it was trained on: a hash of each list and the split's parameters."""
    meta = read_split_meta(data_root)
    return {"classes": file_digest(os.path.join(data_root, "classes.txt")),
            **{name: file_digest(os.path.join(data_root, f"{name}.txt")) for name in ("train", "val", "test")},
            "params": {k: meta.get(k) for k in ("train_per_class", "test_per_class", "seed", "train_fraction",
                                                "source") if k in meta}}


# ---------------------------------------------------------------------------------------------
# reading images

def _exif_transposed(img):
    """The image as it is meant to be seen: EXIF orientation applied (DALI's decoders do the same by default)."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(img)


def max_image_pixels():
    """The largest image (width x height) the kit decodes: PIL's own limit (Image.MAX_IMAGE_PIXELS, 89,478,485
    pixels, about 9,459 x 9,459; a user may change it before importing the kit). Larger files are refused from
    their header: a 0.9 MB PNG can claim 30,000 x 30,000 pixels, 2.7 GB decoded."""
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS


class open_image:
    """`with open_image(path) as img`: a PIL image opened lazily from its header, refused (a DataError naming the file)
    when it is not a readable image or has more pixels than max_image_pixels(), before anything is decoded."""

    def __init__(self, path):
        self.path, self.img = path, None

    def __enter__(self):
        from PIL import Image

        try:
            with warnings.catch_warnings():  # PIL warns between its limit and twice it; the kit refuses those
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                self.img = Image.open(self.path)
        except Image.DecompressionBombError as e:  # PIL's own refusal, at twice its limit
            claimed = re.search(r"\((\d+) pixels\)", str(e))
            raise self.too_large(f"{int(claimed.group(1)):,} pixels" if claimed else "the image") from None
        except (OSError, SyntaxError, ValueError) as e:  # PIL raises all three for broken or foreign files
            raise errors.DataError(f"cannot decode {self.path}: not a readable image ({e})") from None
        width, height = self.img.size
        if max_image_pixels() and width * height > max_image_pixels():
            self.img.close()
            raise self.too_large(f"{width:,} x {height:,} pixels")
        return self.img

    def too_large(self, size):
        return errors.DataError(f"cannot decode {self.path}: {size} is over the {max_image_pixels():,}-pixel limit "
                                f"(PIL.Image.MAX_IMAGE_PIXELS); not decoded")

    def __exit__(self, *exc):
        self.img.close()


def load_rgb(path):
    """A file as a PIL RGB image (EXIF orientation applied; grayscale, palette and CMYK converted); errors.DataError
    naming the file otherwise, and for images over max_image_pixels(), never decoded."""
    with open_image(path) as img:
        try:
            return _exif_transposed(img).convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:
            raise errors.DataError(f"cannot decode {path}: not a readable image ({e})") from None


def image_sizes(root, files):
    """(heights, widths) as int64 arrays, from the file headers (no decode), after EXIF orientation."""
    heights, widths = np.empty(len(files), np.int64), np.empty(len(files), np.int64)
    for i, name in enumerate(files):
        path = os.path.join(root, name)
        with open_image(path) as img:
            width, height = img.size
            try:
                orientation = img.getexif().get(0x0112, 1)  # 5-8: stored rotated by 90 degrees
            except (OSError, SyntaxError, ValueError) as e:
                raise errors.DataError(f"cannot read {path}: not a readable image ({e})") from None
        heights[i], widths[i] = (width, height) if orientation in (5, 6, 7, 8) else (height, width)
    return heights, widths


class ResizeShorter:
    """Bilinear (antialiased) resize of the shorter side to `size`, rounding the longer side as DALI does
    (torchvision truncates it), so that both loaders produce the same val tensors."""

    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        from PIL import Image

        w, h = img.size
        scale = self.size / min(w, h)
        return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)


def centre_crop_offsets(size, crop):
    """Where a centre crop of `crop` starts in `size` pixels (DALI's crop_mirror_normalize convention)."""
    return np.round((size - crop) / 2.0 + 1e-9).astype(np.int64)


class CentreCrop:
    """Centre crop placed as DALI places it (half-pixel margins round up; torchvision rounds half to even), so
    that the DALI, torch and cache loaders cut the same window."""

    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        w, h = img.size
        left, top = int(centre_crop_offsets(w, self.size)), int(centre_crop_offsets(h, self.size))
        return img.crop((left, top, left + self.size, top + self.size))


def val_transform(img_size):
    """The val/test preprocessing as a PIL -> normalized CHW tensor function (predict.py uses it too)."""
    from torchvision import transforms as T

    return T.Compose([ResizeShorter(resize_size(img_size)), CentreCrop(img_size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def to_model_input(images, labels, device, dtype, channels_last=True):
    """A batch (NHWC or NCHW, host or device) -> NCHW-shaped on `device` in `dtype`, in channels_last memory (or
    contiguous NCHW); labels int64 on the same device."""
    import model_utils  # torch and torchvision: not loaded by the data preparation, which uses the rest of splits

    if images.shape[-1] == 3 and images.shape[1] != 3:  # NHWC: the permute is free and is channels_last memory
        images = images.permute(0, 3, 1, 2)
    layout = model_utils.memory_format(channels_last)
    images = images.to(device, non_blocking=True).to(dtype=dtype, memory_format=layout)
    labels = labels.reshape(-1).to(device, non_blocking=True).long()
    return images, labels
