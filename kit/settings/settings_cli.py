"""The settings' command line and their reference page, both generated from presets.SETTINGS: one flag per setting
(with its hyphenated spelling and other kits' names), the other kits' shorthands, --print_model and --help listing
every setting with its meaning and default and every preset; and docs/settings.md. The training script, the LR
finder, sweeps and bench build their command lines here.

    parser = settings_cli.settings_parser("Train a ResNet on Caltech-101.")
    exp, config, overrides, print_model = settings_cli.settings_from_args(parser.parse_args())
    python -c "from kit.settings import settings_cli as s; print(s.settings_markdown(), end='')" > docs/settings.md
"""
import argparse
import json

from presets import (
    CHOICES,
    DEFAULT_EXP,
    DEFAULTS,
    HELP,
    KEY_ALIASES,
    KINDS,
    PRESETS,
    RUN,
    SETTINGS,
    SHORTHANDS,
    VALUE_ALIASES,
    expand_shorthands,
)

FLAG_ALIASES = {}  # setting -> its other kits' flags: KEY_ALIASES read the other way
for _alias, _key in KEY_ALIASES.items():
    FLAG_ALIASES.setdefault(_key, []).append(f"--{_alias}")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional_str(text):
    return None if text.lower() in ("", "none", "null") else text


def _gpu_index(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a GPU index, got {text!r}")
    return int(text)


def settings_parser(description):
    """The command line of every setting: --exp, --config, one flag per setting (with its other kits' names and
    hyphenated spellings), the SHORTHANDS and --print_model; --help lists each with its meaning and default, and
    every preset. The training script and the LR finder use it (the finder adds its own flags)."""
    epilog = "presets (--exp):\n" + "\n".join(
        f"  {name}: " + ", ".join(f"{k}={v}" for k, v in p.items()) for name, p in PRESETS.items())
    parser = ArgumentParser(description=description, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", default=argparse.SUPPRESS, choices=list(PRESETS), metavar="NAME",
                        help=f"preset name (default: {DEFAULT_EXP}); see the list below")
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help="YAML or JSON file of settings (a run's config.json reruns it); flags beat it")
    for key, default in DEFAULTS.items():
        choices = CHOICES.get(key)
        # A text setting with a list of values takes them as written ("none" is class_balance's, not null).
        kind = {bool: _bool, int: int, float: float}.get(type(default), str if choices else _optional_str)
        if key in VALUE_ALIASES:
            choices = list(choices) + [v for v in VALUE_ALIASES[key] if v not in choices]
        # SUPPRESS: only flags given on the command line appear in args, so they (and only they) beat the preset.
        extra = dict(nargs="?", const=True) if kind is _bool else {}  # a bare --cache means --cache true
        common = dict(dest=key, type=kind, default=argparse.SUPPRESS, choices=choices,
                      metavar=None if choices else ("BOOL" if kind is _bool else key.upper()), **extra)
        names = [f"--{key}"] + FLAG_ALIASES.get(key, [])
        parser.add_argument(*names, help=f"{HELP[key]} (default: {default})", **common)
        hyphenated = [n.replace("_", "-") for n in names if "_" in n]
        if hyphenated:  # --batch-size etc.: accepted, not listed twice
            parser.add_argument(*hyphenated, help=argparse.SUPPRESS, **common)
    other = parser.add_argument_group("flags of the kits this one replaces (config files take them too)")
    for key, (meaning, _) in SHORTHANDS.items():
        kind = dict(type=float) if key == "lr" else dict(type=_gpu_index, metavar="N") if key == "gpu" else \
            dict(type=_bool, nargs="?", const=True, metavar="BOOL")
        names = [f"--{key}"] + ([f"--{key.replace('_', '-')}"] if "_" in key else [])
        other.add_argument(*names, dest=key, default=argparse.SUPPRESS, help=meaning, **kind)
    other.add_argument("--print_model", "--print-model", type=_bool, nargs="?", const=True, default=False,
                       metavar="BOOL", help="print the ImageNet-shaped model and the adapted one, what trains under "
                                            "--freeze, the parameter counts; then exit")
    return parser


def settings_from_args(args):
    """(preset name or None, config file or None, {setting: value} given as flags, print_model) from parsed args."""
    values = vars(args).copy()
    exp, config, print_model = values.pop("exp", None), values.pop("config", None), values.pop("print_model")
    return exp, config, expand_shorthands(values), print_model


def settings_markdown():
    """docs/settings.md: every setting with its kind, default and meaning, the kinds, the presets and the other
    kits' names, generated from SETTINGS (tests/test_presets.py fails when the file is out of date). Regenerate:
        python -c "from kit.settings import settings_cli as s; print(s.settings_markdown(), end='')" > docs/settings.md
    """
    def cell(text):
        return str(text).replace("|", "\\|")

    lines = ["# Settings", "", "Generated from `presets.SETTINGS` by `settings_cli.settings_markdown` (do not edit by "
             "hand). Every setting is a flag (`--name VALUE`, also `--name-with-hyphens`) and a config-file key. "
             "Merge order: defaults, the preset (`--exp`), a config file (`--config FILE`, YAML or JSON), explicit "
             "flags.", "", "## Kinds", "",
             "| kind | what it means |", "|---|---|"]
    lines += [f"| {kind} | {meaning} |" for kind, meaning in KINDS.items()]
    lines += ["", "## Every setting", "", "| setting | kind | default | meaning |", "|---|---|---|---|"]
    for key, s in SETTINGS.items():
        extra = [f"choices: {', '.join(map(str, CHOICES[key]))}"] if key in CHOICES else []
        extra += [f"also {', '.join(FLAG_ALIASES[key])}"] if key in FLAG_ALIASES else []
        extra += ["not sampled by sweeps"] if s.kind == RUN and not s.sweep else []
        lines.append(f"| `{key}` | {s.kind} | `{json.dumps(s.default)}` | {cell(s.meaning)}"
                     + (f" ({'; '.join(extra)})" if extra else "") + " |")
    lines += ["", "## Shorthands of other kits", "", "| flag | means |", "|---|---|"]
    lines += [f"| `--{key}` | {cell(meaning)} |" for key, (meaning, _) in SHORTHANDS.items()]
    lines += ["", "## Presets", "", "What each one is: the comment above it in `presets.PRESETS`.", "",
              "| preset | settings over the defaults |", "|---|---|"]
    lines += [f"| `{name}` | " + ", ".join(f"{k}={v}" for k, v in values.items()) + " |"
              for name, values in PRESETS.items()]
    return "\n".join(lines) + "\n"
