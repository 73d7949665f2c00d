"""The architecture seam: the one place that knows each architecture's anatomy. Everything else asks here.

    from kit.models import archs
    anatomy = archs.anatomy_of(model)          # or archs.ANATOMIES["mobilenet_v3_large"]
    anatomy.stage_of("features.14.block.0.0.weight")    # 'stage4': for layer-wise LRs and freezing
    anatomy.classifier                                   # 'classifier.3': the Linear resized to the classes
    anatomy.cam_layers["stage4"]                         # 'features.16': the map Grad-CAM explains by default

Per architecture: its head (the modules trained at lr_fc, "head" in stage lists), the Linear replaced for the
number of classes, how every parameter maps to one of six stages from the head down (head, four stages, stem: what
--stage_lrs, --layer_decay and --trainable count in), the layers with a spatial map that Grad-CAM can use, and
which of them it uses by default. torchvision builds the model and holds the ImageNet weights.

To add an architecture: one Anatomy (or reuse a family's) and one entry in ANATOMIES; tests/test_archs.py runs
every entry through build, groups, freezing, Grad-CAM and a state-dict round trip.
"""
import dataclasses
import typing

import torch.nn as nn
import torchvision


@dataclasses.dataclass(frozen=True)
class Anatomy:
    family: str  # torchvision's model class, how a built model is recognised
    head: str  # module path of the head: every parameter under it trains at lr_fc
    classifier: str  # module path of the Linear replaced by one with num_classes outputs
    stages: tuple  # the six stages from the head down, as --stage_lrs lists LRs
    stage_of: typing.Callable[[str], str]  # parameter or module name -> its stage
    cam_layers: dict  # stage -> module path with a spatial feature map (Grad-CAM's --layer)
    cam_default: str  # the stage Grad-CAM explains by default (the last spatial map)

    def head_linear(self, model):
        return model.get_submodule(self.classifier)

    def replace_classifier(self, model, num_classes):
        """The model with a fresh classifier Linear of num_classes outputs (same input width)."""
        parent, _, name = self.classifier.rpartition(".")
        old = self.head_linear(model)
        setattr(model.get_submodule(parent) if parent else model, name, nn.Linear(old.in_features, num_classes))
        return model

    def trainable_stages(self, trainable):
        """--trainable all | layer4+head (the last stage and the head, whatever the family calls the last stage) |
        head -> the stages that train (None: all)."""
        return {"all": None, "layer4+head": set(self.stages[:2]), "head": {"head"}}[trainable]


def resnet_stage(name):
    first = name.split(".", 1)[0]
    return "head" if first == "fc" else first if first.startswith("layer") else "stem"


RESNET = Anatomy(family="ResNet", head="fc", classifier="fc",
                 stages=("head", "layer4", "layer3", "layer2", "layer1", "stem"), stage_of=resnet_stage,
                 cam_layers={"conv1": "conv1", "layer1": "layer1", "layer2": "layer2", "layer3": "layer3",
                             "layer4": "layer4"}, cam_default="layer4")

# MobileNetV3-Large's `features`: 0 the stem conv, then inverted-residual blocks whose output is 112 px / 2 (1-3),
# / 8 (4-6), / 16 (7-12), / 32 (13-15), and 16 the last 1x1 conv; `classifier` is Linear 960->1280, Hardswish,
# Dropout, Linear 1280->classes.
MOBILENET_V3_STAGES = ((0, "stem"), (1, "stage1"), (4, "stage2"), (7, "stage3"), (13, "stage4"))


def mobilenet_v3_stage(name):
    first, _, rest = name.partition(".")
    if first != "features":
        return "head"
    index = int(rest.split(".", 1)[0]) if rest else 0
    return [stage for start, stage in MOBILENET_V3_STAGES if index >= start][-1]


MOBILENET_V3 = Anatomy(family="MobileNetV3", head="classifier", classifier="classifier.3",
                       stages=("head", "stage4", "stage3", "stage2", "stage1", "stem"), stage_of=mobilenet_v3_stage,
                       cam_layers={"stem": "features.0", "stage1": "features.3", "stage2": "features.6",
                                   "stage3": "features.12", "stage4": "features.16"}, cam_default="stage4")

ANATOMIES = {"resnet18": RESNET, "resnet34": RESNET, "resnet50": RESNET, "resnet101": RESNET,
             "mobilenet_v3_large": MOBILENET_V3}


def anatomy_of(model):
    """The Anatomy of a built model (wrappers such as DDP or torch.compile already taken off)."""
    for anatomy in ANATOMIES.values():
        if type(model).__name__ == anatomy.family:
            return anatomy
    raise ValueError(f"no anatomy for a {type(model).__name__}: add it to archs.ANATOMIES")


def build(arch, num_classes, weights=None):
    """torchvision's `arch` (with `weights`: a torchvision weights enum, or None) and a fresh classifier."""
    model = torchvision.models.get_model(arch, weights=weights)
    return ANATOMIES[arch].replace_classifier(model, num_classes)
