"""Get Caltech-101 onto disk and write the train/val(/test) split every loader reads.

    python download.py                                   # fetch the official zip into data/Caltech101/
    python download.py --archive ../shared/data/101_ObjectCategories.tar.gz   # offline: a local copy
    python download.py --train_per_class 30 --test_per_class 10 --seed 0

Accepted local copies: the official `caltech-101.zip`, the inner `101_ObjectCategories.tar.gz`,
or an already extracted `101_ObjectCategories/` folder. Re-packed archives have other md5s, so local
copies are checked by content (class folders, image counts) rather than by hash.

What ends up under --data_root:
    101_ObjectCategories/<class>/<image>.jpg   the images (extracted atomically, marker `.complete`)
    classes.txt                                one class name per line; line number = label index
    train.txt, val.txt[, test.txt]             "<path relative to 101_ObjectCategories> <label>" per line
    bad_files.txt                              files excluded because they do not decode
    split.json                                 the split's parameters and counts
"""
import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile

from kit.base import errors
from kit.data import splits
from kit.data.split_writer import (  # noqa: F401 - re-exported: download.py is the data preparation's entry point
    check_resplit,
    existing_split,
    make_split,
    prepare_folder,
    split_params,
)
from kit.data.splits import IMAGES_DIR

OFFICIAL_URL = "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip"
OFFICIAL_ZIP_MD5 = "3138e1922a9193bfa496528edbbc45d0"
OFFICIAL_TGZ_MD5 = "b224c7392d521a49829488ab0f1120d9"
OFFICIAL_NUM_FOLDERS = 102  # 101 classes + BACKGROUND_Google
OFFICIAL_NUM_IMAGES = 9144
COMPLETE_MARKER = ".complete"
# ---------------------------------------------------------------------------------------------
# download

IMBALANCE_WARN_RATIO = 3  # largest / smallest class in the train split above which download.py warns


def md5_of(path, chunk=1 << 20):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def download(url, dest, expected_md5, quiet=False):
    """Download url to dest through dest+'.part', resuming a partial file where the server allows."""
    from tqdm import tqdm

    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the .part file already holds the whole archive
            response = None
        else:
            raise errors.PrepareError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise errors.PrepareError(f"cannot reach {url} ({e}); without internet, pass --archive PATH to a local "
                                  f"copy") from None

    if response is not None:
        with response:
            ctype = response.headers.get("Content-Type", "")
            if "text/html" in ctype:
                raise errors.PrepareError(f"{url} returned an HTML page, not the archive (login or error page?)")
            resumed = have and response.status == 206
            mode = "ab" if resumed else "wb"
            start = have if resumed else 0
            total = response.headers.get("Content-Length")
            total = int(total) + start if total is not None else None
            with open(part, mode) as f, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                             desc="download", disable=quiet or not sys.stderr.isatty()) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
                    bar.update(len(block))
        got = os.path.getsize(part)
        if total is not None and got < total:  # the connection dropped: keep the part for a resume
            raise errors.PrepareError(f"download interrupted at {got} of {total} bytes; run again to resume")
    check_archive_bytes(part, expected_md5, url)
    os.replace(part, dest)


def check_archive_bytes(path, expected_md5, source):
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith(b"<!doctype html") or head.startswith(b"<html"):
        os.remove(path)
        raise errors.PrepareError(f"{source} gave an HTML page, not the archive; removed it")
    got = md5_of(path)
    if got != expected_md5:  # complete but wrong: resuming cannot fix it, so start over next time
        os.remove(path)
        raise errors.PrepareError(f"md5 of the downloaded archive is {got}, expected {expected_md5}: corrupted "
                                  f"download (removed; run again)")


# ---------------------------------------------------------------------------------------------
# extraction

def _check_member_name(name, archive):
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep) or "/../" in f"/{name}/":
        raise errors.PrepareError(f"refusing {archive}: member '{name}' would be written outside the target folder")


def _safe_extract_tar(fileobj, archive, dest):
    try:
        with tarfile.open(fileobj=fileobj, mode="r:*") as tar:
            members = tar.getmembers()
            for m in members:
                _check_member_name(m.name, archive)
                if not (m.isfile() or m.isdir()):
                    raise errors.PrepareError(f"refusing {archive}: member '{m.name}' is a link or special file")
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError, zipfile.BadZipFile) as e:
        reason = str(e).strip().splitlines()[0].rstrip(":") if str(e).strip() else type(e).__name__
        raise errors.PrepareError(f"{archive} is not a readable tar or zip archive ({reason})") from None


def _extract_zip(path, dest):
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            for name in names:
                _check_member_name(name, path)
            inner = [n for n in names if n.endswith(IMAGES_DIR + ".tar.gz")]
            if inner:  # the official zip wraps the tar.gz (and an annotations tar we do not need)
                with zf.open(inner[0]) as raw:
                    _safe_extract_tar(io.BufferedReader(raw, 1 << 20), f"{path}:{inner[0]}", dest)
            else:
                zf.extractall(dest)
    except zipfile.BadZipFile as e:
        raise errors.PrepareError(f"{path} is not a readable zip archive: {e}") from None


def _find_images_dir(root):
    for dirpath, _, _ in os.walk(root):
        if os.path.basename(dirpath) == IMAGES_DIR:
            return dirpath
    raise errors.PrepareError(f"no '{IMAGES_DIR}/' folder inside the archive")


def summarize_tree(images_dir):
    """(folder count, file count) of a 101_ObjectCategories tree, for the content check."""
    folders = [d for d in os.listdir(images_dir) if os.path.isdir(os.path.join(images_dir, d))]
    files = sum(len(os.listdir(os.path.join(images_dir, d))) for d in folders)
    return len(folders), files


def install_images(archive, data_root, quiet=False):
    """Put the images at data_root/101_ObjectCategories, atomically, from an archive or a folder."""
    final = os.path.join(data_root, IMAGES_DIR)
    if os.path.exists(os.path.join(final, COMPLETE_MARKER)):
        return False
    if os.path.exists(final):
        print(f"found an incomplete {final} (interrupted extraction): redoing it")
        shutil.rmtree(final)
    os.makedirs(data_root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=data_root)
    try:
        if os.path.isdir(archive):
            src = archive if os.path.basename(os.path.normpath(archive)) == IMAGES_DIR else _find_images_dir(archive)
            if not quiet:
                print(f"copying {src} -> {final}")
            shutil.copytree(src, os.path.join(tmp, IMAGES_DIR))
        elif zipfile.is_zipfile(archive):
            if not quiet:
                print(f"extracting {archive} -> {final}")
            _extract_zip(archive, tmp)
        else:
            if not quiet:
                print(f"extracting {archive} -> {final}")
            with open(archive, "rb") as f:
                _safe_extract_tar(f, archive, tmp)
        images_dir = _find_images_dir(tmp)
        folders, files = summarize_tree(images_dir)
        if folders == 0 or files == 0:
            raise errors.PrepareError(f"{archive} holds no class folders with images")
        if (folders, files) == (OFFICIAL_NUM_FOLDERS, OFFICIAL_NUM_IMAGES + 1):  # +1: BACKGROUND_Google/tmp
            print(f"content check: {folders} folders, {files} files, as in the official Caltech-101")
        else:
            print(f"warning: content differs from the official Caltech-101 ({folders} folders, {files} files; "
                  f"expected {OFFICIAL_NUM_FOLDERS}, {OFFICIAL_NUM_IMAGES + 1})")
        with open(os.path.join(images_dir, COMPLETE_MARKER), "w", encoding="utf-8") as f:
            f.write(json.dumps({"source": os.path.abspath(archive), "folders": folders, "files": files}) + "\n")
        os.replace(images_dir, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


# ---------------------------------------------------------------------------------------------
# split

def prepare(data_root, archive=None, url=OFFICIAL_URL, md5=OFFICIAL_ZIP_MD5, train_per_class=30,
            test_per_class=0, seed=0, workers=None, quiet=False, min_val_per_class=1, small_classes="error",
            force=False):
    """Download or unpack, then split. Returns the split's metadata."""
    if train_per_class < 1 or test_per_class < 0 or min_val_per_class < 0:
        raise errors.PrepareError("--train_per_class must be >= 1, --test_per_class and --min_val_per_class >= 0")
    params = split_params(train_per_class, test_per_class, seed, min_val_per_class, small_classes)
    status = check_resplit(data_root, params, force)
    marker = os.path.join(data_root, IMAGES_DIR, COMPLETE_MARKER)
    if not os.path.exists(marker):
        if archive is None:
            os.makedirs(data_root, exist_ok=True)
            archive = os.path.join(data_root, os.path.basename(url))
            if not os.path.exists(archive):
                download(url, archive, md5, quiet=quiet)
        elif not os.path.exists(archive):
            raise errors.PrepareError(f"--archive {archive} does not exist")
        install_images(archive, data_root, quiet=quiet)
    else:
        if archive is not None:
            print(f"note: --archive {archive} not used: the images are already extracted in {data_root}")
        if status == "same":
            print(f"{data_root} is already prepared (images extracted, split up to date): nothing to do")
            return existing_split(data_root)
    return make_split(data_root, train_per_class, test_per_class, seed, workers, quiet, min_val_per_class,
                      small_classes)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_root", default=None,
                   help="where the split lists (and Caltech's images) go (default: data/Caltech101; with --folder: "
                        "the folder itself)")
    p.add_argument("--archive", default=None,
                   help="local caltech-101.zip, 101_ObjectCategories.tar.gz or extracted folder (no download)")
    p.add_argument("--folder", default=None,
                   help="your own images instead of Caltech-101: a tree with train/ and val/ (optional test/) "
                        "subfolders of class folders, or a single tree of class folders to split")
    p.add_argument("--url", default=OFFICIAL_URL, help="archive to download when --archive is not given")
    p.add_argument("--md5", default=OFFICIAL_ZIP_MD5, help="expected md5 of the downloaded archive")
    p.add_argument("--train_per_class", type=int, default=None,
                   help="training images drawn per class (default: 30 for Caltech-101)")
    p.add_argument("--train_fraction", type=float, default=None,
                   help="--folder: share of each class for training instead of --train_per_class")
    p.add_argument("--test_per_class", type=int, default=0, help="test images held out per class (0: no test split)")
    p.add_argument("--min_val_per_class", type=int, default=1, help="val images every class keeps at least")
    p.add_argument("--small_classes", default="error", choices=("error", "shrink_test"),
                   help="a class too small for train + test + min val: stop with an error, or give it fewer test "
                        "images")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-class random draw")
    p.add_argument("--force", action="store_true", help="rewrite an existing split with other parameters (runs "
                                                        "trained on the old split can no longer be evaluated)")
    p.add_argument("--workers", type=int, default=None, help="processes for the decode check (default: all cores)")
    return p


def main(args):
    if args.folder:
        if args.archive:
            raise errors.PrepareError("--folder and --archive are two different sources: give one")
        meta = prepare_folder(args.folder, args.data_root, args.train_per_class, args.train_fraction,
                              args.test_per_class, args.seed, args.workers, min_val_per_class=args.min_val_per_class,
                              small_classes=args.small_classes, force=args.force)
        root = args.data_root or args.folder
    else:
        if args.train_fraction is not None:
            raise errors.PrepareError("--train_fraction is for --folder; Caltech-101 uses --train_per_class")
        root = args.data_root or "data/Caltech101"
        meta = prepare(root, args.archive, args.url, args.md5, args.train_per_class or 30, args.test_per_class,
                       args.seed, args.workers, min_val_per_class=args.min_val_per_class,
                       small_classes=args.small_classes, force=args.force)
    c = meta["counts"]
    print(f"classes: {meta['num_classes']}  train: {c['train']}  val: {c['val']}  test: {c['test']}  "
          f"excluded (undecodable): {meta['excluded']}  -> {root}")
    if "train_per_class_range" in meta:  # a split prepared before this summary existed has none
        per_class = meta["train_per_class_range"]
        ratio = per_class["most"][1] / max(per_class["fewest"][1], 1)
        print(splits.describe_per_class(per_class))
        if ratio > IMBALANCE_WARN_RATIO:
            print(f"warning: the train split is imbalanced (ratio {ratio:.1f} > {IMBALANCE_WARN_RATIO}): consider "
                  f"--class_balance loss or sampler, and --monitor val_mean_class_acc (README, Imbalanced data)")


def cli(argv=None):
    return errors.run_cli(main, get_args_parser().parse_args(argv),
                          interrupted="interrupted: run the same command again to finish (partial work is detected "
                                      "and redone)")


if __name__ == "__main__":
    sys.exit(cli())
