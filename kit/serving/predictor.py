"""A trained model ready to predict, behind one interface whatever it was saved as: a run folder, best.pth or a
.safetensors file (PyTorch), or an exported model.onnx (onnxruntime). predict.py and serve.py use it.

    from kit.serving import predictor
    model = predictor.load("checkpoints/cpu_smoke")            # or best.safetensors, or export/model.onnx
    model.predict(["a.jpg", pil_image], topk=5)                # [[(class name, probability), ...], ...]
    logits = model.logits(model.preprocess([("a.jpg", jpeg_bytes)]))

Preprocessing is the run's val transform: shorter side to img_size*256/224, centre crop img_size (for model.onnx,
the size in its preprocess.json).
"""
import io
import json
import os

import torch

import model_utils
from kit.base import errors
from kit.data import splits
from kit.reporting import gradcam
from kit.training import runs


class NamedBytes(io.BytesIO):
    """An upload's bytes that PIL's and the kit's messages call by the upload's name."""

    def __init__(self, data, name):
        super().__init__(data)
        self.upload = name  # not `name`: PIL would take that for a path on disk

    def __repr__(self):
        return self.upload


def load(checkpoint, device="cpu", **weight_flags):
    """OnnxPredictor for a .onnx file, else Predictor (weight_flags: data_root, arch, img_size, classes)."""
    if str(checkpoint).endswith(".onnx"):
        return OnnxPredictor(checkpoint)
    return Predictor(checkpoint, device=device, **weight_flags)


class Predictor:
    """A trained run ready to predict: model, class names and the run's val preprocessing."""

    def __init__(self, run, device="cpu", data_root=None, arch=None, img_size=None, classes=None):
        self.run = runs.open_run(run, arch, img_size, classes, data_root)
        self.classes, self.img_size = self.run.classes, self.run.img_size
        self.device = torch.device(device)
        self.model = model_utils.load_trained(self.run.path, len(self.classes), self.run.arch).to(self.device).eval()
        self.transform = splits.val_transform(self.img_size)

    def describe(self):
        return f"{self.run.arch} from {self.run.path} ({len(self.classes)} classes, {self.img_size} px)"

    def load(self, image):
        """A PIL RGB image from a path or a PIL image; errors.DataError naming the file if it is not an image."""
        from PIL import Image

        return image.convert("RGB") if isinstance(image, Image.Image) else splits.load_rgb(image)

    def batch(self, pil_images):
        return torch.stack([self.transform(img) for img in pil_images]).to(self.device)

    def preprocess(self, files):
        """A CPU batch of [(name, encoded bytes)]; errors.DataError naming the first file that is not an image."""
        images = []
        for name, data in files:
            if not data:
                raise errors.DataError(f"cannot decode {name}: it is empty")
            images.append(self.transform(splits.load_rgb(NamedBytes(data, name))))
        return torch.stack(images)

    @torch.inference_mode()
    def logits(self, batch):
        """float32 logits (N, classes) on the CPU of a preprocessed batch."""
        return self.model(batch.to(self.device)).float().cpu()

    def probabilities(self, images):
        """(N, num_classes) softmax probabilities for paths and/or PIL images."""
        if not images:
            return torch.empty(0, len(self.classes))
        return self.logits(self.batch([self.load(img) for img in images])).softmax(1)

    def ranked(self, probs, topk):
        """Per row of probabilities, the top-k (class name, probability) pairs, most probable first."""
        top = probs.topk(min(topk, len(self.classes)), dim=1)
        return [[(self.classes[i], p) for p, i in zip(ps.tolist(), idx.tolist())]
                for ps, idx in zip(top.values, top.indices)]

    def top(self, logits, topk):
        """Per row of logits, the top-k as [{"class", "probability"}] (predict.py --json's form)."""
        return [[{"class": c, "probability": p} for c, p in row] for row in self.ranked(logits.softmax(1), topk)]

    def predict(self, images, topk=5):
        """For each image (a path, a PIL image, or a list of them), the top-k (class name, probability) pairs, most
        probable first; one image gives a list of one."""
        if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert"):
            images = [images]
        return self.ranked(self.probabilities(list(images)), topk)

    def heatmap(self, image, out_path, target=None, method="gradcam", layer=None):
        """Save a Grad-CAM overlay for `target` (a class name; default: the predicted class)."""
        pil = self.load(image)
        if target is None:
            with torch.inference_mode():
                class_idx = int(self.model(self.batch([pil])).argmax(1))
        elif target in self.classes:
            class_idx = self.classes.index(target)
        else:
            raise errors.ConfigError(f"unknown --target class '{target}'; see classes.txt")
        try:
            picture = gradcam.explain(self.model, pil, self.img_size, class_idx, method=method, layer=layer)
        except ValueError as e:
            raise errors.ConfigError(str(e)) from None
        picture.save(out_path, format="PNG")
        return self.classes[class_idx]


class OnnxPredictor(Predictor):
    """The same predictions from an exported model.onnx through onnxruntime (CPU), with the preprocessing that
    export.py wrote beside it (preprocess.json): no kit checkpoint or PyTorch model involved."""

    def __init__(self, onnx_path):
        import onnxruntime

        spec_path = os.path.join(os.path.dirname(os.path.abspath(onnx_path)), "preprocess.json")
        try:
            with open(spec_path, encoding="utf-8") as f:
                spec = json.load(f)
        except OSError:
            raise errors.ModelError(f"no preprocess.json beside {onnx_path}: export with export.py") from None
        try:
            self.session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own classes for unreadable models
            raise errors.ModelError(f"cannot load {onnx_path} with onnxruntime: {str(e).splitlines()[0]}") from None
        self.path = onnx_path
        self.classes, self.img_size = spec["classes"], spec["input"]["height"]
        self.input_name = spec["input"]["name"]
        self.device = torch.device("cpu")
        self.transform = splits.val_transform(self.img_size)

    def describe(self):
        return f"ONNX model {self.path} ({len(self.classes)} classes, {self.img_size} px)"

    def logits(self, batch):
        return torch.from_numpy(self.session.run(None, {self.input_name: batch.numpy()})[0]).float()

    def heatmap(self, *args, **kwargs):
        raise errors.ConfigError("Grad-CAM needs the PyTorch model: use --checkpoint instead of --onnx")
