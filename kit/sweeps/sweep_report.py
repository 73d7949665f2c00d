"""A sweep's report: the table of its trials, the best trial's settings as a config file that reruns it, parameter
importances, Optuna's optimization-history and parallel-coordinate plots, and one self-contained page of it all.

    python sweep.py --report sweeps/cpu_smoke_sweep_cpu
    python train_caltech101.py --config sweeps/cpu_smoke_sweep_cpu/best_config.yaml     # rerun the best trial

Writes into the sweep folder: trials.md, best_config.yaml, importances.json, history.png, parallel.png, sweep.html.
"""
import io
import json
import os
import warnings

import presets
from kit.base import errors, fileio
from kit.reporting import plots, report_page
from kit.training import runs


def continued_trial(trial):
    """The number of the trial this one continues (a killed or stopped worker's), or None."""
    history = trial.system_attrs.get("retry_history")
    return history[-1] if history else None


def trial_settings(flags, values):
    """A trial's settings (before each worker's own): the study's flags with the sampled values (shorthands such as
    `lr` expanded). What a trial runs and what best_config.yaml holds both come from here."""
    return {**flags, **presets.expand_shorthands(values)}


def own_progress(trial, run_dir):
    """(epochs, wall time in s) a trial that another one continued had reached: its last evaluation's epoch and the
    run's wall time there (the run folder's later rows are its continuation's)."""
    if not trial.intermediate_values:
        return None, None
    epoch = max(trial.intermediate_values)
    rows = runs.read_metrics(run_dir) if run_dir and os.path.isfile(os.path.join(run_dir, "metrics.csv")) else []
    return epoch, next((r.get("wall_time_s") for r in rows if r["epoch"] == epoch), None)


def trial_rows(study):
    """One row per trial that ran: number, state, sampled values, best monitored value, epochs, wall time, seed and
    folder (a failed trial that another one continued says so)."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    continued_by = {continued_trial(t): t.number for t in trials if continued_trial(t) is not None}
    rows = []
    for t in trials:
        state = t.state.name.lower()
        if t.number in continued_by:
            state = f"continued by {continued_by[t.number]}"
        best = max if study.direction.name == "MAXIMIZE" else min  # a pruned trial's best evaluation, too
        value = t.value if t.state.name == "COMPLETE" else (best(t.intermediate_values.values())
                                                          if t.intermediate_values else None)
        run_dir = t.user_attrs.get("run_dir")
        if t.number in continued_by:  # the run folder's summary is its continuation's
            epochs_run, wall_time_s = own_progress(t, run_dir)
        else:
            summary = runs.read_summary(run_dir) if run_dir and os.path.isdir(run_dir) else None
            epochs_run = (summary or {}).get("epochs_run", t.user_attrs.get("epochs_run"))
            wall_time_s = (summary or {}).get("wall_time_s", t.user_attrs.get("wall_time_s"))
        rows.append({"trial": t.number, "state": state, "values": t.user_attrs.get("values", {}), "value": value,
                     "epochs_run": epochs_run, "wall_time_s": wall_time_s, "seed": t.user_attrs.get("seed"),
                     "run_dir": run_dir})
    return rows


def markdown(rows, monitor):
    keys = sorted({k for r in rows for k in r["values"]})
    head = ["trial", "state", *keys, f"best {monitor}", "epochs run", "wall time", "seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["trial"]), r["state"], *[fmt(r["values"].get(k)) for k in keys],
                 "-" if r["value"] is None else f"{r['value']:.4f}", str(r["epochs_run"] or "-"),
                 "-" if r["wall_time_s"] is None else f"{r['wall_time_s'] / 60:.1f} min", str(r["seed"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt(value):
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def best_config(study, definition):
    """The best complete trial's settings, which resolve to exactly its config.json's: preset, the sweep's flags with
    its sampled values, its seed, and the data root it trained on ({} when no trial completed)."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return None, {}
    best = study.best_trial
    data_root = best.user_attrs.get("data_root")
    if data_root is None:  # a trial of an older kit: its run folder's record, where this machine can read it
        data_root = (runs.read_run_config(best.user_attrs.get("run_dir") or "", required=False) or {}).get("data_root")
    return best, {"exp": definition["exp"], **trial_settings(definition["flags"], best.user_attrs.get("values", {})),
                  "seed": best.user_attrs.get("seed"), **({"data_root": data_root} if data_root else {})}


def figure_png(axes_or_fig):
    fig = getattr(axes_or_fig, "figure", axes_or_fig)
    if hasattr(axes_or_fig, "__len__"):  # an array of axes
        fig = axes_or_fig.flat[0].figure
    fig.set_size_inches(10, 4.5)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return png.getvalue()


def read_record(sweep_dir):
    """sweep.json: the study's name, storage URL and definition."""
    try:
        with open(os.path.join(sweep_dir, "sweep.json"), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise errors.ConfigError(f"{sweep_dir} is not a sweep folder (no sweep.json)") from None
    except ValueError as e:
        raise errors.ConfigError(f"{sweep_dir}/sweep.json is not valid JSON: {e}") from None


def report(sweep_dir, study, record):
    """Print the table and write the report's files (study: the sweep's Optuna study, record: its sweep.json)."""
    import matplotlib
    matplotlib.use("Agg")
    import optuna

    definition = study.user_attrs["kit_sweep"]
    rows = trial_rows(study)
    table = markdown(rows, definition["monitor"])
    print(table)
    fileio.write_atomic(table + "\n", os.path.join(sweep_dir, "trials.md"))
    best, config = best_config(study, definition)
    if best is not None:
        import yaml

        text = (f"# the best trial ({best.number}, {definition['monitor']} {best.value:.4f}) of study "
                f"'{record['study']}': python train_caltech101.py --config best_config.yaml\n"
                + ("# data_root: the data the trial was swept on (by the worker that ran it); point it at your copy\n"
                   if "data_root" in config else "# data_root: not recorded by this trial; give --data_root\n")
                + yaml.safe_dump(config, sort_keys=False))
        fileio.write_atomic(text, os.path.join(sweep_dir, "best_config.yaml"))
        print(f"best: trial {best.number}, {definition['monitor']} {best.value:.4f}; its settings: "
              f"{os.path.join(sweep_dir, 'best_config.yaml')}")
    else:
        print("no trial has completed yet: no best_config.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
        complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        importances = {}
        if len(complete) < 2:
            print("parameter importances: not computed (needs at least two complete trials)")
        else:
            try:
                importances = optuna.importance.get_param_importances(study)
            except (RuntimeError, ValueError) as e:
                print(f"parameter importances: not computed ({str(e).splitlines()[0]})")
        fileio.write_atomic(json.dumps(importances, indent=1) + "\n", os.path.join(sweep_dir, "importances.json"))
        pictures = {}
        for name, plot in (("history", optuna.visualization.matplotlib.plot_optimization_history),
                           ("parallel", optuna.visualization.matplotlib.plot_parallel_coordinate)):
            try:
                pictures[name] = figure_png(plot(study))
            except (RuntimeError, ValueError, IndexError):
                continue
            fileio.write_atomic(pictures[name], os.path.join(sweep_dir, f"{name}.png"))
    if importances:
        print("parameter importances: " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))
    write_page(sweep_dir, record["study"], definition, rows, config, importances, pictures)
    return 0


def write_page(sweep_dir, name, definition, rows, config, importances, pictures):
    """sweep.html: the trial table, the best settings, importances, the plots and the trials' val curves."""
    esc = report_page.esc
    keys = sorted({k for r in rows for k in r["values"]})
    body = [[str(r["trial"]), esc(r["state"]), *[esc(fmt(r["values"].get(k))) for k in keys],
             "-" if r["value"] is None else f"{r['value']:.4f}", str(r["epochs_run"] or "-"),
             "-" if r["wall_time_s"] is None else f"{r['wall_time_s'] / 60:.1f}", str(r["seed"])] for r in rows]
    sections = [("trials", "Trials", report_page.table(
        ["trial", "state", *keys, f"best {definition['monitor']}", "epochs run", "wall time (min)", "seed"], body,
        sortable=True))]
    sections.append(("best", "Best configuration", f"<pre>{esc(json.dumps(config, indent=1))}</pre>" if config
                     else '<p class="note">no trial has completed yet</p>'))
    sections.append(("importances", "Parameter importances", report_page.table(
        ["setting", "importance"], [[esc(k), f"{v:.3f}"] for k, v in importances.items()]) if importances else
        '<p class="note">needs at least two complete trials that differ</p>'))
    for key, title in (("history", "Optimization history"), ("parallel", "Parallel coordinates")):
        if key in pictures:
            sections.append((key, title, f'<div class="wide"><img alt="{title}" '
                                         f'src="{report_page.data_uri(pictures[key], "image/png")}"></div>'))
    trial_dirs = [r["run_dir"] for r in rows if r["run_dir"] and
                  any(row.get("val_top1") is not None for row in safe_rows(r["run_dir"]))]
    if trial_dirs:
        sections.append(("curves", "Validation curves of the trials", '<div class="wide"><img alt="val curves" src="'
                         + report_page.data_uri(plots.plot_compare(trial_dirs), "image/png") + '"></div>'))
    path = os.path.join(sweep_dir, "sweep.html")
    report_page.write(report_page.page(f"sweep {name}", sections, subtitle=esc(
        f"preset {definition['exp']}; flags {definition['flags']}")), path)
    print(f"report page: {path}")


def safe_rows(run_dir):
    return runs.read_metrics(run_dir) if os.path.isfile(os.path.join(run_dir, "metrics.csv")) else []
