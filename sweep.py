"""Hyperparameter sweeps on Optuna: every trial is an ordinary run of the kit in <sweep>/trial_NNNN/ (config.json,
metrics.csv, best.pth, report.html), unpromising trials are pruned at an evaluation, and the study lives in an
SQLite file in the sweep folder or in any database Optuna takes, so workers on many machines share one study.

    python sweep.py --exp cpu_smoke --space configs/sweep_cpu.yaml --trials 12 --out_dir sweeps/   # one worker
    python sweep.py --study lr_wd --storage postgresql://user@host/db --trials 40     # on each machine or GPU
    python sweep.py --report sweeps/lr_wd                                             # table, best config, plots

The space is a YAML file, one setting per line: `lr_backbone: {log_uniform: [1.0e-4, 3.0e-3]}`, `uniform`, `int`,
`choice: [...]`. Training flags given here (--epochs 4 --img_size 48) apply to every trial, under the sampled values.
--trials is the study's total over all its workers. A worker killed mid-trial leaves the trial RUNNING; once its
heartbeat is older than --grace seconds, any worker of the study (or the same one restarted) fails it and runs a
continuation that resumes the trial's own run from its last.pth (the kit's exact resume). Ctrl-C / SIGTERM stop
the worker after the run saves, and the trial is queued to continue the same way.
"""
import argparse
import json
import math
import os
import sys
import time
import traceback
import warnings

import presets
from kit.base import errors, fileio
from kit.data import splits
from kit.settings import settings_cli
from kit.sweeps import sweep_report, sweep_space
from kit.sweeps.sweep_report import continued_trial
from kit.training import metrics, runs, training

DEFAULT_STORAGE = "study.db"  # sweep.json's name for the SQLite file in the sweep folder (which may move)
PRUNERS = ("median", "halving", "hyperband", "none")


class Interrupted(errors.KitError):
    """The trial's run stopped on a signal after saving: the worker stops; the trial is queued to continue."""


TRIAL_ERRORS = (errors.ConfigError, errors.DataError, errors.ModelError, errors.TrainingError)  # one trial's: go on


class TrialCrashed(errors.KitError):
    """A trial that raised something other than the kit's errors (its traceback is printed): the trial fails, the
    worker takes the next one."""


class Surplus(errors.KitError):
    """Asked for after the study had its --trials (workers raced): told failed, marked surplus, never run."""


# ---------------------------------------------------------------------------------------------
# the study

def open_study(args, definition, create):
    """The Optuna study (created, or joined when its definition matches). One-line errors for a storage that cannot
    be reached and for a study of that name with another definition."""
    import optuna
    import sqlalchemy.exc

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is said in one line (objective_for)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    engine_kwargs = {"connect_args": {"timeout": 60}} if args.storage.startswith("sqlite") else \
        {"pool_pre_ping": True}
    try:
        for attempt in range(10):
            try:
                storage = optuna.storages.RDBStorage(
                    args.storage, engine_kwargs=engine_kwargs, heartbeat_interval=args.heartbeat,
                    grace_period=args.grace, heartbeat_stale_trial_callback=retry())
                break
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as e:
                # Workers started together on a new database race to write its schema: the loser retries and
                # finds it written. Any other error (a server that cannot be reached) is said at once.
                racing = isinstance(e, sqlalchemy.exc.IntegrityError) or "already exists" in str(e) or \
                    "locked" in str(e)
                if not racing or attempt == 9:
                    raise
                time.sleep(0.5)
        if create:
            study = optuna.create_study(study_name=args.study, storage=storage, load_if_exists=True,
                                        direction="minimize" if metrics.minimized(definition["monitor"])
                                        else "maximize", pruner=make_pruner(definition))
        else:
            study = optuna.load_study(study_name=args.study, storage=storage)
            if definition is not None:
                study.pruner = make_pruner(definition)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        reason = " ".join(str(e).split("\n")[0].split())[:200]
        raise errors.ConfigError(f"cannot use storage {redact(args.storage)}: {reason}") from None
    except KeyError:
        raise errors.ConfigError(f"no study '{args.study}' in {redact(args.storage)}") from None
    stored = study.user_attrs.get("kit_sweep")
    if stored is None and create:
        study.set_user_attr("kit_sweep", definition)
    elif create and stored != definition:
        changed = sorted(k for k in set(stored) | set(definition) if stored.get(k) != definition.get(k))
        raise errors.ConfigError(f"study '{args.study}' in {redact(args.storage)} exists with another "
                                  f"{', '.join(changed)}: join it with the same preset, space and flags, or pick "
                                  f"another --study")
    return study


def retry():
    """Optuna's retry of a failed trial: a WAITING copy with its values, user attributes (the run folder) and reported
    values, which a worker takes next and continues (see objective_for)."""
    import optuna

    return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3, inherit_intermediate_values=True)


def redact(url):
    """A storage URL without its password."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        user, host = rest.rsplit("@", 1)
        return f"{scheme}://{user.split(':')[0]}@{host}"
    return url


def make_pruner(definition):
    """The study's pruner, from its definition (every worker prunes alike)."""
    import optuna

    name, startup, warmup = (definition["pruning"][k] for k in ("pruner", "prune_startup", "prune_warmup"))
    epochs = presets.resolve(definition["exp"], definition["flags"])["epochs"]
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, warmup))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup), max_resource=epochs)
    return optuna.pruners.NopPruner()


def counted(trials):
    """The trials that run or ran: not surplus, and not a failed trial that a later one continues."""
    continued = {continued_trial(t) for t in trials}
    return [t for t in trials if not t.user_attrs.get("surplus") and t.number not in continued]


def objective_for(study, args, definition, sweep_dir, space):
    import optuna

    def objective(trial):
        objective.current = trial.number
        trials = study.get_trials(deepcopy=False)
        prior = continued_trial(next(t for t in trials if t.number == trial.number))  # a live Trial has no system_attrs
        if prior is None:
            before = sum(1 for t in counted(trials) if t.number != trial.number and
                         (t.number < trial.number or continued_trial(t) is not None))
            if before >= args.trials:
                trial.set_user_attr("surplus", True)
                print(f"trial {trial.number} not run: the study already has its {args.trials} trials (another "
                      f"worker asked at the same moment)", flush=True)
                raise Surplus(f"trial {trial.number}: the study already has its {args.trials} trials")
        # Seeded by the trial's number (unique over all workers): one worker repeats, two never draw alike.
        study.sampler = optuna.samplers.TPESampler(seed=args.seed * 100003 + trial.number, constant_liar=True)
        values = sweep_space.suggest(trial, space)
        trial.set_user_attr("values", values)
        settings = {**sweep_report.trial_settings(definition["flags"], values), **args.local, "out_dir": sweep_dir}
        if prior is None:
            settings["name"] = f"trial_{trial.number:04d}"
            trial.set_user_attr("run_dir", os.path.join(sweep_dir, settings["name"]))
        else:
            # The newest folder of the trial's name with a last.pth (a continuation that restarted may have made
            # trial_NNNN_2); none: it starts again beside the first.
            settings["name"] = os.path.basename(trial.user_attrs["run_dir"])
            last = runs.auto_resume_path(sweep_dir, settings["name"])
            settings["resume"] = "auto"
            print(f"trial {trial.number} continues trial {prior} "
                  + (f"from {last}" if last else "from the start (it had saved nothing)"), flush=True)
        try:
            cfg = presets.resolve(definition["exp"], settings)
        except TRIAL_ERRORS as e:
            print(f"trial {trial.number} failed: {e}", file=sys.stderr, flush=True)
            raise
        trial.set_user_attr("seed", cfg["seed"])
        trial.set_user_attr("data_root", os.path.abspath(cfg["data_root"]))  # for best_config.yaml
        print(f"trial {trial.number}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                    for k, v in values.items()), flush=True)
        pruned = []

        def judge(epoch, value):
            if not math.isfinite(value):
                pruned.append(f"pruned by the sweep at epoch {epoch}: {cfg['monitor']} is {value}")
                return pruned[-1]
            trial.report(value, epoch)
            if trial.should_prune():
                pruned.append(f"pruned by the sweep ({definition['pruning']['pruner']}) at epoch {epoch}: "
                              f"{cfg['monitor']} {value:.4f}")
                return pruned[-1]
            return None

        try:
            result = training.main(cfg, None, judge=judge)
        except TRIAL_ERRORS as e:
            print(f"trial {trial.number} failed: {e}", file=sys.stderr, flush=True)
            raise
        except Exception as e:  # noqa: BLE001 -- a bug or a library's error ends this trial, never the worker
            traceback.print_exc()
            print(f"trial {trial.number} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            raise TrialCrashed(f"trial {trial.number}: {type(e).__name__}: {e}") from None
        trial.set_user_attr("run_dir", result.get("out_dir") or trial.user_attrs["run_dir"])
        if "summary" not in result:
            if result.get("exit_code"):
                raise Interrupted(f"trial {trial.number} stopped on a signal after saving")
        objective.signalled = result.get("signalled", False)  # during the end-of-run work: finished, then stop
        summary = result.get("summary") or runs.read_summary(result["out_dir"])
        trial.set_user_attr("epochs_run", summary["epochs_run"])
        trial.set_user_attr("wall_time_s", summary["wall_time_s"])
        if pruned or (summary.get("early_stop") or "").startswith("pruned by the sweep"):
            raise optuna.TrialPruned(pruned[-1] if pruned else summary["early_stop"])
        return summary["best"]["value"]
    return objective


def work(args, study, definition, sweep_dir, space):
    """One worker: trials one at a time until the study has --trials, continuing any whose worker died."""
    import optuna

    objective = objective_for(study, args, definition, sweep_dir, space)
    waited = False
    while True:
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed, and queued to continue
        trials = study.get_trials(deepcopy=False)
        mine = counted(trials)
        waiting = [t for t in mine if t.state == optuna.trial.TrialState.WAITING]
        running = [t for t in mine if t.state == optuna.trial.TrialState.RUNNING]
        if len(mine) >= args.trials and not waiting:
            if not running:
                break
            if not waited:
                print(f"the study has its {args.trials} trials; waiting for {len(running)} running on other "
                      f"workers (to continue any whose worker dies)", flush=True)
                waited = True
            time.sleep(max(1, args.heartbeat))
            continue
        try:
            study.optimize(objective, n_trials=1, catch=(Surplus, TrialCrashed, *TRIAL_ERRORS))
        except Interrupted as e:
            stopped = next(t for t in study.get_trials() if t.number == objective.current)
            optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(study, stopped)
            raise errors.TrainingError(f"{e}; it continues when a worker of study '{args.study}' runs next") from None
        if getattr(objective, "signalled", False):
            raise errors.TrainingError(f"stopped on a signal after trial {objective.current} finished; the study goes "
                                       f"on when a worker of study '{args.study}' runs next")
    done = counted(study.get_trials(deepcopy=False))
    print(f"study '{args.study}': {len(done)} trials ({summarize_states(done)}); report: python sweep.py --report "
          f"{sweep_dir}")


def summarize_states(trials):
    states = [t.state.name.lower() for t in trials]
    return ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))


# ---------------------------------------------------------------------------------------------
# the command line

def get_args_parser():
    p = settings_cli.settings_parser("Hyperparameter sweep on Optuna: trials are runs of the kit. Training flags apply "
                                     "to every trial, under the space's sampled values; --seed also seeds the sampler.")
    g = p.add_argument_group("sweep")
    g.add_argument("--space", default=None, help="YAML search space (needed to create a study; a worker joining "
                                                 "one may leave it out)")
    g.add_argument("--trials", type=int, default=None, help="the study's total number of trials over all workers")
    g.add_argument("--study", default=None, help="study name (default: <exp>_<space file name>); also the sweep "
                                                 "folder's name under --out_dir")
    g.add_argument("--storage", default=None, help="database URL (postgresql://user@host/db, ...) shared by workers "
                                                   "(default: sqlite in the sweep folder)")
    g.add_argument("--pruner", default="median", choices=PRUNERS, help="stops unpromising trials at an evaluation")
    g.add_argument("--prune_startup", type=int, default=2, help="median: trials that finish before any is pruned")
    g.add_argument("--prune_warmup", type=int, default=0, help="median: epochs before a trial can be pruned; "
                                                               "halving/hyperband: the minimum epochs")
    g.add_argument("--heartbeat", type=int, default=30, help="seconds between a running trial's heartbeats")
    g.add_argument("--grace", type=int, default=120, help="seconds without a heartbeat before a trial counts as its "
                                                          "worker's death and is continued")
    g.add_argument("--report", metavar="SWEEP_DIR", default=None, help="only write the sweep's report: table, "
                                                                       "best_config.yaml, importances, plots")
    return p


SWEEP_FLAGS = ("space", "trials", "study", "storage", "pruner", "prune_startup", "prune_warmup", "heartbeat", "grace",
               "report")


def main(args):
    if args.report:
        record = sweep_report.read_record(args.report)
        # sweep.json keeps the URL without its password: --storage gives the whole URL where one is needed.
        args.study, args.storage = record["study"], args.storage or storage_url(args.report, record["storage"])
        args.heartbeat = args.grace = None
        return sweep_report.report(args.report, open_study(args, None, create=False), record)
    exp, config, flags, _ = settings_cli.settings_from_args(argparse.Namespace(
        **{k: v for k, v in vars(args).items() if k not in SWEEP_FLAGS}))
    for key in ("name", "resume"):
        if key in flags:
            raise errors.ConfigError(f"--{key}: a sweep names its trials' folders itself")
    command_line = presets.given_settings(flags)
    flags = dict(command_line)
    if config:  # as training reads it (a run's config.json included); its run folder is not the sweep's
        file_values = presets.load_config_file(config)
        exp = exp or file_values.get("exp")
        flags = {**{k: v for k, v in presets.given_settings(file_values).items()
                    if presets.SETTINGS[k].kind != presets.OUTPUT}, **flags}
    if args.trials is None or args.trials < 1:
        raise errors.ConfigError("--trials N (at least 1): the study's total number of trials")
    out_dir = flags.pop("out_dir", "sweeps")
    args.local = {"progress": False, **{k: flags.pop(k) for k in presets.PER_MACHINE if k in flags}}
    if args.space is None and (flags or exp):
        raise errors.ConfigError("training flags and --exp define a study: give them with its --space (a worker "
                                  "joining a study needs neither)")
    if args.space is not None:
        space = sweep_space.load_space(args.space)
        exp = exp or presets.DEFAULT_EXP
        for key in space:  # a flag the sampled value would silently override (a config file's values are a base)
            given = sorted(set(command_line) & set(presets.expand_shorthands({key: 1.0}) if key == "lr" else {key}))
            if given:
                raise errors.ConfigError(f"{args.space} samples {key}, and {', '.join('--' + k for k in given)} "
                                          f"sets it for every trial: give one or the other")
        presets.resolve(exp, {**flags, **args.local})  # the trials' settings, checked before anything is written
        for key, (kind, values) in space.items():  # every choice and both ends of every range, as a trial takes them
            for value in (values if kind == "choice" else [int(v) if kind == "int" else float(v) for v in values]):
                try:
                    presets.resolve(exp, {**flags, **args.local, **presets.expand_shorthands({key: value})})
                except errors.ConfigError as e:
                    raise errors.ConfigError(f"{args.space}: {key}={value}: {e}") from None
        stem = os.path.splitext(os.path.basename(args.space))[0]
        args.study = args.study or f"{exp}_{stem}"
        if args.heartbeat < 1 or args.grace < 2 * args.heartbeat:
            raise errors.ConfigError(f"--heartbeat must be >= 1 s and --grace at least twice it (got "
                                      f"{args.heartbeat} and {args.grace}): a shorter grace fails live trials")
        definition = {"exp": exp, "flags": flags, "monitor": presets.resolve(exp, flags)["monitor"],
                      "space": {k: [kind, values] for k, (kind, values) in space.items()},
                      "pruning": {k: getattr(args, k) for k in ("pruner", "prune_startup", "prune_warmup")},
                      "heartbeat": [args.heartbeat, args.grace]}
    elif args.study is None:
        raise errors.ConfigError("give --space FILE (a new study) or --study NAME (join one)")
    sweep_dir = os.path.join(out_dir, args.study)
    default_storage = args.storage is None  # an SQLite file in the sweep folder
    if default_storage:
        args.storage = storage_url(sweep_dir, DEFAULT_STORAGE)
    if args.space is not None:
        check_sweep_dir(sweep_dir, args, definition, write=False)  # refuse another sweep's folder before anything
        check_data(definition, args.local)
    if default_storage:
        os.makedirs(sweep_dir, exist_ok=True)
    study = open_study(args, definition if args.space is not None else None, create=args.space is not None)
    if args.space is None:
        definition = study.user_attrs.get("kit_sweep")
        if definition is None:
            raise errors.ConfigError(f"study '{args.study}' was not made by sweep.py (no space recorded)")
        space = {k: tuple(v) for k, v in definition["space"].items()}
        args.heartbeat, args.grace = definition["heartbeat"]  # the study's: a shorter grace would fail live trials
        check_data(definition, args.local)
        study = open_study(args, definition, create=False)
    check_sweep_dir(sweep_dir, args, definition)
    seed = presets.resolve(definition["exp"], definition["flags"])["seed"]
    args.seed = seed
    have = len(counted(study.get_trials(deepcopy=False)))
    pruning = definition["pruning"]
    print(f"study '{args.study}' ({redact(args.storage)}): {have} of {args.trials} trials so far; preset "
          f"{definition['exp']}, {definition['monitor']} "
          f"{'minimised' if metrics.minimized(definition['monitor']) else 'maximised'}, sampler TPE (seed {seed}), "
          f"pruner {pruning['pruner']} (after {pruning['prune_startup']} trials, {pruning['prune_warmup']} warm-up "
          f"epochs); heartbeat {definition['heartbeat'][0]} s, grace {definition['heartbeat'][1]} s; trials in "
          f"{sweep_dir}/")
    work(args, study, definition, sweep_dir, space)
    return 0


def check_data(definition, local):
    """This machine's data root, before the worker takes a trial (without data it would fail every trial)."""
    splits.read_classes(presets.resolve(definition["exp"], {**definition["flags"], **local})["data_root"])


def check_sweep_dir(sweep_dir, args, definition, write=True):
    """The sweep folder records its study (sweep.json: name, storage URL without its password, definition); a folder
    of another sweep is never taken over."""
    path = os.path.join(sweep_dir, "sweep.json")
    default = args.storage == storage_url(sweep_dir, DEFAULT_STORAGE)
    record = {"study": args.study, "storage": DEFAULT_STORAGE if default else redact(args.storage),
              "definition": definition}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        old_storage = old.get("storage") and redact(storage_url(sweep_dir, old["storage"]))
        if old.get("study") != args.study or old.get("definition") != definition or \
                old_storage != redact(args.storage):
            raise errors.ConfigError(f"{sweep_dir} holds another sweep (study '{old.get('study')}' in "
                                      f"{old.get('storage')} with its own space and flags): pick another --study or "
                                      f"--out_dir")
        return
    if os.path.isdir(sweep_dir) and os.listdir(sweep_dir) and not os.path.isfile(os.path.join(sweep_dir,
                                                                                               "study.db")):
        raise errors.ConfigError(f"{sweep_dir} exists and is not a sweep folder: pick another --study or --out_dir")
    if not write:
        return
    os.makedirs(sweep_dir, exist_ok=True)
    fileio.write_atomic(json.dumps(record, indent=1) + "\n", path)


def storage_url(sweep_dir, stored):
    """The study's database URL from sweep.json's `storage`: the SQLite file in this sweep folder, wherever the
    folder now is (DEFAULT_STORAGE, or an older record's absolute path to a study.db in a folder of this name), or
    the URL recorded."""
    local = "sqlite:///" + os.path.abspath(os.path.join(sweep_dir, DEFAULT_STORAGE))
    if stored == DEFAULT_STORAGE:
        return local
    if stored.startswith("sqlite:///"):
        old = stored[len("sqlite:///"):]
        here = os.path.abspath(sweep_dir)
        if os.path.basename(old) == DEFAULT_STORAGE and \
                os.path.basename(os.path.dirname(old)) == os.path.basename(here):
            return local
    return stored


def cli(argv=None):
    return errors.run_cli(main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
