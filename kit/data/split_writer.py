"""The split lists every loader reads: decode-check the images, draw each class's train / test / val images, write
classes.txt, train.txt, val.txt[, test.txt], bad_files.txt and split.json atomically, and refuse to rewrite a split
that runs may have been trained on. download.py calls it for Caltech-101; `download.py --folder` for your own
ImageFolder-style trees.

    meta = split_writer.make_split("data/Caltech101", train_per_class=30, test_per_class=0, seed=0)
    meta = split_writer.prepare_folder("data/pets", train_fraction=0.8)       # train/ val/ subfolders, or class folders
"""
import json
import os
import random
import sys
from concurrent.futures import ProcessPoolExecutor

from kit.base import errors, fileio
from kit.data.splits import IMAGE_EXTENSIONS, IMAGES_DIR, open_image, per_class_range, read_split_meta

EXCLUDED_CLASSES = ("BACKGROUND_Google",)  # clutter, not a class (torchvision drops it too)
# Formats that both DALI's decoder and PIL read; anything else is excluded at preparation time.
DECODABLE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "PPM", "WEBP")




def check_image(path):
    """None if the file decodes fully in a format DALI reads, within the kit's pixel limit
    (splits.max_image_pixels()); else the reason it does not."""
    try:
        with open_image(path) as img:
            fmt = img.format
            img.load()
    except errors.DataError as e:
        return str(e).split(": ", 1)[-1]
    except (OSError, SyntaxError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    if fmt not in DECODABLE_FORMATS:
        return f"unsupported format {fmt}"
    return None


def decode_check(root, candidates, workers=None, quiet=False):
    """(usable files, [(file, reason)] excluded): every candidate decoded once, in parallel."""
    from tqdm import tqdm

    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        reasons = list(tqdm(pool.map(check_image, [os.path.join(root, p) for p in candidates], chunksize=32),
                            total=len(candidates), desc="decode check", unit="img",
                            disable=quiet or not sys.stderr.isatty()))
    bad = [(p, r) for p, r in zip(candidates, reasons) if r is not None]
    return [p for p, r in zip(candidates, reasons) if r is None], bad


def is_image_name(name):
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def draw_split(class_files, train_per_class, test_per_class, seed, min_val_per_class=1, small_classes="error",
               train_fraction=None):
    """{'train' | 'val' | 'test': [(file, label)]}: each class's images in a random order from (seed, class),
    train first, then test, the rest val. train_fraction instead of train_per_class takes that share of each class.

    The per-class RNG keeps each class's draw independent of the others; the same seed always gives the same
    split. A class too small for train + test + min_val is an error naming the limiting class and what fits,
    unless small_classes="shrink_test" gives such classes fewer test images."""
    def n_train(count):
        return max(1, int(round(train_fraction * count))) if train_fraction else train_per_class

    need = {cls: n_train(len(files)) + test_per_class + min_val_per_class for cls, files in class_files.items()}
    short = sorted((len(files) - need[cls], cls) for cls, files in class_files.items() if len(files) < need[cls])
    if short:
        _, cls = short[0]
        count = len(class_files[cls])
        fewest = min(len(f) - n_train(len(f)) - min_val_per_class for f in class_files.values())
        if count < n_train(count) + min_val_per_class:
            raise errors.PrepareError(f"class '{cls}' has {count} usable images: too few for {n_train(count)} "
                                      f"training and "
                               f"{min_val_per_class} val image(s); lower --train_per_class (at most "
                               f"{count - min_val_per_class} fits it) or remove the class")
        if small_classes != "shrink_test":
            raise errors.PrepareError(f"class '{cls}' has {count} usable images, the limiting class: --train_per_class "
                                      f"{n_train(count)} --test_per_class {test_per_class} --min_val_per_class "
                               f"{min_val_per_class} need {need[cls]}; the largest --test_per_class that fits every "
                               f"class is {max(fewest, 0)}, or pass --small_classes shrink_test ({len(short)} "
                               f"class(es) would get fewer test images)")
    out = {"train": [], "val": [], "test": []}
    for label, (cls, files) in enumerate(sorted(class_files.items())):
        picked = random.Random(f"{seed}/{cls}").sample(sorted(files), len(files))
        train = n_train(len(files))
        test = max(0, min(test_per_class, len(files) - train - min_val_per_class))
        out["train"] += [(p, label) for p in sorted(picked[:train])]
        out["test"] += [(p, label) for p in sorted(picked[train:train + test])]
        out["val"] += [(p, label) for p in sorted(picked[train + test:])]
    return out


def write_split(data_root, classes, splits, bad, meta):
    """classes.txt, train/val/test.txt, bad_files.txt and split.json, each written atomically."""
    os.makedirs(data_root, exist_ok=True)
    write_lines(os.path.join(data_root, "classes.txt"), classes)
    for name, rows in splits.items():
        path = os.path.join(data_root, f"{name}.txt")
        if rows:
            write_lines(path, [f"{p} {label}" for p, label in rows])
        elif os.path.exists(path):
            os.remove(path)
    write_lines(os.path.join(data_root, "bad_files.txt"), [f"{p}\t{r}" for p, r in bad])
    for p, r in bad:
        print(f"warning: excluded {p} ({r})")
    meta = dict(meta, num_classes=len(classes), counts={k: len(v) for k, v in splits.items()}, excluded=len(bad),
                train_per_class_range=per_class_range([label for _, label in splits.get("train", [])], classes))
    write_lines(os.path.join(data_root, "split.json"), [json.dumps(meta, indent=1)])
    return meta


def make_split(data_root, train_per_class=30, test_per_class=0, seed=0, workers=None, quiet=False,
               min_val_per_class=1, small_classes="error"):
    images_dir = os.path.join(data_root, IMAGES_DIR)
    classes = sorted(d for d in os.listdir(images_dir)
                     if os.path.isdir(os.path.join(images_dir, d)) and d not in EXCLUDED_CLASSES)
    if not classes:
        raise errors.PrepareError(f"no class folders in {images_dir}")
    candidates = [os.path.join(c, f) for c in classes for f in sorted(os.listdir(os.path.join(images_dir, c)))]
    good, bad = decode_check(images_dir, candidates, workers, quiet)
    class_files = {cls: [p for p in good if p.startswith(cls + os.sep)] for cls in classes}
    splits = draw_split(class_files, train_per_class, test_per_class, seed, min_val_per_class, small_classes)
    return write_split(data_root, classes, splits, bad, split_params(train_per_class, test_per_class, seed,
                                                                     min_val_per_class, small_classes))


def split_params(train_per_class, test_per_class, seed, min_val_per_class=1, small_classes="error",
                 train_fraction=None, source="caltech101"):
    """What defines a split: two preparations with the same parameters write the same lists."""
    return {"train_per_class": train_per_class, "test_per_class": test_per_class, "seed": seed,
            "min_val_per_class": min_val_per_class, "small_classes": small_classes, "train_fraction": train_fraction,
            "source": source}


def write_lines(path, lines):
    """A list file written whole: a reader never sees a half-written list."""
    fileio.write_atomic("".join(line + "\n" for line in lines), path)


def existing_split(data_root):
    """The split.json of a prepared root, or None (none yet, or unreadable: then this preparation writes a new one)."""
    try:
        return read_split_meta(data_root) or None
    except (errors.DataError, OSError):
        return None


def check_resplit(data_root, params, force):
    """None if the root holds no split yet (or --force); 'same' if it holds this one; else refuse: runs trained on
    the old split would be evaluated on their own training images."""
    meta = existing_split(data_root)
    if meta is None or force:
        return None
    lists = ["classes.txt", "train.txt", "val.txt"] + (["test.txt"] if meta.get("counts", {}).get("test") else [])
    complete = all(os.path.exists(os.path.join(data_root, f)) for f in lists)
    defaults = split_params(30, 0, 0)  # roots prepared before these were recorded used them
    old = {k: meta.get(k, defaults.get(k)) for k in params}
    if old == params and complete:
        return "same"
    changed = ", ".join(f"{k} {old[k]} -> {params[k]}" for k in params if old[k] != params[k]) or "lists incomplete"
    raise errors.PrepareError(f"{data_root} already holds a split ({changed}) that runs may have been trained on; "
                              f"prepare a new root instead (e.g. --data_root {os.path.normpath(data_root)}_2"
                              + (f" --archive {os.path.join(data_root, IMAGES_DIR)}" if params["source"] == "caltech101"
                          else "") + "), or pass --force to rewrite it")


def list_images(root, sub=""):
    """({class: [path relative to root]}, number of non-image files ignored) of root/sub/<class>/..."""
    base = os.path.join(root, sub)
    classes, ignored = {}, 0
    for cls in sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)) and not d.startswith(".")):
        files = []
        for dirpath, _, names in sorted(os.walk(os.path.join(base, cls))):
            for name in sorted(names):
                if is_image_name(name):
                    files.append(os.path.relpath(os.path.join(dirpath, name), root))
                else:
                    ignored += 1
        classes[cls] = files
    return classes, ignored


def prepare_folder(folder, data_root=None, train_per_class=None, train_fraction=None, test_per_class=0, seed=0,
                   workers=None, quiet=False, min_val_per_class=1, small_classes="error", force=False):
    """Split lists for your own images, the torchvision ImageFolder way: a tree with train/ and val/ (and optional
    test/) subfolders of class folders is used as given; a single tree of class folders is split per class
    (train_per_class or train_fraction, test_per_class, the rest val). The lists go to data_root (default: the
    folder itself); the paths in them are relative to the folder, which split.json records."""
    if not os.path.isdir(folder):
        raise errors.PrepareError(f"--folder {folder} is not a folder")
    folder = os.path.abspath(folder)
    data_root = data_root or folder
    pre_split = os.path.isdir(os.path.join(folder, "train"))
    if not pre_split and not (train_per_class or train_fraction):
        if (existing_split(data_root) or {}).get("folder") == folder:  # run again with no split asked for
            print(f"{data_root} is already prepared from {folder}: nothing to do (a new split goes to a new "
                  f"--data_root)")
            return existing_split(data_root)
        raise errors.PrepareError(f"{folder} has no train/ subfolder: give --train_per_class N or --train_fraction "
                                  f"F to split its class folders")
    if train_fraction is not None and not 0 < train_fraction < 1:
        raise errors.PrepareError(f"--train_fraction must be in (0, 1), got {train_fraction}")
    params = split_params(train_per_class if not pre_split else None, test_per_class if not pre_split else None,
                          seed, min_val_per_class, small_classes, train_fraction, source="folder")
    params["folder"] = folder
    params["layout"] = "train/val" if pre_split else "class folders"
    if check_resplit(data_root, params, force) == "same":
        print(f"{data_root} is already prepared from {folder}: nothing to do")
        return existing_split(data_root)
    if pre_split:
        parts = {name: list_images(folder, name) for name in ("train", "val", "test")
                 if os.path.isdir(os.path.join(folder, name))}
        if "val" not in parts:
            raise errors.PrepareError(f"{folder} has train/ but no val/ subfolder")
        classes = sorted(parts["train"][0])
        for name, (found, _) in parts.items():
            extra = sorted(set(found) - set(classes))
            if extra:
                raise errors.PrepareError(f"{os.path.join(folder, name)} has class folders that train/ lacks: "
                                          f"{', '.join(extra[:5])}")
        ignored = sum(n for _, n in parts.values())
        candidates = [p for found, _ in parts.values() for files in found.values() for p in files]
    else:
        found, ignored = list_images(folder)
        classes = sorted(found)
        candidates = [p for files in found.values() for p in files]
    if not classes or not candidates:
        raise errors.PrepareError(f"no class folders with images in {folder}")
    good, bad = decode_check(folder, candidates, workers, quiet)
    good = set(good)
    if pre_split:
        label = {cls: i for i, cls in enumerate(classes)}
        splits = {name: [(p, label[p.split(os.sep)[1]]) for p in sorted(good) if p.split(os.sep)[0] == name]
                  for name in ("train", "val", "test")}
    else:
        class_files = {cls: [p for p in files if p in good] for cls, files in found.items()}
        splits = draw_split(class_files, train_per_class, test_per_class, seed, min_val_per_class, small_classes,
                            train_fraction)
    if ignored and not quiet:
        print(f"note: ignored {ignored} file(s) that are not images by their extension")
    image_root = os.path.relpath(folder, os.path.abspath(data_root))
    return write_split(data_root, classes, splits, bad, dict(params, image_root=image_root, ignored=ignored))


