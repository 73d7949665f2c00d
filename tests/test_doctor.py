"""doctor.py: every check on this machine, and with stubs for what it lacks (GPUs, an unusable driver, no DALI,
no onnxruntime): the table's rows and the exit code (1 exactly when training cannot run)."""
import sys
import types

import torch

import data_utils
import doctor
from conftest import run_cli
from kit.base import devices
from kit.data import dali_loader


def table(capfd, *argv):
    code, out, err = run_cli(doctor.cli, list(argv), capfd)
    rows = {}
    for line in out.splitlines()[2:]:
        if line.startswith("| "):
            what, status, detail = (cell.strip() for cell in line.strip("|").split("|", 2))
            rows[what] = (status, detail.rstrip(" |"))
    return code, rows, out


def test_this_machine(prepared_root, capfd):
    code, rows, out = table(capfd, "--data_root", prepared_root)
    assert code == 0 and out.strip().endswith("ready to train")
    assert rows["torch"][1].startswith(torch.__version__)
    assert rows["DALI"] == ("ok", f"{dali_loader.VERSION}; a 16x12 JPEG decoded to 16x12 with the cpu decoder")
    classes = open(f"{prepared_root}/classes.txt").read().split()
    train, val = (len(open(f"{prepared_root}/{split}.txt").read().splitlines()) for split in ("train", "val"))
    assert rows["data"][0] == "ok" and f": {len(classes)} classes, {train} train / {val} val images" in rows["data"][1]
    assert rows["--device auto"] == ("ok", "cpu, --amp auto: " + ("bf16" if devices.resolve_amp(
        "auto", torch.device("cpu"))[0] else "off"))
    assert rows["--loader auto"] == ("ok", f"dali, since DALI {dali_loader.VERSION} runs on cpu")
    assert float(rows["free disk"][1].split()[0]) > 0


def test_unprepared_data_and_an_unusable_gpu_fail(tmp_path, monkeypatch, capfd):
    code, rows, out = table(capfd, "--data_root", str(tmp_path / "none"))
    assert code == 1 and rows["data"][0] == "FAIL" and "download.py" in rows["data"][1]
    assert out.strip().endswith("training cannot run here: see data")
    monkeypatch.setattr(devices, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(doctor, "driver_version", lambda: "470.57.02")
    code, rows, _ = table(capfd, "--data_root", str(tmp_path / "none"))
    status, detail = rows["NVIDIA driver"]
    assert code == 1 and status == "FAIL" and detail.startswith("470.57.02: an NVIDIA GPU is present but this torch")
    assert rows["--device auto"][1].startswith("cpu")


def test_gpus_with_their_amp_and_hardware_decoder(prepared_root, monkeypatch, capfd):
    """An A100 (compute capability 8.0: bf16, hardware JPEG decoder) and a T4 (7.5: fp16 with a GradScaler)."""
    gpus = [types.SimpleNamespace(name="NVIDIA A100-SXM4-40GB", total_memory=40 * 2**30, major=8, minor=0),
            types.SimpleNamespace(name="Tesla T4", total_memory=15 * 2**30, major=7, minor=5)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpus[index])
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device: (gpus[device.index].major, gpus[device.index].minor))
    monkeypatch.setattr(doctor, "driver_version", lambda: "550.54.15")
    decoded = []
    monkeypatch.setattr(dali_loader, "decodes_a_jpeg", lambda device: decoded.append(device) or (True, "decoded"))
    code, rows, _ = table(capfd, "--data_root", prepared_root)
    assert code == 0 and set(decoded) == {torch.device("cuda", 0)}  # the mixed decoder on the GPU auto picks
    assert rows["NVIDIA driver"] == ("ok", "550.54.15; torch sees 2 GPU(s)")
    assert rows["GPU 0"] == ("ok", "NVIDIA A100-SXM4-40GB, 40.0 GiB, compute capability 8.0; --amp auto: bf16; "
                                   "hardware JPEG decoder: yes")
    assert rows["GPU 1"] == ("ok", "Tesla T4, 15.0 GiB, compute capability 7.5; --amp auto: fp16 + GradScaler; "
                                   "hardware JPEG decoder: no")
    assert rows["--device auto"] == ("ok", "cuda:0, --amp auto: bf16")
    assert rows["--loader auto"] == ("ok", f"dali, since DALI {dali_loader.VERSION} runs on cuda")


def test_missing_or_broken_pieces(prepared_root, monkeypatch, capfd):
    monkeypatch.setattr(dali_loader, "decodes_a_jpeg", lambda device: (False, "the cpu decoder failed: boom"))
    code, rows, _ = table(capfd, "--data_root", prepared_root)
    assert code == 1 and rows["DALI"] == ("FAIL", f"{dali_loader.VERSION}; the cpu decoder failed: boom")
    # --loader auto picks what the DALI row says works: the torch loader, in doctor and in training alike.
    assert rows["--loader auto"] == ("ok", f"torch, since DALI {dali_loader.VERSION} is installed but cannot decode "
                                           f"here (the cpu decoder failed: boom)")
    assert data_utils.choose_loader("auto", torch.device("cpu"))[0] == "torch"
    monkeypatch.setattr(dali_loader, "HAVE_DALI", False)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    code, rows, _ = table(capfd, "--data_root", prepared_root)
    assert code == 0
    assert rows["DALI"][0] == "warn" and "not installed" in rows["DALI"][1]
    assert rows["onnxruntime"][0] == "warn" and "pip install onnxruntime" in rows["onnxruntime"][1]
    assert rows["--loader auto"][1].startswith("torch, since DALI is not installed here")
