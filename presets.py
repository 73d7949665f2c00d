"""Every training setting with its default and meaning, and the named presets that reproduce the report's runs.

    python train_caltech101.py --exp r18_pretrain_lowwd_mix02        # a preset
    python train_caltech101.py --exp cpu_smoke --epochs 5            # a preset, one key overridden
    python train_caltech101.py --config configs/resnet34_finetune.yaml --lr_fc 1e-3

Merge order: SETTINGS' defaults, then the preset, then a config file (YAML or JSON), then explicit command-line
flags. `resolve()` does it and rejects unknown keys, unknown presets and nonsense values with a one-line
errors.ConfigError. Other kits' names for a setting (`output_dir`, `num_workers`, `freeze`, ...) are aliases.
settings_cli.py makes the command line of every setting from these records (one flag each, other kits' names,
SHORTHANDS) and docs/settings.md; config files take the same names and values.

The report states init, epochs, batch size, the two learning rates, weight decay and the MixUp/CutMix alphas.
It does not state the optimizer or schedule: we use AdamW (decoupled weight decay, no decay on BatchNorm and
bias parameters) with a linear warmup then cosine decay to zero, stepped every iteration.
"""
import copy
import json
import os
import sys
import typing

import model_utils
from kit.base import errors
from kit.settings import resolution
from kit.training import metrics

DEFAULT_EXP = "r18_pretrain_main"  # run 3 of the report, the kit's default


class Setting(typing.NamedTuple):
    """One setting's whole record: everything the kit needs to know about it is here, and every list of settings of
    one kind (what a resume checks, what a sweep worker keeps to itself, what --compare shows, ...) is derived from
    these records."""
    kind: str  # one of KINDS
    default: object
    meaning: str  # the flag's --help text and docs/settings.md's
    sweep: bool  # a space file may sample it
    compare: bool  # --compare shows it when runs differ in it
    expected: str  # what a setting whose default is None takes (its type error says it)


# What kind of setting each is: how resume, sweeps, --compare and config.json treat it.
KINDS = {
    "run": "defines the run: a resume refuses another value; shared by a sweep's workers; swept; compared",
    "control": "how a run is watched, saved and stopped: may change on resume (said in a note); shared by a sweep's "
               "workers",
    "machine": "how this machine runs it: may change on resume (said in a note) and differ between sweep workers",
    "output": "where the run is written: a resume keeps its folder; a sweep names its trials' folders",
    "launch": "how a process is launched: never recorded in config.json, ignored in a config file",
}
RUN, CONTROL, MACHINE, OUTPUT, LAUNCH = KINDS


def S(kind, default, meaning, sweep=None, compare=None, expected="text or null"):
    """A Setting; by default exactly the run-defining settings are swept and compared."""
    return Setting(kind, default, meaning, kind == RUN if sweep is None else sweep,
                   kind == RUN if compare is None else compare, expected)


# key: its record. The meaning is the flag's --help text.
SETTINGS = {
    # data
    "data_root": S(MACHINE, "data/Caltech101", "prepared data root (download.py writes classes.txt, train.txt, "
                                               "val.txt)", compare=True),
    "loader": S(MACHINE, "auto", "auto | dali | torch (torchvision/PIL); auto: DALI where it is installed and decodes "
                                 "on the device, else torch. Every loader follows one sampling plan, so a run may "
                                 "resume with another"),
    "img_size": S(RUN, 224, "train crop and val centre crop, pixels"),
    "eval_img_size": S(RUN, 0, "val/test centre crop, pixels, also predict's and export's (0: img_size); the shorter "
                               "side is resized to 256/224 of it"),
    "img_size_start": S(RUN, 0, "progressive resizing: train crop size of the first epochs, pixels (0: off, img_size "
                                "throughout)"),
    "img_size_ramp": S(RUN, None, "progressive resizing 'A,B': the train size rises from img_size_start after epoch A "
                                  "to img_size at epoch B (1-based) in img_size_step steps (default with a start: 0.25 "
                                  "and 0.75 of the epochs)", expected="two epochs 'A,B' or null"),
    "img_size_step": S(RUN, 16, "progressive resizing: train sizes are multiples of this many pixels"),
    "crop_scale_min": S(RUN, 0.08, "RandomResizedCrop: smallest crop, as a fraction of the image area"),
    "workers": S(MACHINE, 8, "DALI threads or DataLoader worker processes (per rank)"),
    "cache": S(RUN, False, "decode every image once into uint8 on the device; crops, flips and normalisation there"),
    "class_balance": S(RUN, "none", "none | loss (inverse-frequency class weights in the loss) | sampler (each epoch "
                                    "draws the train split with replacement, every class equally likely): "
                                    "imbalanced data"),
    "drop_last": S(RUN, False, "train: leave out the short last step of each epoch"),
    "hw_decoder_load": S(MACHINE, 0.65, "share of JPEGs for the A100/H100 hardware decoder (DALI on a GPU; 0-1)"),
    # model
    "arch": S(RUN, "resnet18", "a torchvision ResNet (resnet18 | resnet34 | resnet50 | resnet101) or "
                               "mobilenet_v3_large; each one's head, stages and Grad-CAM layers: archs.py"),
    "pretrained": S(RUN, True, "start from torchvision's ImageNet weights (false: random init; --scratch)"),
    "weights": S(RUN, None, "path to a local state dict to start from instead (offline use); a mismatched fc is "
                            "dropped", sweep=False, expected="a path or null"),
    "trainable": S(RUN, "all", "what trains: all | layer4+head (the last stage and the head) | head (with "
                               "freeze_epochs > 0: only for those epochs)"),
    "freeze_epochs": S(RUN, 0, "gradual unfreezing: train only `trainable` for this many epochs, then everything "
                               "(0: off)"),
    "frozen_bn": S(RUN, "eval", "BatchNorm in frozen parts: eval (running statistics fixed) | train"),
    "sync_bn": S(RUN, False, "SyncBatchNorm across ranks under torchrun (needs CUDA)"),
    # optimisation
    "epochs": S(RUN, 200, "passes over the train split"),
    "batch_size": S(RUN, 128, "global batch: images per optimizer step, summed over all ranks"),
    "eval_batch_size": S(MACHINE, 256, "global images per evaluation step (independent of the training batch)"),
    "optimizer": S(RUN, "adamw", "adamw | sgd (nesterov)"),
    "lr_backbone": S(RUN, 2e-4, "peak LR of every non-head parameter (of layer4, with layer_decay)"),
    "lr_fc": S(RUN, 5e-3, "peak LR of the classification head"),
    "layer_decay": S(RUN, 0.0, "layer-wise LR: stage k below the last (layer4 in a ResNet) gets lr_backbone * "
                               "layer_decay**k (0: off)"),
    "stage_lrs": S(RUN, None, "peak LRs from the head down: head,layer4,layer3,layer2,layer1,stem in a ResNet (the "
                              "architecture's six stages, archs.py; a shorter list: its last LR for the rest); "
                              "overrides lr_fc/lr_backbone/layer_decay",
                   expected="LRs from the head down: a list or comma-separated numbers, or null"),
    "weight_decay": S(RUN, 1e-4, "decoupled (AdamW) or L2 (SGD) decay; never on BatchNorm or bias parameters"),
    "momentum": S(RUN, 0.9, "SGD momentum, or AdamW beta1"),
    "warmup_epochs": S(RUN, 5.0, "linear warmup from 0 to the peak LRs, in epochs (fractions allowed)"),
    "schedule": S(RUN, "cosine", "cosine | linear | constant: decay after warmup, down to min_lr_ratio * peak"),
    "min_lr_ratio": S(RUN, 0.0, "final LR as a fraction of the peak"),
    "grad_clip": S(RUN, 0.0, "max global gradient norm (0: off)"),
    "label_smoothing": S(RUN, 0.0, "label smoothing, folded into the soft targets"),
    "mixup_alpha": S(RUN, 0.4, "Beta(alpha, alpha) for MixUp; 0 disables MixUp"),
    "cutmix_alpha": S(RUN, 1.0, "Beta(alpha, alpha) for CutMix; 0 disables CutMix"),
    "mix_switch_prob": S(RUN, 0.5, "with both alphas > 0: probability that a batch uses CutMix rather than MixUp"),
    "ema_decay": S(RUN, 0.0, "EMA of the weights (and BatchNorm statistics) per update: 0 off, e.g. 0.998"),
    "ema_every": S(RUN, 1, "update the EMA every N optimizer steps (decay applied as decay**N)"),
    "ema_warmup": S(RUN, True, "EMA decay ramps as min(decay, (1 + n) / (10 + n)) over its first updates"),
    # evaluation and stopping
    "eval_every": S(CONTROL, 1, "evaluate on val every N epochs (and always after the last)"),
    # A sweep optimises the monitor in one direction: sampling it would rank trials by different metrics.
    "monitor": S(RUN, "val_top1", f"{' | '.join(metrics.MONITORS)}: chooses best.pth and early stopping",
                 sweep=False),
    "early_stop_patience": S(CONTROL, 0, "stop after this many evaluations without improvement of `monitor` (0: "
                                         "off)"),
    "min_delta": S(CONTROL, 0.0, "an improvement must beat the best `monitor` value by more than this"),
    # run
    "device": S(MACHINE, "auto", "auto | cpu | cuda | cuda:N | mps (auto: CUDA, else Apple's MPS, else the CPU; under "
                                 "torchrun each rank's cuda:LOCAL_RANK)"),
    "amp": S(MACHINE, "auto", "auto | bf16 | fp16 | off (auto: bf16 on Ampere+ GPUs or CPUs with bf16, fp16 on older "
                              "GPUs)"),
    "channels_last": S(MACHINE, True, "NHWC memory layout for model and inputs"),
    "compile": S(MACHINE, False, "torch.compile the model (static shapes: the short last train step is dropped)"),
    "compile_mode": S(MACHINE, "default", "default | reduce-overhead (CUDA graphs) | max-autotune"),
    "seed": S(RUN, 0, "data order, crops, flips, init and MixUp draws"),
    "log_every": S(MACHINE, 10, "steps between progress refreshes (each reads the loss from the device)"),
    "progress": S(MACHINE, True, "show a progress bar (only when stderr is a terminal: a redirected log keeps one line "
                                 "per epoch)"),
    "save_safetensors": S(MACHINE, False, "also write best.safetensors (best.pth's weights with their metadata, no "
                                          "pickle) at the end of the run"),
    "report_page": S(MACHINE, True, "write report.html (one self-contained page of the run) at its end and on a stop"),
    "out_dir": S(OUTPUT, "checkpoints", "runs go to out_dir/<name>/ (a folder holding a run: out_dir/<name>_2, ...)"),
    "name": S(OUTPUT, None, "run folder name (default: the preset name)", expected="a folder name or null"),
    "resume": S(LAUNCH, None, "a last.pth, or 'auto' for the run folder's own (a fresh start if there is none yet)",
                expected="a last.pth, auto or null"),
    "save_every_steps": S(CONTROL, 0, "also write last.pth every N steps inside an epoch (0: only at epoch ends)"),
    "keep_checkpoints": S(CONTROL, 0, "also keep the newest N epoch-end checkpoints as epoch_XXX.pth beside last.pth "
                                      "(0: only last.pth); --resume takes any of them"),
    "save_interval_s": S(CONTROL, 0.0, "write last.pth at most every N seconds (0: every epoch; always at the end and "
                                       "on a signal)"),
    "max_bad_steps": S(CONTROL, 10, "stop after this many non-finite losses in a row (their updates are skipped)"),
    "deterministic": S(MACHINE, False, "deterministic kernels (bit-identical reruns and resumes; slower on GPU)"),
}
DEFAULTS = {key: s.default for key, s in SETTINGS.items()}
HELP = {key: s.meaning for key, s in SETTINGS.items()}

# The allowed values of the settings that have a list. Architectures, trainable parts and monitored metrics come
# from their homes; loader and schedule names are registered here (data_utils.LOADERS and engine.SCHEDULES import
# this module, and a test keeps the names equal; "auto" is data_utils.choose_loader's).
CHOICES = dict(loader=("auto", "dali", "torch"), arch=model_utils.ARCHS, trainable=tuple(model_utils.TRAINABLE),
               class_balance=("none", "loss", "sampler"), frozen_bn=("eval", "train"), optimizer=("adamw", "sgd"),
               schedule=("cosine", "linear", "constant"), amp=("auto", "bf16", "fp16", "off"), monitor=metrics.MONITORS,
               compile_mode=("default", "reduce-overhead", "max-autotune"))
# Other kits' names for a setting, and the old names of trainable's values (freeze=layer4 trains layer4 + head).
KEY_ALIASES = {"output_dir": "out_dir", "num_workers": "workers", "freeze": "trainable", "data_dir": "data_root",
               "experiment_name": "name"}
VALUE_ALIASES = {"trainable": model_utils.TRAINABLE_ALIASES,
                 "amp": {"0": "off", "1": "auto", "false": "off", "true": "auto"}}  # YAML reads `amp: off` as false
# Other kits' shorthands for several settings at once (flags and config-file keys alike): name -> (meaning, expand).
SHORTHANDS = {  # the first of the freeze shorthands given decides, as in the transfer-learning reference
    "lr": ("one LR for backbone and head (= --lr_backbone LR --lr_fc LR)",
           lambda v: {"lr_backbone": v, "lr_fc": v}),
    "scratch": ("train from random init (= --pretrained false)", lambda v: {"pretrained": not v}),
    "gpu": ("train on GPU N (= --device cuda:N)", lambda v: {"device": f"cuda:{v}"}),
    "unfreeze_all": ("= --trainable all", lambda v: {"trainable": "all"} if v else {}),
    "unfreeze_last": ("= --trainable layer4+head", lambda v: {"trainable": "layer4+head"} if v else {}),
    "freeze_backbone": ("= --trainable head", lambda v: {"trainable": "head"} if v else {}),
}
def of_kind(*kinds):
    """The settings of these kinds, in SETTINGS' order."""
    return tuple(key for key, s in SETTINGS.items() if s.kind in kinds)


# Derived from the records, never listed by hand. A resume refuses a change of RUN_DEFINING (the run would become
# another run) and applies any other with a note; PER_MACHINE settings are each sweep worker's own; LAUNCH_KEYS are
# never written into config.json and are ignored when read from a config file (a shared config.json must rerun its
# run, not continue whatever run has that name elsewhere).
RUN_DEFINING = of_kind(RUN)
PER_MACHINE = of_kind(MACHINE)
LAUNCH_KEYS = of_kind(LAUNCH)
SWEEPABLE = tuple(key for key, s in SETTINGS.items() if s.sweep)
COMPARED = tuple(sorted((key for key, s in SETTINGS.items() if s.compare), key=lambda k: SETTINGS[k].kind != RUN))
RECORD_KEYS = ("exp", "split", "world_size", "ran_on")  # written into config.json by a run; accepted back from it

_finetune = dict(pretrained=True, epochs=240, batch_size=96, lr_backbone=2e-4, lr_fc=4e-3, weight_decay=5e-5,
                 mixup_alpha=0.2, cutmix_alpha=1.0, eval_every=2)  # the recipe of the report's best run (5)
_scratch = dict(pretrained=False, epochs=300, batch_size=64, lr_backbone=3e-3, lr_fc=3e-3, weight_decay=1e-3,
                mixup_alpha=0.4, cutmix_alpha=1.0, eval_every=3)  # the recipe of the report's scratch run (1)
# eval_every: val (5,647 images, ~1.9x the train split) costs about 60% of a training epoch on a GPU; the long
# GPU runs evaluate every 2-3 epochs (and always at the end), which keeps best.pth honest at ~20-30% of that cost.

PRESETS = {
    # report run 1: ResNet-18 from scratch (val acc 0.712)
    "r18_scratch_main": dict(_scratch),
    # report run 2: scratch with more weight decay (val acc 0.723)
    "r18_scratch_wd2e3": dict(_scratch, lr_backbone=2.5e-3, lr_fc=2.5e-3, weight_decay=2e-3),
    # report run 3, the default: ImageNet init, differential LR (val acc 0.932)
    "r18_pretrain_main": dict(pretrained=True, epochs=200, batch_size=128, lr_backbone=2e-4, lr_fc=5e-3,
                              weight_decay=1e-4, mixup_alpha=0.4, cutmix_alpha=1.0, eval_every=2),
    # report run 4: run 3 with a higher backbone LR (val acc 0.935)
    "r18_pretrain_lr3e4": dict(pretrained=True, epochs=200, batch_size=128, lr_backbone=3e-4, lr_fc=5e-3,
                               weight_decay=1e-4, mixup_alpha=0.4, cutmix_alpha=1.0, eval_every=2),
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
    # no GPU needed (ours, not the report's): ResNet-18 from scratch, progressive resizing 64 -> 96 px over the
    # middle half, short warmup + cosine, label smoothing, bf16 where the CPU has it; README, "Measured"
    "cpu_smoke": dict(pretrained=False, img_size=96, img_size_start=64, crop_scale_min=0.35, epochs=32,
                      batch_size=64, eval_batch_size=256, optimizer="adamw", lr_backbone=2e-3, lr_fc=2e-3,
                      weight_decay=0.05, warmup_epochs=2.0, schedule="cosine", label_smoothing=0.1, mixup_alpha=0.0,
                      cutmix_alpha=0.0, workers=2, eval_every=4, device="cpu", amp="auto"),
}




def canonical(key, value, where="setting"):
    """(setting name, value) with other kits' names and old value names mapped to ours."""
    key = KEY_ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
    if key not in DEFAULTS:
        raise errors.ConfigError(f"unknown {where} '{key}'; valid settings: {', '.join(DEFAULTS)}")
    default = DEFAULTS[key]
    if (default is None or isinstance(default, str)) and not isinstance(value, str) and value is not None:
        # A text setting written as YAML/JSON numbers, booleans or a list (amp: 0, stage_lrs: [1e-3, 1e-4]):
        # the text the command line would carry, so both accept the same values.
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, (bool, int, float)):
            value = str(value).lower()
    if isinstance(value, str) and key in VALUE_ALIASES:
        value = VALUE_ALIASES[key].get(value.lower(), value)
    return key, value


def given_settings(values):
    """{setting: value} of what a config file or the command line gave: our names and values, without the record
    keys a run's config.json carries (exp, split, world_size, ran_on)."""
    return dict(canonical(k, v) for k, v in values.items() if k not in RECORD_KEYS)


def expand_shorthands(values):
    """{setting: value} with SHORTHANDS (lr, scratch, gpu, freeze_backbone, ...) replaced by the settings they mean;
    a setting given itself wins over a shorthand's."""
    given = {k.replace("-", "_"): v for k, v in values.items()}
    out = {KEY_ALIASES.get(k, k): v for k, v in given.items() if k not in SHORTHANDS}
    for key, (_, expand) in SHORTHANDS.items():
        if key in given:
            for setting, setting_value in expand(given[key]).items():
                out.setdefault(setting, setting_value)
    return out


def check_type(key, value, where):
    default = DEFAULTS[key]
    kind = type(default)
    if isinstance(value, str) and kind in (int, float):  # YAML reads 1e-3 (no dot) as a string
        try:
            value = kind(value) if kind is float or value.strip().lstrip("-").isdigit() else value
        except ValueError:
            pass
    if default is None:
        ok = value is None or isinstance(value, str)
    elif kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        wanted = SETTINGS[key].expected if default is None else kind.__name__
        raise errors.ConfigError(f"{where}: {key}={value!r} is not a valid value (expected {wanted})")
    return float(value) if kind is float else value


def eval_size(cfg):
    """The evaluation resolution (val/test, predict, export): eval_img_size, or img_size when it is 0 or absent (a
    run from before the setting)."""
    return cfg.get("eval_img_size") or cfg["img_size"]


def parse_stage_lrs(text):
    """'1e-3,1e-4' -> [0.001, 0.0001]: peak LRs from the head down."""
    try:
        lrs = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise errors.ConfigError(f"stage_lrs={text!r}: expected comma-separated numbers, e.g. "
                                 f"1e-3,1e-4,1e-5,1e-6") from None
    if not lrs or len(lrs) > 6 or any(lr < 0 for lr in lrs):
        raise errors.ConfigError(f"stage_lrs={text!r}: give 1 to 6 LRs >= 0, from the head down (head, layer4, layer3, "
                                 f"layer2, layer1, stem)")
    return lrs


def validate(cfg):
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise errors.ConfigError(f"{key}={cfg[key]!r} is not valid; choose from {', '.join(allowed)}")
    device = cfg["device"]
    if device not in ("auto", "cpu", "cuda", "mps") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise errors.ConfigError(f"device={device!r} is not valid; choose from auto, cpu, cuda, cuda:N, mps")
    positive = ("epochs", "batch_size", "eval_batch_size", "eval_every", "log_every", "max_bad_steps", "ema_every")
    for key in positive:
        if cfg[key] <= 0:
            raise errors.ConfigError(f"{key} must be > 0 (got {cfg[key]})")
    for key in ("lr_backbone", "lr_fc", "weight_decay", "mixup_alpha", "cutmix_alpha", "warmup_epochs", "grad_clip",
                "workers", "keep_checkpoints", "min_lr_ratio", "label_smoothing", "save_every_steps", "save_interval_s",
                "freeze_epochs", "early_stop_patience", "min_delta", "layer_decay"):
        if cfg[key] < 0:
            raise errors.ConfigError(f"{key} must be >= 0 (got {cfg[key]})")
    if cfg["img_size"] < 32:
        raise errors.ConfigError(f"img_size must be >= 32 pixels (got {cfg['img_size']})")
    if cfg["eval_img_size"] and cfg["eval_img_size"] < 32:
        raise errors.ConfigError(f"eval_img_size must be >= 32 pixels, or 0 for img_size (got {cfg['eval_img_size']})")
    if cfg["img_size_start"]:
        if not 32 <= cfg["img_size_start"] < cfg["img_size"]:
            raise errors.ConfigError(f"img_size_start must be >= 32 and below img_size {cfg['img_size']} pixels, or "
                                     f"0 for no progressive resizing (got {cfg['img_size_start']})")
        resolution.parse_ramp(cfg["img_size_ramp"], cfg["epochs"])
    elif cfg["img_size_ramp"] is not None:
        raise errors.ConfigError(f"img_size_ramp={cfg['img_size_ramp']!r} needs img_size_start (the first epochs' "
                                 f"size)")
    if cfg["img_size_step"] <= 0:
        raise errors.ConfigError(f"img_size_step must be > 0 pixels (got {cfg['img_size_step']})")
    if not 0 < cfg["crop_scale_min"] <= 1:
        raise errors.ConfigError(f"crop_scale_min must be in (0, 1] (got {cfg['crop_scale_min']})")
    for key in ("mix_switch_prob", "min_lr_ratio", "hw_decoder_load"):
        if not 0 <= cfg[key] <= 1:
            raise errors.ConfigError(f"{key} must be in [0, 1] (got {cfg[key]})")
    if not 0 <= cfg["label_smoothing"] < 1:
        raise errors.ConfigError(f"label_smoothing must be in [0, 1) (got {cfg['label_smoothing']})")
    if not 0 <= cfg["ema_decay"] < 1:
        raise errors.ConfigError(f"ema_decay must be in [0, 1) (got {cfg['ema_decay']})")
    if cfg["layer_decay"] > 1:
        raise errors.ConfigError(f"layer_decay must be in [0, 1] (got {cfg['layer_decay']}): lower stages learn slower")
    if cfg["stage_lrs"] is not None:
        parse_stage_lrs(cfg["stage_lrs"])
    if cfg["freeze_epochs"] and cfg["trainable"] == "all":
        raise errors.ConfigError("freeze_epochs > 0 needs a frozen start: --trainable head or layer4+head "
                                 "(--freeze head|layer4)")
    if cfg["freeze_epochs"] >= cfg["epochs"]:
        raise errors.ConfigError(f"freeze_epochs={cfg['freeze_epochs']} leaves no epoch to train everything "
                                 f"(epochs={cfg['epochs']})")


def load_config_file(path):
    """{setting: value} from a YAML or JSON file, aliases mapped; one-line errors naming the file and key."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise errors.ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise errors.ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise errors.ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise errors.ConfigError(f"{path} must hold a mapping of settings (key: value)")
    out = {}
    for key, value in expand_shorthands(flatten(data)).items():
        if key in RECORD_KEYS:
            out[key] = value
            continue
        if key in LAUNCH_KEYS:
            if value is None or os.environ.get("RANK", "0") != "0":  # said once under torchrun
                continue
            print(f"note: {path}: '{key}' says how a process is launched, not what the run is: ignored here (pass "
                  f"--{key} on the command line)", file=sys.stderr)
            continue
        try:
            key, value = canonical(key, value, where=f"setting in {path}")
        except errors.ConfigError as e:
            raise errors.ConfigError(str(e)) from None
        out[key] = check_type(key, value, where=path)
    return out


def flatten(data):
    """Config files may group settings in sections (data:, model:, training:): one flat mapping, section names
    dropped, a repeated key an error."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in DEFAULTS and key not in RECORD_KEYS:
            for inner, inner_value in flatten(value).items():
                if inner in out:
                    raise errors.ConfigError(f"setting '{inner}' appears twice in the config file")
                out[inner] = inner_value
        else:
            out[key] = value
    return out


def resolve(exp=None, overrides=None, config=None):
    """DEFAULTS <- preset <- config file <- overrides, validated. Returns a new dict that also records the exp name.

    `config`: a path (YAML/JSON) or an already loaded mapping. A config file may name the preset (`exp:`); an
    explicit `exp` argument wins."""
    file_values = load_config_file(config) if isinstance(config, str) else dict(config or {})
    exp = exp or file_values.get("exp") or DEFAULT_EXP
    if exp not in PRESETS:
        raise errors.ConfigError(f"unknown preset '{exp}'; valid presets: {', '.join(PRESETS)}")
    cfg = copy.deepcopy(DEFAULTS)
    schedule_from, schedule_where = None, None
    for source, where in ((PRESETS[exp], f"preset {exp}"), (file_values, config if isinstance(config, str)
                                                            else "config"), (overrides or {}, "flag")):
        for key, value in source.items():
            if key in RECORD_KEYS:
                continue
            key, value = canonical(key, value, where="setting")
            cfg[key] = check_type(key, value, where=where)
            if key in ("img_size_start", "img_size_ramp"):
                schedule_where = where
        if schedule_where == where:
            schedule_from = dict(cfg)
    if schedule_from is not None and schedule_where != "flag":
        resolution.fit_size_schedule(cfg, schedule_from, schedule_where)
    validate(cfg)
    cfg["exp"] = exp
    return cfg


def differing_keys(cfg, exp=None):
    """Settings of cfg that differ from its preset's resolution: what a command line must repeat to rerun it."""
    base = resolve(exp or cfg["exp"])
    return [k for k in DEFAULTS if cfg.get(k) != base[k]]
