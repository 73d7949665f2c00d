"""Exporting a trained model: ONNX and torch.export (.pt2) files and preprocess.json, each format checked against the
eager PyTorch model. export.py is its command line; bench.py times write_onnx's file.

    report = exporter.export(runs.open_run("checkpoints/cpu_smoke"), "deploy/", formats=("onnx",))

Writes model.onnx (one file, weights inside, a dynamic batch axis, opset 18, torch.onnx's torch.export-based
exporter), model.pt2 (torch.export.save; load with torch.export.load(path).module()) and preprocess.json (input
size, shorter-side resize and centre crop, interpolation, 0-1 scaling, mean/std, RGB, NCHW, class names in label
order). The check runs onnxruntime (CPU) and the exported program against the eager model on the run's real val
images when the data root is there (else generated inputs), at batch 1 and at batch 8 (the export traces batch 2):
max absolute logit difference (reported) within rtol 1e-3 / atol 1e-5, and identical top-1. A mismatch exits
non-zero naming the figures.
"""
import json
import os

import numpy as np
import torch

import model_utils
from kit.base import errors
from kit.data import splits
from kit.models import weights_file

OPSET = 18  # pinned: onnxruntime 1.16+ runs it, and torch's exporter targets it natively
RTOL, ATOL = 1e-3, 1e-5  # PyTorch's ONNX tutorial's tolerance for exported models against eager
EXPORT_BATCH, CHECK_BATCHES = 2, (1, 8)


def preprocess_spec(img_size, classes, arch):
    return {"input": {"name": "images", "layout": "NCHW", "dtype": "float32", "channels": "RGB",
                      "height": img_size, "width": img_size},
            "resize": {"shorter_side": splits.resize_size(img_size), "interpolation": "bilinear, antialiased "
                       "(PIL BILINEAR)", "longer_side": "round(longer * shorter_side / shorter)"},
            "center_crop": {"size": img_size, "offset": "round((side - size) / 2), halves rounded up"},
            "scale": "pixel / 255 (0-1)", "mean": list(splits.IMAGENET_MEAN), "std": list(splits.IMAGENET_STD),
            "normalize": "(pixel / 255 - mean) / std per channel",
            "output": {"name": "logits", "softmax": "not applied"}, "classes": classes, "arch": arch,
            "opset": OPSET}


def check_inputs(run, data_root, count):
    """(images, source): preprocessed real val images of the run's split, or generated ones without the data."""
    try:
        files, _ = splits.read_split(data_root, "val")
    except errors.DataError:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(max(count, 16), 3, run.img_size, run.img_size, generator=generator), "generated inputs"
    files = files if count <= 0 else files[:count]
    transform = splits.val_transform(run.img_size)
    root = splits.image_root(data_root)
    images = torch.stack([transform(splits.load_rgb(os.path.join(root, f))) for f in files])
    return images, f"{len(files)} real val images of {data_root}"


def compare(reference, got, name, batch):
    """(max abs difference, top-1 agreement); errors.ExportError when outside the tolerance or a top-1 differs."""
    got = torch.as_tensor(np.asarray(got))
    diff = (got - reference).abs()
    worst = diff.max().item()
    agree = (got.argmax(1) == reference.argmax(1)).float().mean().item()
    if bool((diff > ATOL + RTOL * reference.abs()).any()) or agree < 1.0:
        raise errors.ExportError(f"{name} differs from eager PyTorch at batch {batch}: max abs logit difference "
                                 f"{worst:.3g} (allowed {ATOL} + {RTOL} x |logit|), top-1 agreement {agree:.4f}")
    return worst, agree


def run_in_batches(fn, images, batch):
    return torch.cat([torch.as_tensor(np.asarray(fn(images[i:i + batch]))) for i in range(0, len(images), batch)])


def write_onnx(model, img_size, path):
    """model.onnx: torch.onnx's torch.export-based exporter (the TorchScript one is deprecated in torch 2.14), one
    file with the weights inside, a dynamic batch axis, opset OPSET."""
    example = torch.zeros(EXPORT_BATCH, 3, img_size, img_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(model, (example,), path, dynamo=True, external_data=False, opset_version=OPSET,
                      input_names=["images"], output_names=["logits"], dynamic_shapes={"x": {0: batch}},
                      verbose=False)
    return path


def write_pt2(model, img_size, path):
    example = torch.zeros(EXPORT_BATCH, 3, img_size, img_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}}), path)
    return path


def export(run, out_dir, formats=("onnx", "pt2"), data_root=None, check_images=64, kit_version="unknown"):
    """Export and check; returns the report (files, sizes, differences). kit_version goes into a .safetensors
    file's metadata."""
    model = model_utils.load_trained(run.path, len(run.classes), run.arch).eval()
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write-test")
        open(probe, "w", encoding="utf-8").close()
        os.remove(probe)
    except OSError as e:
        raise errors.ExportError(f"cannot write to {out_dir}: {e.strerror}") from None
    images, source = check_inputs(run, data_root or run.cfg.get("data_root", ""), check_images)
    with torch.inference_mode():
        reference = run_in_batches(model, images, 64)
    report = {"checkpoint": os.path.abspath(run.path), "inputs": source, "tolerance": {"rtol": RTOL, "atol": ATOL},
              "files": {}}
    if "onnx" in formats:
        import onnxruntime

        path = write_onnx(model, run.img_size, os.path.join(out_dir, "model.onnx"))
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        run_onnx = lambda x: session.run(None, {"images": x.numpy()})[0]  # noqa: E731
        report["files"]["model.onnx"] = check(run_onnx, reference, images, path, "ONNX (onnxruntime CPU)")
    if "pt2" in formats:
        path = write_pt2(model, run.img_size, os.path.join(out_dir, "model.pt2"))
        program = torch.export.load(path).module()
        with torch.inference_mode():
            report["files"]["model.pt2"] = check(program, reference, images, path, "torch.export program")
    if "safetensors" in formats:
        path = weights_file.write(os.path.join(out_dir, "model.safetensors"), model_utils.export_state_dict(model),
                                  run.arch, run.classes, run.img_size, kit_version)
        reloaded = model_utils.load_trained(path, len(run.classes), run.arch).eval()  # the file, read back
        with torch.inference_mode():
            report["files"]["model.safetensors"] = check(reloaded, reference, images, path, "safetensors weights")
    spec = preprocess_spec(run.img_size, run.classes, run.arch)
    with open(os.path.join(out_dir, "preprocess.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=1)
    with open(os.path.join(out_dir, "export_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return report


def check(fn, reference, images, path, name):
    """The export against eager at each check batch size, over all check images."""
    figures = {"size_mb": os.path.getsize(path) / 1e6}
    for batch in CHECK_BATCHES:
        worst, agree = compare(reference, run_in_batches(fn, images, batch), name, batch)
        figures[f"batch_{batch}"] = {"max_abs_diff": worst, "top1_agreement": agree}
    print(f"{name}: {path} ({figures['size_mb']:.1f} MB); " + "; ".join(
        f"batch {b}: max abs logit difference {figures[f'batch_{b}']['max_abs_diff']:.2e}, top-1 agreement "
        f"{figures[f'batch_{b}']['top1_agreement']:.4f}" for b in CHECK_BATCHES) + f" over {len(images)} images")
    return figures
