"""Ship the released weights without the kit: ONNX (onnxruntime, other languages, other devices), torch.export
(.pt2) and safetensors (the weights with their metadata, no pickle), each checked against the eager PyTorch model
before anything is called done.

    python export.py --checkpoint checkpoints/cpu_smoke                     # both formats into <run>/export/
    python export.py --checkpoint checkpoints/cpu_smoke --format onnx --out deploy/
    python export.py --checkpoint checkpoints/cpu_smoke --format safetensors      # weights + metadata, no pickle
    python export.py --checkpoint best.pth --arch resnet18 --img_size 96 --classes classes.txt   # bare weights
    python predict.py photo.jpg --onnx deploy/model.onnx                     # predict through onnxruntime

Writes model.onnx, model.pt2 (or what --format names: model.safetensors) and preprocess.json into the run's
export/ folder (or --out), each format checked
against the eager model on real val images; a mismatch exits non-zero naming the figures. What each file holds and
how the check works: kit/models/exporter.py.
"""
import argparse
import os
import sys

from kit.base import errors
from kit.models import exporter
from kit.training import runs

# --format: the files each value writes (preprocess.json always).
FORMATS = {"both": ("onnx", "pt2"), "onnx": ("onnx",), "pt2": ("pt2",), "safetensors": ("safetensors",),
           "all": ("onnx", "pt2", "safetensors")}


def get_args_parser():
    p = argparse.ArgumentParser(description="Export a trained run to ONNX and torch.export, checked against "
                                            "PyTorch.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder (its best.pth), best.pth or last.pth")
    p.add_argument("--format", default="both", choices=tuple(FORMATS),
                   help="both: onnx and pt2; safetensors: the weights and their metadata, no pickle; all: the three")
    p.add_argument("--out", default=None, help="output folder (default: <run>/export)")
    p.add_argument("--data_root", default=None, help="where the check's val images are (default: the run's)")
    p.add_argument("--check_images", type=int, default=64, help="val images to check on (0: the whole split)")
    runs.add_weight_flags(p)
    return p


def main(args):
    run = runs.open_run(args.checkpoint, args.arch, args.img_size, args.classes, args.data_root)
    out_dir = args.out or os.path.join(run.run_dir, "export")
    report = exporter.export(run, out_dir, FORMATS[args.format], args.data_root, args.check_images,
                             runs.kit_version())
    print(f"done: {', '.join(report['files'])} and preprocess.json in {out_dir} (checked on {report['inputs']})")
    return report


def cli(argv=None):
    return errors.run_cli(lambda args: main(args) and 0, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
