"""download.py: archives of every accepted kind, safe extraction, interruption, split determinism, bad files."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import download
from conftest import BAD_FILES, CLASS_COLOURS, IMAGES_PER_CLASS, ROOT, make_targz, one_line_error, run_cli
from kit.base import errors

GOOD_PER_CLASS = IMAGES_PER_CLASS + 1  # + the grayscale / CMYK / PNG-named-.jpg file of each class


def read_list(path):
    with open(path) as f:
        return [line.split() for line in f]


def test_split_counts_classes_and_bad_files(prepared_root):
    with open(os.path.join(prepared_root, "classes.txt")) as f:
        assert f.read().split() == sorted(CLASS_COLOURS)  # BACKGROUND_Google excluded
    train = read_list(os.path.join(prepared_root, "train.txt"))
    val = read_list(os.path.join(prepared_root, "val.txt"))
    assert len(train) == 4 * 3 and len(val) == (GOOD_PER_CLASS - 4) * 3
    assert not set(p for p, _ in train) & set(p for p, _ in val)
    for path, label in train + val:  # labels follow the class folder
        assert sorted(CLASS_COLOURS)[int(label)] == path.split("/")[0]
    listed = {p for p, _ in train + val}
    assert not listed & BAD_FILES and {"alpha/gray.jpg", "bravo/cmyk.jpg", "charlie/png_named.jpg"} <= listed
    with open(os.path.join(prepared_root, "bad_files.txt")) as f:
        assert {line.split("\t")[0] for line in f} == BAD_FILES
    meta = json.load(open(os.path.join(prepared_root, "split.json")))
    assert meta["counts"] == {"train": 12, "val": len(val), "test": 0} and meta["excluded"] == 3


def test_split_is_deterministic_and_seed_dependent(synthetic_tree, tmp_path):
    src = os.path.join(synthetic_tree, download.IMAGES_DIR)
    lists = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        root = str(tmp_path / name)
        download.prepare(root, archive=src, train_per_class=5, test_per_class=2, seed=seed, workers=1, quiet=True)
        lists[name] = [open(os.path.join(root, f"{s}.txt")).read() for s in ("train", "val", "test")]
    assert lists["a"] == lists["b"]
    assert lists["a"][0] != lists["c"][0]
    train, val, test = (read_list(os.path.join(tmp_path / "a", f"{s}.txt")) for s in ("train", "val", "test"))
    assert (len(train), len(test), len(val)) == (15, 6, (GOOD_PER_CLASS - 7) * 3)
    assert not ({p for p, _ in test} & ({p for p, _ in train} | {p for p, _ in val}))


def test_targz_zip_and_folder_give_the_same_split(synthetic_tree, tmp_path):
    targz = make_targz(synthetic_tree, str(tmp_path / "101_ObjectCategories.tar.gz"))
    official_like = str(tmp_path / "caltech-101.zip")  # the official zip wraps the tar.gz
    with zipfile.ZipFile(official_like, "w") as zf:
        zf.write(targz, "caltech-101/101_ObjectCategories.tar.gz")
    results = []
    for archive in (targz, official_like, os.path.join(synthetic_tree, download.IMAGES_DIR), synthetic_tree):
        root = str(tmp_path / f"root{len(results)}")
        download.prepare(root, archive=archive, train_per_class=4, workers=1, quiet=True)
        assert os.path.exists(os.path.join(root, download.IMAGES_DIR, download.COMPLETE_MARKER))
        results.append(open(os.path.join(root, "train.txt")).read() + open(os.path.join(root, "val.txt")).read())
    assert len(set(results)) == 1


def test_second_run_does_nothing_and_says_so(synthetic_tree, tmp_path, capsys):
    root = str(tmp_path / "root")
    download.prepare(root, archive=os.path.join(synthetic_tree, download.IMAGES_DIR), train_per_class=4, workers=1,
                     quiet=True)
    stamp = os.path.getmtime(os.path.join(root, "train.txt"))
    capsys.readouterr()
    download.prepare(root, archive="/nonexistent/archive.tar.gz", train_per_class=4, workers=1, quiet=True)
    out = capsys.readouterr().out
    assert "nothing to do" in out and "--archive /nonexistent/archive.tar.gz not used" in out
    assert os.path.getmtime(os.path.join(root, "train.txt")) == stamp


def test_split_is_pinned_and_each_class_draws_alone(prepared_root, synthetic_tree, tmp_path):
    """A known answer (this file's hash, from the generated tree, seed 0, 4 per class), so a shared RNG across
    classes or an unsorted listing fails; and a class that gains an image leaves the others' draws alone."""
    data = open(os.path.join(prepared_root, "train.txt"), "rb").read()
    assert download.hashlib.sha256(data).hexdigest() == \
        "70c864fc93d89549d4309623066c375ee4ea59fb7785a7029a84b11c874f7ba4"
    src = tmp_path / "src"
    shutil.copytree(synthetic_tree, src)
    alpha = src / download.IMAGES_DIR / "alpha"
    shutil.copy(alpha / "image_0000.jpg", alpha / "extra.jpg")
    root = str(tmp_path / "root")
    download.prepare(root, archive=str(src / download.IMAGES_DIR), train_per_class=4, workers=1, quiet=True)
    old = [line for line in data.decode().splitlines() if not line.startswith("alpha/")]
    new = [line for line in open(os.path.join(root, "train.txt")).read().splitlines() if not line.startswith("alpha/")]
    assert old == new


def test_an_existing_split_is_not_rewritten_with_other_parameters(synthetic_tree, tmp_path, capfd):
    root = str(tmp_path / "root")
    archive = os.path.join(synthetic_tree, download.IMAGES_DIR)
    download.prepare(root, archive=archive, train_per_class=4, workers=1, quiet=True)
    before = open(os.path.join(root, "train.txt")).read()
    code, _, err = run_cli(download.cli, ["--data_root", root, "--train_per_class", "4", "--seed", "1"], capfd)
    one_line_error(code, err, "seed 0 -> 1")
    assert "--force" in err and f"--data_root {root}_2" in err
    assert open(os.path.join(root, "train.txt")).read() == before
    code, _, _ = run_cli(download.cli, ["--data_root", root, "--train_per_class", "4", "--seed", "1", "--force"],
                         capfd)
    assert code == 0 and open(os.path.join(root, "train.txt")).read() != before


def test_the_limiting_class_is_named_with_what_fits(synthetic_tree, tmp_path, capfd):
    src = tmp_path / "src"
    shutil.copytree(synthetic_tree, src)
    for name in sorted(os.listdir(src / download.IMAGES_DIR / "charlie"))[:5]:  # charlie: 15 -> 10 usable images
        os.remove(src / download.IMAGES_DIR / "charlie" / name)
    root = str(tmp_path / "root")
    argv = ["--data_root", root, "--archive", str(src / download.IMAGES_DIR), "--train_per_class", "4",
            "--test_per_class", "6"]
    code, _, err = run_cli(download.cli, argv, capfd)
    one_line_error(code, err, "class 'charlie' has 10 usable images, the limiting class")
    assert "largest --test_per_class that fits every class is 5" in err
    code, out, _ = run_cli(download.cli, argv + ["--small_classes", "shrink_test"], capfd)
    assert code == 0
    test = read_list(os.path.join(root, "test.txt"))
    counts = {cls: sum(p.startswith(cls + "/") for p, _ in test) for cls in CLASS_COLOURS}
    assert counts == {"alpha": 6, "bravo": 6, "charlie": 5}  # charlie keeps 4 train + 1 val


def test_own_image_folders_pre_split_and_single(tmp_path, capfd):
    from conftest import jpeg_bytes, make_image

    rng = __import__("numpy").random.default_rng(0)
    pre = tmp_path / "data"
    for part, count in (("train", 5), ("val", 3)):
        for cls, colour in (("cat", (200, 60, 60)), ("fish", (60, 60, 200))):
            (pre / part / cls).mkdir(parents=True)
            for i in range(count):
                make_image(colour, rng).save(pre / part / cls / f"{cls}-{i}.png")
    (pre / "train" / "cat" / "broken.jpg").write_bytes(jpeg_bytes(make_image((0, 0, 0), rng))[:100])
    (pre / "train" / "cat" / "notes.txt").write_text("not an image")
    code, out, _ = run_cli(download.cli, ["--folder", str(pre)], capfd)
    assert code == 0 and "train: 10  val: 6" in out and "excluded (undecodable): 1" in out
    assert "ignored 1 file(s) that are not images" in out
    assert open(pre / "classes.txt").read().split() == ["cat", "fish"]
    assert "train/cat/broken.jpg" in open(pre / "bad_files.txt").read()
    from kit.data import splits

    files, labels = splits.read_split(str(pre), "train")
    assert len(files) == 10 and files[0].startswith("train/cat/") and labels.count(1) == 5
    single = tmp_path / "flat"
    for cls in ("a", "b", "c"):
        (single / cls).mkdir(parents=True)
        for i in range(7):
            make_image((40 * i, 100, 100), rng).save(single / cls / f"{i}.jpg")
    code, out, _ = run_cli(download.cli, ["--folder", str(single), "--data_root", str(tmp_path / "lists"),
                                          "--train_fraction", "0.6"], capfd)
    assert code == 0 and "train: 12  val: 9" in out  # round(0.6 * 7) = 4 per class
    assert splits.image_root(str(tmp_path / "lists")) == os.path.join(str(tmp_path / "lists"),
                                                                           os.path.relpath(single, tmp_path / "lists"))
    code, _, err = run_cli(download.cli, ["--folder", str(single), "--data_root", str(tmp_path / "x")], capfd)
    one_line_error(code, err, "--train_per_class N or --train_fraction F")
    # run again on the folder it prepared, with no split asked for: it says so
    code, _, _ = run_cli(download.cli, ["--folder", str(single), "--train_fraction", "0.6"], capfd)
    lists = open(single / "train.txt").read()
    code, out, err = run_cli(download.cli, ["--folder", str(single)], capfd)
    assert code == 0 and f"{single} is already prepared from {single}: nothing to do" in out, err
    assert open(single / "train.txt").read() == lists


@pytest.mark.slow
def test_real_images_as_a_folder_give_the_archives_split(real_root, tmp_path):
    """download.py --folder on the extracted real images (a single class-per-folder tree): the same 101 classes
    and the same split counts as the archive path (BACKGROUND_Google aside, which --folder takes as a class)."""
    src = tmp_path / "tree"
    shutil.copytree(os.path.join(real_root, download.IMAGES_DIR), src,
                    ignore=shutil.ignore_patterns("BACKGROUND_Google"))
    meta = download.prepare_folder(str(src), str(tmp_path / "lists"), train_per_class=30, quiet=True, workers=2)
    assert meta["num_classes"] == 101 and meta["counts"] == {"train": 3030, "val": 5647, "test": 0}
    assert open(tmp_path / "lists" / "train.txt").read() == open(os.path.join(real_root, "train.txt")).read()


def test_interrupted_extraction_is_detected_and_redone(synthetic_tree, tmp_path, capsys):
    root = str(tmp_path / "root")
    archive = os.path.join(synthetic_tree, download.IMAGES_DIR)
    download.prepare(root, archive=archive, train_per_class=4, workers=1, quiet=True)
    images = os.path.join(root, download.IMAGES_DIR)
    os.remove(os.path.join(images, download.COMPLETE_MARKER))  # what a kill mid-extraction leaves
    shutil.rmtree(os.path.join(images, "bravo"))
    capsys.readouterr()
    download.prepare(root, archive=archive, train_per_class=4, workers=1, quiet=True)
    assert "incomplete" in capsys.readouterr().out
    assert len(os.listdir(os.path.join(images, "bravo"))) == GOOD_PER_CLASS + 1  # + empty.jpg
    assert not [d for d in os.listdir(root) if d.startswith(".extract-")]


def test_corrupted_archive_is_refused_and_leaves_nothing(synthetic_tree, tmp_path):
    targz = make_targz(synthetic_tree, str(tmp_path / "a.tar.gz"))
    data = open(targz, "rb").read()
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(data[: len(data) // 2])
    root = str(tmp_path / "root")
    with pytest.raises(errors.PrepareError, match="not a readable tar or zip archive"):
        download.prepare(root, archive=str(broken), workers=1, quiet=True)
    assert not os.path.exists(os.path.join(root, download.IMAGES_DIR))
    assert os.listdir(root) == []


def test_member_escaping_the_folder_is_refused(tmp_path):
    evil = str(tmp_path / "evil.tar.gz")
    with tarfile.open(evil, "w:gz") as tar:
        payload = b"owned\n"
        info = tarfile.TarInfo("101_ObjectCategories/../../escaped.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    root = str(tmp_path / "deep" / "root")
    with pytest.raises(errors.PrepareError, match="outside the target folder"):
        download.prepare(root, archive=evil, workers=1, quiet=True)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "deep" / "escaped.txt").exists()


def test_html_page_saved_as_archive_is_caught(tmp_path):
    fake = tmp_path / "caltech-101.zip.part"
    fake.write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    with pytest.raises(errors.PrepareError, match="HTML page"):
        download.check_archive_bytes(str(fake), download.OFFICIAL_ZIP_MD5, "test")
    assert not fake.exists()


def test_cli_errors_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "download.py"), "--data_root", str(tmp_path / "r"),
                             "--archive", str(tmp_path / "missing.tar.gz")], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


def test_real_archive_counts(real_root):
    meta = json.load(open(os.path.join(real_root, "split.json")))
    assert meta["num_classes"] == 101
    assert meta["counts"] == {"train": 3030, "val": 5647, "test": 0}
    assert meta["excluded"] == 0
    classes = open(os.path.join(real_root, "classes.txt")).read().split()
    assert "BACKGROUND_Google" not in classes and {"Faces", "Faces_easy"} <= set(classes)


class ArchiveServer:
    """A loopback HTTP server that serves one archive with Range support and records the requests."""

    def __init__(self, payload, content_type="application/zip"):
        import http.server
        import threading

        server = self
        self.payload, self.ranges = payload, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                server.ranges.append(rng)
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = server.payload[start:]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/caltech-101.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def official_like_zip(synthetic_tree, tmp_path):
    targz = make_targz(synthetic_tree, str(tmp_path / "inner.tar.gz"))
    path = tmp_path / "served.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(targz, "caltech-101/101_ObjectCategories.tar.gz")
    data = path.read_bytes()
    return data, download.hashlib.md5(data).hexdigest()


def test_download_verifies_md5_and_prepares(official_like_zip, tmp_path):
    data, md5 = official_like_zip
    server = ArchiveServer(data)
    try:
        root = str(tmp_path / "root")
        meta = download.prepare(root, url=server.url, md5=md5, train_per_class=4, workers=1, quiet=True)
    finally:
        server.close()
    assert meta["counts"]["train"] == 12 and server.ranges == [None]
    assert open(os.path.join(root, "caltech-101.zip"), "rb").read() == data
    assert not os.path.exists(os.path.join(root, "caltech-101.zip.part"))


def test_download_resumes_a_partial_file(official_like_zip, tmp_path):
    data, md5 = official_like_zip
    root = tmp_path / "root"
    root.mkdir()
    (root / "caltech-101.zip.part").write_bytes(data[:1000])  # what an interrupted download leaves
    server = ArchiveServer(data)
    try:
        download.prepare(str(root), url=server.url, md5=md5, train_per_class=4, workers=1, quiet=True)
    finally:
        server.close()
    assert server.ranges == ["bytes=1000-"]
    assert (root / "caltech-101.zip").read_bytes() == data


@pytest.mark.parametrize("kind", ["html", "corrupt"])
def test_bad_downloads_leave_nothing_at_the_final_path(official_like_zip, tmp_path, kind):
    data, md5 = official_like_zip
    if kind == "html":
        server = ArchiveServer(b"<!DOCTYPE html><html>Please sign in</html>", content_type="text/html")
    else:
        server = ArchiveServer(data[:100] + b"X" + data[101:])
    root = tmp_path / "root"
    try:
        with pytest.raises(errors.PrepareError, match="HTML page" if kind == "html" else "md5"):
            download.prepare(str(root), url=server.url, md5=md5, workers=1, quiet=True)
    finally:
        server.close()
    assert not (root / "caltech-101.zip").exists() and not (root / download.IMAGES_DIR).exists()
