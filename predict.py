"""Top-k predictions of a trained run on your own images, with optional Grad-CAM heatmaps.

    python predict.py photo.jpg --checkpoint checkpoints/r18_pretrain_lowwd_mix02 --topk 5
    python predict.py my_folder/ --checkpoint checkpoints/cpu_smoke --json predictions.json
    python predict.py list.txt --checkpoint ... --gradcam --out_dir heatmaps/     # list.txt: one path per line

From Python:
    import predict
    predictor = predict.Predictor("checkpoints/cpu_smoke")          # run folder, best.pth or last.pth
    predictor.predict(["a.jpg", pil_image], topk=5)                 # [[(class name, probability), ...], ...]

Accepts JPEG, PNG, BMP, TIFF (grayscale, palette and CMYK become RGB). A file that is not an image gets a
one-line error naming it; the others are still predicted, and the exit code is 1 if any file failed.
Preprocessing is the val transform of the run: shorter side to img_size*256/224, centre crop img_size.
"""
import argparse
import json
import os
import sys

import torch

import checkpoint
import data_utils
import gradcam
import model_utils
import presets


class Predictor:
    """A trained run ready to predict: model, class names and the run's val preprocessing."""

    def __init__(self, run, device="cpu", data_root=None):
        path, run_dir = checkpoint.resolve_checkpoint(run)
        cfg = checkpoint.read_run_config(run_dir)
        self.classes = data_utils.read_classes(data_root or cfg["data_root"])
        self.img_size = cfg["img_size"]
        self.device = torch.device(device)
        self.model = model_utils.load_trained(path, len(self.classes), cfg["arch"]).to(self.device).eval()
        self.transform = data_utils.torch_transform(False, self.img_size)

    def load(self, image):
        """A PIL RGB image from a path or a PIL image; DataError naming the file if it is not an image."""
        from PIL import Image

        return image.convert("RGB") if isinstance(image, Image.Image) else data_utils.load_rgb(image)

    def batch(self, pil_images):
        return torch.stack([self.transform(img) for img in pil_images]).to(self.device)

    @torch.inference_mode()
    def probabilities(self, images):
        """(N, num_classes) softmax probabilities for paths and/or PIL images."""
        pil = [self.load(img) for img in images]
        return self.model(self.batch(pil)).float().softmax(1).cpu()

    def predict(self, images, topk=5):
        """For each image, the top-k (class name, probability) pairs, most probable first."""
        probs = self.probabilities(images)
        top = probs.topk(min(topk, len(self.classes)), dim=1)
        return [[(self.classes[i], p) for p, i in zip(ps.tolist(), idx.tolist())]
                for ps, idx in zip(top.values, top.indices)]

    def heatmap(self, image, out_path, target=None, method="gradcam", layer="layer4"):
        """Save a Grad-CAM overlay for `target` (a class name; default: the predicted class)."""
        pil = self.load(image)
        x = self.batch([pil])
        if target is None:
            with torch.inference_mode():
                class_idx = int(self.model(x).argmax(1))
        elif target in self.classes:
            class_idx = self.classes.index(target)
        else:
            raise presets.ConfigError(f"unknown --target class '{target}'; see classes.txt")
        heat = gradcam.class_activation_map(self.model, x, class_idx, layer=layer, method=method)[0]
        box = gradcam.centre_crop_box(pil.width, pil.height, data_utils.resize_size(self.img_size), self.img_size)
        gradcam.save_overlay(pil, heat, out_path, box=box)
        return self.classes[class_idx]


def expand_inputs(inputs):
    """Files from image paths, folders (recursively) and list files (.txt: one path per line)."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            for dirpath, _, names in sorted(os.walk(item)):
                files += [os.path.join(dirpath, n) for n in sorted(names) if not n.startswith(".")]
        elif item.endswith(".txt") and os.path.isfile(item):
            with open(item) as f:
                files += [line.strip() for line in f if line.strip()]
        else:
            files.append(item)
    return files


def get_args_parser():
    p = argparse.ArgumentParser(description="Top-k predictions (and Grad-CAM) of a trained run on images.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="images, folders (recursive) or .txt lists of paths")
    p.add_argument("--checkpoint", required=True, help="run folder, best.pth or last.pth")
    p.add_argument("--topk", type=int, default=5, help="classes listed per image")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--data_root", default=None, help="where classes.txt is (default: the run's data root)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    p.add_argument("--gradcam", action="store_true", help="write a heatmap overlay PNG per image")
    p.add_argument("--cam_method", default="gradcam", choices=("gradcam", "gradcam++"))
    p.add_argument("--target", default=None, help="class name to explain (default: the predicted class)")
    p.add_argument("--layer", default="layer4", help="layer whose activations Grad-CAM uses")
    p.add_argument("--out_dir", default="gradcam", help="where --gradcam overlays go")
    return p


def main(args):
    if args.topk < 1:
        raise presets.ConfigError("--topk must be >= 1")
    predictor = Predictor(args.checkpoint, device=args.device, data_root=args.data_root)
    files = expand_inputs(args.inputs)
    results, failures, used = [], [], {}
    for start in range(0, len(files), args.batch_size):
        chunk, images = [], []
        for path in files[start:start + args.batch_size]:
            try:
                images.append(predictor.load(path))
                chunk.append(path)
            except data_utils.DataError as e:
                failures.append(path)
                print(f"error: {e}", file=sys.stderr)
        if not images:
            continue
        for path, image, top in zip(chunk, images, predictor.predict(images, args.topk)):
            entry = {"file": path, "topk": [{"class": c, "probability": p} for c, p in top]}
            print(f"{path}: " + ", ".join(f"{c} {p:.3f}" for c, p in top))
            if args.gradcam:
                os.makedirs(args.out_dir, exist_ok=True)
                # <folder>__<file>: readable, and unique for Caltech-style trees; a repeat gets a counter.
                parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
                stem = f"{parent}__{os.path.splitext(os.path.basename(path))[0]}_{args.cam_method}"
                used[stem] = used.get(stem, 0) + 1
                overlay = os.path.join(args.out_dir, stem + (f"_{used[stem]}" if used[stem] > 1 else "") + ".png")
                # The decoded image and its prediction are at hand: no second decode, no extra forward pass.
                entry["gradcam_class"] = predictor.heatmap(image, overlay, args.target or top[0][0], args.cam_method,
                                                           args.layer)
                entry["gradcam"] = overlay
            results.append(entry)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "results": results, "failed": failures}, f, indent=1)
    print(f"{len(results)} predicted, {len(failures)} failed", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except (presets.ConfigError, data_utils.DataError, model_utils.ModelError) as e:
        sys.exit(f"error: {e}")
