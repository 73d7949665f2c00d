"""Fine-tune (or train from scratch) a ResNet on Caltech-101 with AMP, channels_last and a DALI data path.

    python download.py                                            # once: data/Caltech101 + split lists
    python train_caltech101.py --exp r18_pretrain_lowwd_mix02     # the report's best run
    python train_caltech101.py --exp cpu_smoke                    # no GPU: learns the real data in ~12 min
    python train_caltech101.py --exp r18_pretrain_main --lr_fc 3e-3 --epochs 100   # flags beat the preset
    python train_caltech101.py --config configs/resnet34_finetune.yaml            # settings from a YAML file
    torchrun --standalone --nproc_per_node=4 train_caltech101.py --exp r50_pretrain  # 4 GPUs, same global batch
    python train_caltech101.py --help                             # every flag, its default, every preset

What a run writes (checkpoints/<exp>/: best.pth, last.pth, config.json, metrics.csv, summary.json, report.html, ...)
and how it goes: training.py. This file is the command line: parse, resolve the settings, train.
"""
import os
import sys

import presets
from kit.base import errors
from kit.data import dali_loader, splits
from kit.reporting import run_report
from kit.settings import settings_cli
from kit.training import training


def get_args_parser():
    return settings_cli.settings_parser("Train a ResNet on Caltech-101. Flags override the preset chosen by --exp and "
                                        "the --config file. Every flag also takes its hyphenated spelling "
                                        "(--batch-size).")


def cli(argv=None):
    """The command line: parse, resolve settings, train; one-line errors (errors.run_cli)."""
    return errors.run_cli(run, *settings_cli.settings_from_args(get_args_parser().parse_args(argv)),
                          interrupted="interrupted: stopped at once; the last checkpoint written is intact "
                                      "(--resume auto)")


def run(exp, config, overrides, show_model):
    """Resolve the settings (defaults < preset < config file < flags) and train, or print the model."""
    file_values = presets.load_config_file(config) if config else {}
    cfg = presets.resolve(exp, overrides, config=file_values)
    explicit = set(presets.given_settings({**file_values, **overrides}))
    if show_model:
        return run_report.print_model(cfg, len(splits.read_classes(cfg["data_root"]))
                           if os.path.isfile(os.path.join(cfg["data_root"], "classes.txt")) else 101)["exit_code"]
    with dali_loader.QuietDecoderErrors():
        return training.main(cfg, explicit)["exit_code"]


if __name__ == "__main__":
    sys.exit(cli())
