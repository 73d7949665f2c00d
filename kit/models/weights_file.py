"""Released weights as safetensors: the model's tensors with the metadata a user needs to run them (architecture,
class names, the val transform's size, mean and std, kit version), no pickle anywhere.

    from kit.models import weights_file
    weights_file.write("best.safetensors", model.state_dict(), run.arch, run.classes, run.img_size)
    state, meta = weights_file.read("best.safetensors")        # meta["arch"], meta["classes"], meta["eval_size"]

Without the kit (the README's lines): `safetensors.torch.load_file(path)` gives the state dict for
`torchvision.models.resnet18(num_classes=len(classes))`, and `safetensors.safe_open(path, "pt").metadata()` the
strings below (lists as JSON).
"""
import json
import os

from kit.base import errors
from kit.data import splits

FORMAT = "caltech101-kit weights 1"  # metadata["format"]: what the other keys mean
SUFFIX = ".safetensors"


def is_safetensors(path):
    return str(path).endswith(SUFFIX)


def metadata(arch, classes, eval_size, kit_version):
    """safetensors metadata (strings only): what predicting with the weights needs."""
    return {"format": FORMAT, "arch": arch, "num_classes": str(len(classes)), "classes": json.dumps(list(classes)),
            "eval_size": str(eval_size), "resize_shorter": str(splits.resize_size(eval_size)),
            "mean": json.dumps(list(splits.IMAGENET_MEAN)), "std": json.dumps(list(splits.IMAGENET_STD)),
            "kit_version": kit_version}


def write(path, state, arch, classes, eval_size, kit_version="unknown"):
    """A plain state dict (contiguous tensors, no shared storage) and its metadata, written to `path`."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    partial = f"{path}.partial"  # a reader never sees half a file
    save_file(tensors, partial, metadata=metadata(arch, classes, eval_size, kit_version))
    os.replace(partial, path)
    return path


def read(path):
    """(state dict, metadata) of a .safetensors file; a file that is not one, or lacks the kit's metadata, is a
    one-line errors.ModelError."""
    return opened(path, tensors=True)


def read_metadata(path):
    """The metadata alone (architecture, classes, eval_size, ...), without reading the tensors."""
    return opened(path, tensors=False)[1]


def opened(path, tensors):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else None
    except (SafetensorError, OSError) as e:
        raise errors.ModelError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if meta.get("format") != FORMAT:
        raise errors.ModelError(f"{path} has no {FORMAT!r} metadata (not written by export.py): its architecture "
                                f"and classes are unknown")
    try:
        info = {"arch": meta["arch"], "classes": json.loads(meta["classes"]), "eval_size": int(meta["eval_size"]),
                "num_classes": int(meta["num_classes"]), "kit_version": meta.get("kit_version", "unknown")}
    except (KeyError, ValueError) as e:
        raise errors.ModelError(f"{path}: metadata {e} is missing or malformed") from None
    if len(info["classes"]) != info["num_classes"]:
        raise errors.ModelError(f"{path}: metadata names {len(info['classes'])} classes but says num_classes "
                                f"{info['num_classes']}")
    return state, info


