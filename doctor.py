"""Checks this machine for the kit, in one table: Python and torch, the NVIDIA driver and whether torch can use it,
each GPU with the AMP mode `--amp auto` picks there, Apple's MPS, DALI and whether it decodes a JPEG on the device
(nvJPEG on a GPU), the hardware JPEG decoder, onnxruntime, the data root's free disk and split, and what
`--device auto` and `--loader auto` choose. Run it first on a new machine; it exits 1 when training cannot run
here (no prepared data, a GPU torch cannot use, a DALI that cannot decode).

    python doctor.py                              # data root data/Caltech101
    python doctor.py --data_root /data/caltech101
"""
import argparse
import os
import platform
import shutil
import subprocess
import sys

import torch

import data_utils
import presets
from kit.base import devices, errors
from kit.data import dali_loader, splits

OK, WARN, FAIL = "ok", "warn", "FAIL"
MIN_FREE_GIB = 2.0  # a run folder holds checkpoints of 45-135 MB each; extracted Caltech-101 is about 130 MB
MIN_PYTHON = (3, 10)  # torch 2.14's wheels (the README's Install says the same)
# GPUs with the hardware JPEG decoder DALI's hw_decoder_load feeds (A100, A30, H100 and their kin), by name.
HW_DECODER_GPUS = ("A100", "A30", "A800", "H100", "H200", "H800", "GH200")
AMP_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}


def driver_version():
    """The NVIDIA driver's version from nvidia-smi, or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out[0] if out else None


def gpu_rows():
    """One row per visible CUDA device: name, memory, compute capability, what --amp auto picks there."""
    rows = []
    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        props = torch.cuda.get_device_properties(index)
        amp_dtype, scaler = devices.resolve_amp("auto", device)
        amp = AMP_NAMES[amp_dtype] + (" + GradScaler" if scaler else "")
        hw = any(name in props.name for name in HW_DECODER_GPUS)
        rows.append((f"GPU {index}", OK, f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
                                         f"{props.major}.{props.minor}; --amp auto: {amp}; hardware JPEG decoder: "
                                         f"{'yes' if hw else 'no'}"))
    return rows


def data_rows(data_root):
    """Free disk where the data lives, and whether download.py has prepared it (the split a run would record)."""
    rows = []
    existing = os.path.abspath(data_root)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free / 2**30
    rows.append(("free disk", OK if free >= MIN_FREE_GIB else WARN, f"{free:.1f} GiB at {existing}"))
    try:
        classes = splits.read_classes(data_root)
        counts = {split: len(splits.read_split(data_root, split)[0]) for split in ("train", "val")}
        identity = splits.split_identity(data_root)
    except errors.DataError as e:
        rows.append(("data", FAIL, str(e)))
        return rows
    rows.append(("data", OK, f"{data_root}: {len(classes)} classes, {counts['train']:,} train / {counts['val']:,} val "
                              f"images; split {identity['train'][:12]}"))
    return rows


def checks(data_root):
    """Every row of the table: (what, status, detail)."""
    rows = [("python", OK if sys.version_info >= MIN_PYTHON else FAIL,
             f"{platform.python_version()} ({sys.executable})" + ("" if sys.version_info >= MIN_PYTHON else
                                                                  f"; the kit needs {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+")),
            ("torch", OK, f"{torch.__version__}, " + (f"built for CUDA {torch.version.cuda}" if torch.version.cuda
                                                       else "CPU-only build"))]
    driver = driver_version()
    unusable = devices.unusable_gpu()
    if unusable:
        rows.append(("NVIDIA driver", FAIL, f"{driver or 'version unknown'}: {unusable}"))
    elif driver or torch.cuda.is_available():
        rows.append(("NVIDIA driver", OK, f"{driver or 'version unknown'}; torch sees {torch.cuda.device_count()} "
                                          f"GPU(s)"))
    else:
        rows.append(("NVIDIA driver", "-", "none (no NVIDIA GPU here)"))
    if torch.cuda.is_available():
        rows += gpu_rows()
    rows.append(("Apple MPS", OK if devices.mps_available() else "-",
                 "available (--device auto uses it; untested by the kit)" if devices.mps_available()
                 else "not available"))
    device = devices.resolve_device("auto") if not unusable else torch.device("cpu")
    if dali_loader.HAVE_DALI:
        ok, what = dali_loader.decodes_a_jpeg(device) if device.type in ("cuda", "cpu") else (True, "not on mps")
        rows.append(("DALI", OK if ok else FAIL, f"{dali_loader.VERSION}; {what}"))
    else:
        rows.append(("DALI", WARN, f"not installed ({dali_loader.INSTALL}); the torch loader is used"))
    try:
        import onnxruntime
        rows.append(("onnxruntime", OK, onnxruntime.__version__))
    except ImportError:
        rows.append(("onnxruntime", WARN, "not installed: export.py's ONNX check and predict.py --onnx need it "
                                          "(pip install onnxruntime)"))
    rows += data_rows(data_root)
    amp_dtype, _ = devices.resolve_amp("auto", device)
    loader, why = data_utils.choose_loader("auto", device)
    rows.append(("--device auto", OK, f"{device}, --amp auto: {AMP_NAMES[amp_dtype]}"))
    rows.append(("--loader auto", OK, f"{loader}, since {why}"))
    return rows


def get_args_parser():
    p = argparse.ArgumentParser(description="Check this machine for the kit: one table, exit 1 if training cannot "
                                            "run.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_root", default=presets.DEFAULTS["data_root"], help="the prepared data root to check")
    return p


def main(args):
    rows = checks(args.data_root)
    width = max(len(what) for what, _, _ in rows)
    print(f"| {'check'.ljust(width)} | status | detail |\n|{'-' * (width + 2)}|--------|--------|")
    for what, status, detail in rows:
        print(f"| {what.ljust(width)} | {status.ljust(6)} | {detail} |")
    failed = [what for what, status, _ in rows if status == FAIL]
    print(f"training cannot run here: see {', '.join(failed)}" if failed else "ready to train")
    return {"rows": rows, "exit_code": 1 if failed else 0}


def cli(argv=None):
    return errors.run_cli(lambda args: main(args)["exit_code"], get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
