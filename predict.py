"""Top-k predictions of a trained run on your own images, with optional Grad-CAM heatmaps.

    python predict.py photo.jpg --checkpoint checkpoints/r18_pretrain_lowwd_mix02 --topk 5
    python predict.py my_folder/ --checkpoint checkpoints/cpu_smoke --json predictions.json
    python predict.py data/val --checkpoint ... --random 5 --seed 1          # 5 random images of a folder
    python predict.py list.txt --checkpoint ... --gradcam --out_dir heatmaps/     # list.txt: one path per line
    python predict.py photo.jpg --checkpoint best.pth --arch resnet18 --img_size 224 --classes classes.txt
    python predict.py photo.jpg --onnx checkpoints/cpu_smoke/export/model.onnx    # exported model, onnxruntime
    python predict.py my_folder/ --checkpoint ... --gradcam --html my_folder.html  # one page: thumbnails, top-k

From Python:
    import predict
    predictor = predict.Predictor("checkpoints/cpu_smoke")          # run folder, best.pth or last.pth
    predictor.predict(["a.jpg", pil_image], topk=5)                 # [[(class name, probability), ...], ...]

Accepts JPEG, PNG, BMP, TIFF, WebP (grayscale, palette and CMYK become RGB; EXIF orientation applied). In folders,
files that are not images by their extension are skipped and counted; a file that is not a readable image gets a
one-line error naming it; the others are still predicted, and the exit code is 1 if any file failed.
Preprocessing is the val transform of the run: shorter side to img_size*256/224, centre crop img_size. The class
names come from the run folder, so a copied run folder predicts without its data root.
"""
import argparse
import hashlib
import json
import os
import random
import sys

from kit.base import errors
from kit.data import splits
from kit.reporting import gradcam, report_page
from kit.serving.predictor import OnnxPredictor, Predictor
from kit.training import runs


def expand_inputs(inputs):
    """(files, skipped): image paths from paths, folders (recursively; files that are not images by their extension
    are skipped and counted) and list files (.txt: one path per line)."""
    files, skipped = [], 0
    for item in inputs:
        if os.path.isdir(item):
            for dirpath, _, names in sorted(os.walk(item)):
                for name in sorted(names):
                    if name.startswith("."):
                        continue
                    if name.lower().endswith(splits.IMAGE_EXTENSIONS):
                        files.append(os.path.join(dirpath, name))
                    else:
                        skipped += 1
        elif item.endswith(".txt") and os.path.isfile(item):
            with open(item, encoding="utf-8") as f:
                files += [line.strip() for line in f if line.strip()]
        else:
            files.append(item)
    return files, skipped


OVERLAY_NAME_BYTES = 160  # file systems allow 255 bytes a name; room for a counter and the suffix


def overlay_path(out_dir, path, method, target, used):
    """<folder>__<file>_<method>_<target class>.png: readable, unique for Caltech-style trees and per target; a
    repeat gets a counter. A name longer than OVERLAY_NAME_BYTES (long class or file names) keeps its start and
    ends in a digest of the whole, so it stays a valid file name and unique."""
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    stem = f"{parent}__{os.path.splitext(os.path.basename(path))[0]}_{method}_{target}"
    if len(stem.encode("utf-8")) > OVERLAY_NAME_BYTES:
        digest = hashlib.sha1(stem.encode("utf-8")).hexdigest()[:12]
        stem = stem.encode("utf-8")[:OVERLAY_NAME_BYTES - 13].decode("utf-8", "ignore") + "~" + digest
    used[stem] = used.get(stem, 0) + 1
    return os.path.join(out_dir, stem + (f"_{used[stem]}" if used[stem] > 1 else "") + ".png")


def write_gallery(path, results, thumbs, failures, source):
    """--html: one self-contained page, a figure per image (thumbnail, Grad-CAM overlay, top-k probabilities)."""
    esc, num = report_page.esc, report_page.num
    figures = []
    for i, (entry, pictures) in enumerate(zip(results, thumbs)):
        images = "".join(f'<img alt="{esc(entry["file"])}" src="{uri}">' for uri in pictures)
        top = "<br>".join(f"{esc(t['class'])} {num(t['probability'], '.3f', 'results', i, 'topk', j, 'probability')}"
                          for j, t in enumerate(entry["topk"]))
        figures.append(f'<figure>{images}<figcaption><b>{top}</b><br><small>{esc(entry["file"])}</small>'
                       f'</figcaption></figure>')
    body = '<div class="gallery">' + "".join(figures) + "</div>"
    if failures:
        body += "<p class=\"bad\">not readable as images: " + ", ".join(esc(f) for f in failures) + "</p>"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return report_page.write(report_page.page(f"predictions of {os.path.basename(os.path.normpath(source))}",
                                              [("predictions", "Predictions", body)],
                                              subtitle=esc(f"model: {source}")), path)


def get_args_parser():
    p = argparse.ArgumentParser(description="Top-k predictions (and Grad-CAM) of a trained run on images.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="images, folders (recursive) or .txt lists of paths")
    p.add_argument("--checkpoint", default=None, help="run folder, best.pth or last.pth")
    p.add_argument("--onnx", default=None, help="an exported model.onnx (export.py) to predict with onnxruntime")
    p.add_argument("--topk", type=int, default=5, help="classes listed per image")
    p.add_argument("--random", type=int, default=0, metavar="N", help="predict N randomly chosen images of the "
                                                                      "inputs (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random's choice")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--data_root", default=None, help="where classes.txt is, for runs that do not hold it")
    runs.add_weight_flags(p)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    p.add_argument("--gradcam", action="store_true", help="write a heatmap overlay PNG per image")
    p.add_argument("--cam_method", default="gradcam", choices=("gradcam", "gradcam++"))
    p.add_argument("--target", default=None, help="class name to explain (default: the predicted class)")
    p.add_argument("--layer", default=None, help="layer whose activations Grad-CAM uses (ResNets: conv1, layer1-4; "
                                                 "default: the architecture's last spatial map, layer4 for ResNets)")
    p.add_argument("--out_dir", default="gradcam", help="where --gradcam overlays go")
    p.add_argument("--html", default=None, metavar="PATH", help="also write one self-contained page: a gallery of "
                                                               "the images with their top-k (and overlays)")
    return p


def main(args):
    for name in ("topk", "batch_size"):
        if getattr(args, name) < 1:
            raise errors.ConfigError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.random < 0:
        raise errors.ConfigError(f"--random must be >= 0, got {args.random}")
    if bool(args.checkpoint) == bool(args.onnx):
        raise errors.ConfigError("give --checkpoint (a run or weights) or --onnx (an exported model), one of them")
    if args.onnx and args.gradcam:
        raise errors.ConfigError("Grad-CAM needs the PyTorch model: use --checkpoint instead of --onnx")
    if args.onnx:
        predictor = OnnxPredictor(args.onnx)
    else:
        predictor = Predictor(args.checkpoint, device=args.device, data_root=args.data_root, arch=args.arch,
                              img_size=args.img_size, classes=args.classes)
    if args.gradcam and args.layer is not None and args.layer not in gradcam.layers(predictor.model):
        raise errors.ConfigError(f"--layer {args.layer}: Grad-CAM needs a layer with a spatial map: "
                                 f"{', '.join(gradcam.layers(predictor.model))}")
    if args.gradcam and args.target is not None and args.target not in predictor.classes:
        raise errors.ConfigError(f"unknown --target class '{args.target}'; see classes.txt")
    files, skipped = expand_inputs(args.inputs)
    if skipped:
        print(f"skipped {skipped} file(s) that are not images by their extension", file=sys.stderr)
    if args.random:
        files = random.Random(args.seed).sample(files, min(args.random, len(files)))
    results, failures, used, thumbs = [], [], {}, []
    for start in range(0, len(files), args.batch_size):
        chunk, images = [], []
        for path in files[start:start + args.batch_size]:
            try:
                images.append(predictor.load(path))
                chunk.append(path)
            except errors.DataError as e:
                failures.append(path)
                print(f"error: {e}", file=sys.stderr)
        if not images:
            continue
        for path, image, top in zip(chunk, images, predictor.predict(images, args.topk)):
            entry = {"file": path, "topk": [{"class": c, "probability": p} for c, p in top]}
            print(f"{path}: " + ", ".join(f"{c} {p:.3f}" for c, p in top))
            if args.gradcam:
                os.makedirs(args.out_dir, exist_ok=True)
                target = args.target or top[0][0]
                overlay = overlay_path(args.out_dir, path, args.cam_method, target, used)
                # The decoded image and its prediction are at hand: no second decode, no extra forward pass.
                entry["gradcam_class"] = predictor.heatmap(image, overlay, target, args.cam_method, args.layer)
                entry["gradcam"] = overlay
            results.append(entry)
            if args.html:
                thumbs.append([report_page.jpeg_uri(image, 200)] + ([report_page.jpeg_uri(
                    predictor.load(entry["gradcam"]), 200)] if args.gradcam else []))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"checkpoint": args.checkpoint or args.onnx, "results": results, "failed": failures}, f,
                      indent=1)
    if args.html:
        write_gallery(args.html, results, thumbs, failures, args.checkpoint or args.onnx)
    overlays = sum("gradcam" in r for r in results)
    print(f"{len(results)} predicted, {len(failures)} failed"
          + (f"; {overlays} Grad-CAM overlay(s) in {os.path.abspath(args.out_dir)}" if args.gradcam else ""),
          file=sys.stderr)
    return 1 if failures else 0


def cli(argv=None):
    return errors.run_cli(main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
