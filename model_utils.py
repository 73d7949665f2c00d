"""Model construction, weight loading, freezing and parameter groups for the Caltech-101 kit (each architecture's
anatomy, its head, stages and Grad-CAM layers, is archs.py's).

    import torch, model_utils
    model = model_utils.get_model(num_classes=101, pretrained=False)
    model.load_state_dict(torch.load("checkpoints/r18_pretrain_lowwd_mix02/best.pth", map_location="cpu"))

`pretrained=True` loads torchvision's ImageNet weights through torchvision's own API (downloaded into the torch
hub cache on first use); `weights=PATH` starts from a local state dict instead (its classifier is dropped when
the class count differs). Every load is `weights_only=True`.
"""
import os
import pickle
import re

import torch
import torch.nn as nn
import torchvision

from kit.base import errors
from kit.models import archs, weights_file

ARCHS = tuple(archs.ANATOMIES)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers




def strip_prefixes(state_dict):
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def safe_load(path):
    """torch.load with weights_only=True, every failure turned into a errors.ModelError that names the file.

    A file carrying pickled code is refused before anything in it runs, and never retried unsafely.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise errors.ModelError(f"{path} does not exist") from None
    except pickle.UnpicklingError as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch colours parts of its message
        first = text.splitlines()[0] if text else type(e).__name__
        raise errors.ModelError(f"refused to load {path}: it holds more than tensors and plain data "
                                f"({first[:200]})") from None
    except Exception as e:  # noqa: BLE001 - a corrupt archive surfaces as KeyError, RuntimeError, EOFError, ...
        raise errors.ModelError(f"cannot read {path} as a checkpoint (truncated or not a .pth file): "
                                f"{type(e).__name__}") from None


def load_state_dict_file(path):
    """A model state dict from a .pth (a plain state dict, or the 'model' entry of a training checkpoint) or from a
    .safetensors file (export.py's: no pickle; load_trained checks its metadata)."""
    if weights_file.is_safetensors(path):
        return strip_prefixes(weights_file.read(path)[0])
    obj = safe_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise errors.ModelError(f"{path} does not hold a state dict of tensors")
    return strip_prefixes(obj)


def load_trained(path, num_classes, arch="resnet18"):
    """A model holding fine-tuned weights (a best.pth or last.pth), for evaluation or prediction.

    Unlike `get_model(weights=...)`, which initialises from any ResNet and drops a mismatched head, this
    requires the checkpoint to be a model of exactly this architecture and class count (a .safetensors file's
    metadata says both).
    """
    if weights_file.is_safetensors(path):
        state, meta = weights_file.read(path)
        if (meta["arch"], meta["num_classes"]) != (arch, num_classes):
            raise errors.ModelError(f"{path} holds a {meta['num_classes']}-class {meta['arch']} (its metadata), not "
                                    f"the {num_classes}-class {arch} asked for")
        state = strip_prefixes(state)
    else:
        state = load_state_dict_file(path)
    head = state.get(archs.ANATOMIES[arch].classifier + ".weight") if arch in archs.ANATOMIES else None
    if head is not None and head.shape[0] != num_classes:
        raise errors.ModelError(f"{path} has a {head.shape[0]}-class head but this model has {num_classes} classes"
                                + (" (ImageNet weights? pass them as --weights to initialise a run)"
                            if head.shape[0] == 1000 else ""))
    model = get_model(num_classes, pretrained=False, arch=arch)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        why = state_mismatch(state, model.state_dict(), num_classes)
        raise errors.ModelError(f"{path} does not fit a {arch}: {why}") from None
    return model


def state_mismatch(state, expected, num_classes):
    """What differs between a state dict and a model's, in a few words, and which architecture it does fit."""
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    said = [f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else "",
            f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "",
            f"{len(shapes)} of another shape (e.g. {shapes[0]}: {tuple(state[shapes[0]].shape)} vs "
            f"{tuple(expected[shapes[0]].shape)})" if shapes else ""]
    with torch.device("meta"):  # shapes only, no memory
        fits = [a for a in ARCHS if {k: v.shape for k, v in torchvision.models.get_model(
            a, num_classes=num_classes).state_dict().items()} == {k: v.shape for k, v in state.items()}]
    return ", ".join(s for s in said if s) + (f"; it fits {fits[0]} (--arch {fits[0]})" if fits else "")


def imagenet_weights(arch):
    return torchvision.models.get_model_weights(arch).DEFAULT


def hub_checkpoint_path(arch):
    """Where torchvision caches (and looks for) the ImageNet weights of arch."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(imagenet_weights(arch).url))


def get_model(num_classes=101, pretrained=False, arch="resnet18", weights=None, quiet=False):
    """A torchvision model with a fresh classifier for num_classes (`weights`: a local state dict to start from;
    its classifier is dropped when its class count differs)."""
    if arch not in ARCHS:
        raise errors.ModelError(f"unknown arch '{arch}'; choose from {', '.join(ARCHS)}")
    classifier = archs.ANATOMIES[arch].classifier + "."
    if weights is not None:
        model = archs.build(arch, num_classes)
        state = load_state_dict_file(weights)
        head = {k for k in state if k.startswith(classifier)}
        if head and state[classifier + "weight"].shape[0] != num_classes:
            if not quiet:
                print(f"{weights}: dropping its {state[classifier + 'weight'].shape[0]}-class head "
                      f"(this run has {num_classes} classes)")
            state = {k: v for k, v in state.items() if k not in head}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith(classifier)]:
            raise errors.ModelError(f"{weights} does not fit {arch}: {len(missing)} missing keys (e.g. "
                                    f"{missing[:1]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:1]})")
        return model
    if not pretrained:
        return archs.build(arch, num_classes)
    try:
        return archs.build(arch, num_classes, weights=imagenet_weights(arch))
    except OSError as e:  # URLError is an OSError: no network, DNS, HTTP failure
        raise errors.ModelError(f"cannot get the ImageNet weights of {arch} ({e}); offline, pass --weights PATH or "
                                f"place the file at {hub_checkpoint_path(arch)}") from None


def memory_format(channels_last):
    """The memory layout of the model and its inputs: NHWC (channels_last, the fast layout for convolutions with
    AMP) or plain NCHW. Every place that moves a model or a batch asks here."""
    return torch.channels_last if channels_last else torch.contiguous_format


def unwrap(model):
    """The plain module under DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def export_state_dict(model):
    """The released-weights form: plain keys, CPU tensors, NCHW-contiguous (not channels_last)."""
    return {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}


# --trainable: what trains (all | the last stage and the head | the head); and the old --freeze values.
TRAINABLE = ("all", "layer4+head", "head")
TRAINABLE_ALIASES = {"none": "all", "layer4": "layer4+head"}


def stage_of(model, name):
    """The stage (archs.Anatomy.stages) a parameter or module of `model` belongs to."""
    return archs.anatomy_of(unwrap(model)).stage_of(name)


def trains(model, trainable):
    """name -> whether that parameter (or module) of `model` trains under --trainable (`all` needs no anatomy: any
    module trains whole)."""
    trainable = TRAINABLE_ALIASES.get(trainable, trainable)
    if trainable == "all":
        return lambda name: True
    anatomy = archs.anatomy_of(unwrap(model))
    stages = anatomy.trainable_stages(trainable)
    return lambda name: anatomy.stage_of(name) in stages


def apply_freeze(model, trainable):
    training = trains(model, trainable)
    for name, param in unwrap(model).named_parameters():
        param.requires_grad_(training(name))


def set_train_mode(model, trainable, frozen_bn="eval"):
    """model.train(); with frozen_bn="eval", frozen parts keep BatchNorm in eval mode, so their running statistics
    stay fixed (frozen_bn="train" lets them follow the new data while their weights stay fixed)."""
    model = unwrap(model)
    model.train()
    if TRAINABLE_ALIASES.get(trainable, trainable) == "all" or frozen_bn == "train":
        return
    training = trains(model, trainable)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not training(name):
            module.eval()


def stage_peak_lrs(lr_backbone, lr_fc, layer_decay=0.0, stage_lrs=None, stages=archs.RESNET.stages):
    """{stage: peak LR} over `stages` (from the head down). stage_lrs (from the head down; a shorter list's last
    LR goes to every stage below it) wins; else layer_decay D gives the last stage lr_backbone and each stage below
    one more factor D, the way timm scales layers; else the backbone shares lr_backbone. The head gets lr_fc."""
    if stage_lrs:
        return {stage: stage_lrs[min(i, len(stage_lrs) - 1)] for i, stage in enumerate(stages)}
    lrs = {"head": lr_fc}
    for k, stage in enumerate(stages[1:]):
        lrs[stage] = lr_backbone * (layer_decay ** k if layer_decay else 1.0)
    return lrs


def param_groups(model, lr_backbone, lr_fc, weight_decay, layer_decay=0.0, stage_lrs=None, per_stage=None,
                 include_frozen=False):
    """Optimizer groups: one per stage (the architecture's six: stem, four stages, head) and decay kind, with no
    weight decay on BatchNorm and bias (1-D) parameters. Each carries a 'name', its 'stage' and its peak 'lr'. With
    the plain backbone/head LR (no layer_decay or stage_lrs, per_stage False) the backbone stages share two groups.
    Frozen parameters are left out unless include_frozen (gradual unfreezing: they join at 0 LR and start learning
    when unfrozen)."""
    anatomy = archs.anatomy_of(unwrap(model))
    lrs = stage_peak_lrs(lr_backbone, lr_fc, layer_decay, stage_lrs, anatomy.stages)
    per_stage = bool(layer_decay or stage_lrs) if per_stage is None else per_stage
    groups = {}
    for name, param in unwrap(model).named_parameters():
        if not (param.requires_grad or include_frozen):
            continue
        stage = anatomy.stage_of(name)
        part = stage if per_stage or stage == "head" else "backbone"
        decay = param.ndim > 1
        key = f"{part}_{'decay' if decay else 'no_decay'}"
        if key not in groups:
            groups[key] = {"name": key, "stage": part, "params": [], "lr": lrs[stage],
                           "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append(param)
    order = {stage: i for i, stage in enumerate((*anatomy.stages[:0:-1], "backbone", "head"))}
    return sorted(groups.values(), key=lambda g: (order[g["stage"]], g["name"]))
