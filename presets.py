"""Every training setting with its default, and the named presets that reproduce the report's runs.

    python train_caltech101.py --exp r18_pretrain_lowwd_mix02        # a preset
    python train_caltech101.py --exp cpu_smoke --epochs 5            # a preset, one key overridden

Merge order: DEFAULTS, then the preset, then explicit command-line flags. `resolve()` does it and rejects
unknown keys, unknown presets and nonsense values with a one-line ConfigError.

The report states init, epochs, batch size, the two learning rates, weight decay and the MixUp/CutMix alphas.
It does not state the optimizer or schedule: we use AdamW (decoupled weight decay, no decay on BatchNorm and
bias parameters) with a linear warmup then cosine decay to zero, stepped every iteration.
"""
import copy

DEFAULT_EXP = "r18_pretrain_main"  # run 3 of the report, the kit's default

DEFAULTS = dict(
    # data
    data_root="data/Caltech101",  # prepared by download.py (classes.txt, train.txt, val.txt)
    loader="dali",  # dali | torch (torchvision/PIL fallback for machines without DALI)
    img_size=224,  # train crop and val centre crop, pixels
    crop_scale_min=0.08,  # RandomResizedCrop: smallest crop, as a fraction of the image area
    workers=8,  # DALI threads or DataLoader worker processes
    cache=False,  # decode every image once into uint8 on the device; crops/flips/normalize there each epoch
    drop_last=False,  # train: drop the short last batch (default keeps it: every image once per epoch)
    # model
    arch="resnet18",  # resnet18 | resnet34 | resnet50 | resnet101
    pretrained=True,  # start from torchvision's ImageNet weights (False: random init)
    weights=None,  # path to a local state dict to start from instead (offline use); its fc is dropped
    freeze="none",  # none | layer4 (train layer4 + head) | head (train the head only)
    # optimisation
    epochs=200,  # passes over the train split
    batch_size=128,  # images per step
    eval_batch_size=256,  # images per evaluation step (independent of the training batch)
    optimizer="adamw",  # adamw | sgd (nesterov)
    lr_backbone=2e-4,  # peak LR of every non-head parameter
    lr_fc=5e-3,  # peak LR of the new classification head
    weight_decay=1e-4,  # decoupled (AdamW) or L2 (SGD) decay; never on BatchNorm or bias parameters
    momentum=0.9,  # SGD momentum, or AdamW beta1
    warmup_epochs=5.0,  # linear warmup from 0 to the peak LRs, in epochs (fractions allowed)
    schedule="cosine",  # cosine | linear | constant: decay after warmup, down to min_lr_ratio * peak
    min_lr_ratio=0.0,  # final LR as a fraction of the peak
    grad_clip=0.0,  # max global grad norm (0: off)
    label_smoothing=0.0,  # folded into the soft targets
    mixup_alpha=0.4,  # Beta(alpha, alpha) for MixUp; 0 disables MixUp
    cutmix_alpha=1.0,  # Beta(alpha, alpha) for CutMix; 0 disables CutMix
    mix_switch_prob=0.5,  # with both alphas > 0: probability that a batch uses CutMix rather than MixUp
    # run
    device="auto",  # auto | cuda | cpu
    amp="auto",  # auto | bf16 | fp16 | off (auto: bf16 where supported, else fp16 on CUDA / off on CPU)
    channels_last=True,  # NHWC memory layout for model and inputs
    compile=False,  # torch.compile the model (first steps are slow while it compiles; weights stay prefix-free)
    seed=0,  # python, numpy, torch, DALI and MixUp RNGs
    eval_every=1,  # evaluate on val every N epochs (and always after the last)
    log_every=10,  # steps between progress-bar refreshes (each reads the loss from the device)
    progress=True,  # show a progress bar (off in CI logs and benchmarks)
    out_dir="checkpoints",  # the run writes to out_dir/<exp>/
    resume=None,  # path to a last.pth, or 'auto' for out_dir/<exp>/last.pth
    save_every_steps=0,  # also write last.pth every N steps inside an epoch (0: only at epoch ends)
    max_bad_steps=10,  # stop after this many non-finite losses in a row (updates skipped; checked at log points)
    deterministic=False,  # deterministic kernels (bit-identical reruns and resumes; slower on GPU)
)

CHOICES = dict(loader=("dali", "torch"), arch=("resnet18", "resnet34", "resnet50", "resnet101"),
               freeze=("none", "layer4", "head"), optimizer=("adamw", "sgd"),
               schedule=("cosine", "linear", "constant"), device=("auto", "cuda", "cpu"),
               amp=("auto", "bf16", "fp16", "off"))

_finetune = dict(pretrained=True, epochs=240, batch_size=96, lr_backbone=2e-4, lr_fc=4e-3, weight_decay=5e-5,
                 mixup_alpha=0.2, cutmix_alpha=1.0)  # the recipe of the report's best run (5)
_scratch = dict(pretrained=False, epochs=300, batch_size=64, lr_backbone=3e-3, lr_fc=3e-3, weight_decay=1e-3,
                mixup_alpha=0.4, cutmix_alpha=1.0)  # the recipe of the report's scratch run (1)

PRESETS = {
    # report run 1: ResNet-18 from scratch (val acc 0.712)
    "r18_scratch_main": dict(_scratch),
    # report run 2: scratch with more weight decay (val acc 0.723)
    "r18_scratch_wd2e3": dict(_scratch, lr_backbone=2.5e-3, lr_fc=2.5e-3, weight_decay=2e-3),
    # report run 3, the default: ImageNet init, differential LR (val acc 0.932)
    "r18_pretrain_main": dict(pretrained=True, epochs=200, batch_size=128, lr_backbone=2e-4, lr_fc=5e-3,
                              weight_decay=1e-4, mixup_alpha=0.4, cutmix_alpha=1.0),
    # report run 4: run 3 with a higher backbone LR (val acc 0.935)
    "r18_pretrain_lr3e4": dict(pretrained=True, epochs=200, batch_size=128, lr_backbone=3e-4, lr_fc=5e-3,
                               weight_decay=1e-4, mixup_alpha=0.4, cutmix_alpha=1.0),
    # report run 5, the best: lower weight decay, lighter MixUp, 240 epochs (val acc 0.940)
    "r18_pretrain_lowwd_mix02": dict(_finetune),
    # companion study: deeper ResNets fine-tuned with run 5's recipe (val acc 0.948 / 0.958 / 0.964)
    "r34_pretrain": dict(_finetune, arch="resnet34"),
    "r50_pretrain": dict(_finetune, arch="resnet50"),
    "r101_pretrain": dict(_finetune, arch="resnet101"),
    # companion study: the same depths from scratch with run 1's recipe (val acc 0.62-0.67)
    "r34_scratch": dict(_scratch, arch="resnet34"),
    "r50_scratch": dict(_scratch, arch="resnet50"),
    "r101_scratch": dict(_scratch, arch="resnet101"),
    # no GPU needed: ResNet-18 from scratch at 96 px, short warmup + cosine, label smoothing, bf16 + channels_last;
    # reaches about 0.66 val top-1 in under 15 minutes on 2 CPU cores (README, "Measured")
    "cpu_smoke": dict(pretrained=False, img_size=96, crop_scale_min=0.35, epochs=32, batch_size=64,
                      eval_batch_size=256, optimizer="adamw", lr_backbone=2e-3, lr_fc=2e-3, weight_decay=0.05,
                      warmup_epochs=2.0, schedule="cosine", label_smoothing=0.1, mixup_alpha=0.0, cutmix_alpha=0.0,
                      workers=2, eval_every=8, device="cpu", amp="auto"),
}


class ConfigError(Exception):
    """A bad preset name, key or value: reported as one line."""


def validate(cfg):
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise ConfigError(f"{key}={cfg[key]!r} is not valid; choose from {', '.join(allowed)}")
    positive = ("epochs", "batch_size", "eval_batch_size", "eval_every", "log_every", "max_bad_steps")
    for key in positive:
        if cfg[key] <= 0:
            raise ConfigError(f"{key} must be > 0 (got {cfg[key]})")
    for key in ("lr_backbone", "lr_fc", "weight_decay", "mixup_alpha", "cutmix_alpha", "warmup_epochs",
                "grad_clip", "workers", "min_lr_ratio", "label_smoothing", "save_every_steps"):
        if cfg[key] < 0:
            raise ConfigError(f"{key} must be >= 0 (got {cfg[key]})")
    if cfg["img_size"] < 32:
        raise ConfigError(f"img_size must be >= 32 pixels (got {cfg['img_size']})")
    if not 0 < cfg["crop_scale_min"] <= 1:
        raise ConfigError(f"crop_scale_min must be in (0, 1] (got {cfg['crop_scale_min']})")
    for key in ("mix_switch_prob", "min_lr_ratio"):
        if not 0 <= cfg[key] <= 1:
            raise ConfigError(f"{key} must be in [0, 1] (got {cfg[key]})")
    if not 0 <= cfg["label_smoothing"] < 1:
        raise ConfigError(f"label_smoothing must be in [0, 1) (got {cfg['label_smoothing']})")


def resolve(exp=None, overrides=None):
    """DEFAULTS <- preset <- overrides, validated. Returns a new dict that also records the exp name."""
    exp = exp or DEFAULT_EXP
    if exp not in PRESETS:
        raise ConfigError(f"unknown preset '{exp}'; valid presets: {', '.join(PRESETS)}")
    cfg = copy.deepcopy(DEFAULTS)
    for source in (PRESETS[exp], overrides or {}):
        unknown = sorted(set(source) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; valid settings: {', '.join(DEFAULTS)}")
        cfg.update(source)
    validate(cfg)
    cfg["exp"] = exp
    return cfg
