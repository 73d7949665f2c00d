"""A sweep's search space: the YAML file (one setting per line, `lr_backbone: {log_uniform: [1.0e-4, 3.0e-3]}`,
`uniform`, `int`, `choice: [...]`), checked setting by setting against presets.SETTINGS (only settings whose record
says `sweep` may be sampled, plus the `lr` shorthand), and each trial's draw from it through Optuna.

    space = sweep_space.load_space("configs/sweep_cpu.yaml")     # {setting: (kind, values)}
    values = sweep_space.suggest(trial, space)                      # {setting: value} of an Optuna trial
"""
import presets
from kit.base import errors

KINDS = ("log_uniform", "uniform", "int", "choice")


def load_space(path):
    """{setting: (kind, values)} from a space file; one-line errors for unknown settings and bad ranges."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise errors.ConfigError(f"cannot read space file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise errors.ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict) or not data:
        raise errors.ConfigError(f"{path}: a space maps settings to distributions, e.g. lr_fc: "
                                  f"{{log_uniform: [1.0e-4, 1.0e-2]}}")
    space = {}
    for key, spec in data.items():
        where = f"{path}: {key}"
        # `lr` (one LR for backbone and head) is the one shorthand a space takes: it is a number.
        typed = "lr_backbone" if key == "lr" else presets.canonical(key, None, where=f"setting in {path}")[0]
        key = "lr" if key == "lr" else typed
        if key not in presets.SWEEPABLE and key != "lr":
            raise errors.ConfigError(f"{where}: {not_sweepable(key)}")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise errors.ConfigError(f"{where}: expected one of {', '.join(f'{{{k}: ...}}' for k in KINDS)}, got "
                                      f"{spec!r}")
        kind, values = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(values, list) or not values:
                raise errors.ConfigError(f"{where}: choice takes a non-empty list, got {values!r}")
            values = [presets.check_type(typed, presets.canonical(typed, v)[1], where=path) for v in values]
        else:
            if isinstance(values, list):  # YAML reads 1e-4 (no dot) as text
                values = [number(v) for v in values]
            if not (isinstance(values, list) and len(values) == 2
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
                raise errors.ConfigError(f"{where}: {kind} takes [low, high], got {values!r}")
            low, high = values
            if not low < high or (kind == "log_uniform" and low <= 0) or \
                    (kind == "int" and not all(float(v).is_integer() for v in values)):
                raise errors.ConfigError(f"{where}: bad range [{low}, {high}] for {kind} (low < high"
                                          + (", both > 0" if kind == "log_uniform" else "")
                                          + (", whole numbers" if kind == "int" else "") + ")")
            default = presets.DEFAULTS[typed]
            if isinstance(default, bool) or not isinstance(default, (int, float)) or \
                    (kind != "int" and isinstance(default, int)):
                raise errors.ConfigError(f"{where}: {key} takes {type(default).__name__} values, not a {kind} range"
                                          + ("; use int or choice" if isinstance(default, int) else ""))
            presets.check_type(typed, int(low) if kind == "int" else float(low), where=path)
        space[key] = (kind, values)
    return space


def not_sweepable(key):
    """Why a setting cannot be in a space (it can be a flag of sweep.py, the same for every trial)."""
    if key == "monitor":
        return ("monitor decides what the study optimises and in which direction: trials monitored by different "
                "metrics cannot be ranked; give it as a flag (--monitor)")
    kind = presets.SETTINGS[key].kind
    if kind == presets.RUN:
        return f"{key} is not sampled (a file path, not a value to search); give it as a flag of sweep.py"
    what = {presets.CONTROL: "how a run is watched, saved and stopped", presets.MACHINE: "how a machine runs it",
            presets.OUTPUT: "where a run is written", presets.LAUNCH: "how a process is launched"}[kind]
    return f"{key} says {what}, not what a run learns; give it as a flag of sweep.py"


def number(value):
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def suggest(trial, space):
    """The trial's values of the space (a continuation gets its trial's own)."""
    out = {}
    for key, (kind, values) in space.items():
        if kind == "log_uniform":
            out[key] = trial.suggest_float(key, *map(float, values), log=True)
        elif kind == "uniform":
            out[key] = trial.suggest_float(key, *map(float, values))
        elif kind == "int":
            out[key] = trial.suggest_int(key, *map(int, values))
        else:
            out[key] = trial.suggest_categorical(key, list(values))
    return out
