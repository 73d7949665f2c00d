"""A training run's story, top to bottom: settings resumed or checked, loaders, model, optimizer and schedule built,
the epoch loop with evaluation, checkpoints and early stopping, and the end-of-run files. train_caltech101.py is its
command line; sweep.py and bench.py call main() here.

    import presets, training
    result = training.main(presets.resolve("cpu_smoke", {"epochs": 2}))   # {"summary": ..., "out_dir": ...}

Writes checkpoints/<exp>/ (a folder that already holds a run is never reused: <exp>_2, ...): best.pth (plain state
dict of the best model by --monitor), best_loss.pth (lowest val loss), last.pth (everything --resume needs),
config.json, classes.txt, train_list.txt, metrics.csv, summary.json, tb/ (TensorBoard), curves.png, report.json and
report.html (one self-contained page of the run: open it in any browser).
"""
import json
import math
import os
import signal
import time

import torch

import augment
import data_utils
import model_utils
import presets
from kit.base import devices, distributed, errors, fileio
from kit.data import splits
from kit.models import weights_file
from kit.reporting import plots, report_page, run_report
from kit.training import checkpoint, engine, metrics, runs

# ---------------------------------------------------------------------------------------------
# set-up

def check_world(cfg, world, device):
    """Per-rank (train, eval) batch sizes; one-line errors for what cannot run on this many processes."""
    batch = cfg["batch_size"]
    if batch % world:
        valid = [w for w in range(1, batch + 1) if batch % w == 0]
        raise errors.ConfigError(f"batch_size {batch} (the global batch) does not divide over {world} processes; "
                                  f"valid world sizes: {', '.join(map(str, valid[:12]))}"
                                  + (", ..." if len(valid) > 12 else "") + " (or change --batch_size)")
    if cfg["sync_bn"] and (world == 1 or device.type != "cuda"):
        raise errors.ConfigError("sync_bn needs several CUDA processes under torchrun (NCCL); it cannot run on the "
                                  "CPU or in one process")
    return batch // world, max(1, math.ceil(cfg["eval_batch_size"] / world))


def find_resume(cfg):
    """(path, checkpoint) to resume from, or (None, None) for a fresh run."""
    if not cfg["resume"]:
        return None, None
    name = cfg["name"] or cfg["exp"]
    path = runs.auto_resume_path(cfg["out_dir"], name) if cfg["resume"] == "auto" else cfg["resume"]
    if path is None:
        if distributed.env()[0] == 0:
            print(f"note: --resume auto: no last.pth of {name} in {cfg['out_dir']} yet, starting a fresh run")
        return None, None
    return path, checkpoint.read_training_checkpoint(path)


# ---------------------------------------------------------------------------------------------

def main(cfg, explicit=None, judge=None):
    """Train one run. `explicit`: the settings the user gave (flags, config file); on --resume the others come from
    the checkpoint (None: every setting of cfg counts as given). `judge(epoch, value)`: asked after each evaluation
    with the monitored value (one process only); a reason it returns ends the run as an early stop does (a sweep's
    pruner)."""
    rank, world, local_rank = distributed.env()
    device = devices.resolve_device(cfg["device"], local_rank if world > 1 else None)
    resume_path, ckpt = find_resume(cfg)
    notes = []
    if ckpt is not None:
        cfg, notes = checkpoint.resume_settings(ckpt, cfg, explicit, resume_path)
        device = devices.resolve_device(cfg["device"], local_rank if world > 1 else None)
    amp_dtype, use_scaler = devices.resolve_amp(cfg["amp"], device)
    ran_with = ckpt["config"].get("loader") if ckpt is not None else None  # a resumed run's own loader
    loader, why = data_utils.choose_loader(cfg["loader"], device, prefer=ran_with)
    finished = ckpt is not None and checkpoint.is_finished(ckpt)
    if cfg["loader"] == "auto" and rank == 0 and not finished:
        print(f"loader auto: {loader}, since {why}")
    if ran_with not in (None, "auto", loader) and rank == 0 and not finished:
        print(f"note (resume): this run was trained with the {ran_with} loader and continues with {loader}: the same "
              f"images, crops and flips (every loader follows the run's sampling plan), decoded and resized by "
              f"another library, so not bit-identical to a run that kept {ran_with}")
    cfg = {**cfg, "loader": loader}  # config.json and last.pth record the loader that ran
    batch, eval_batch = check_world(cfg, world, device)
    rt = devices.Runtime(device, amp_dtype, use_scaler, batch, eval_batch, rank, world)
    distributed.init(device)
    try:
        if finished:
            return finished_run(cfg, rt, ckpt, resume_path)
        if judge is not None and world > 1:
            raise errors.ConfigError("a judged run (a sweep's trial) runs in one process, not under torchrun")
        return train(cfg, rt, resume_path, ckpt, notes, judge)
    finally:
        distributed.cleanup()


def end_files(cfg, run_dir):
    """The files written after the last epoch, in order; summary.json last (the marker that they are complete). A run
    from before report pages (its config.json has no report_page) stays finished without them."""
    recorded = (runs.read_run_config(run_dir, required=False) or {}).get("report_page", False)
    return ("curves.png",) + (("report.json", "report.html") if cfg["report_page"] and recorded else ()) \
        + (("best.safetensors",) if cfg.get("save_safetensors") and os.path.isfile(os.path.join(run_dir, "best.pth"))
           else ()) + ("summary.json",)


def finished_run(cfg, rt, ckpt, resume_path):
    """A relaunch of a run that is over (a requeued job, --resume auto run again): one line and nothing touched, or,
    when the end-of-run files are missing (the run was killed while writing them), those files and nothing else."""
    run_dir = os.path.dirname(os.path.abspath(resume_path))
    stopper = engine.EarlyStopping(cfg["monitor"])
    stopper.load_state_dict(ckpt["early_stopping"])
    ended = f"stopped early after epoch {ckpt['epoch']}" if stopper.reason else f"finished all {ckpt['epoch']} epochs"
    best = f"best {cfg['monitor']} {stopper.best:.4f} at epoch {stopper.best_epoch}"
    missing = distributed.broadcast_object([name for name in end_files(cfg, run_dir)  # rank 0's view decides
                                            if not os.path.isfile(os.path.join(run_dir, name))])
    log = print if rt.main else (lambda *a, **k: None)
    if not missing:
        log(f"{run_dir} has {ended} ({best}): nothing to do")
        return {"exit_code": 0, "out_dir": run_dir, "best_epoch": stopper.best_epoch, "rows": ckpt["rows"]}
    if ckpt.get("split") != splits.split_identity(cfg["data_root"]):
        raise errors.ConfigError(f"--resume {resume_path}: the run has finished but lacks {', '.join(missing)}, and "
                                  f"the split lists in {cfg['data_root']} are not the ones it was trained on")
    log(f"{run_dir} has {ended} ({best}); writing its missing end-of-run files ({', '.join(missing)})")
    classes = splits.read_class_file(os.path.join(run_dir, "classes.txt"))
    summary = finish_run(cfg, rt, run_dir, ckpt["rows"], stopper, classes)
    return {"exit_code": 0, "out_dir": run_dir, "best_epoch": stopper.best_epoch, "rows": ckpt["rows"],
            "summary": summary, "best_top1": summary["best"]["val_top1"]}


def finish_run(cfg, rt, run_dir, rows, stopper, classes):
    """The end-of-run files: curves.png; report.json (best.pth on val: per class, confusions, mistakes) and
    report.html; then the train / val / test table of best.pth in summary.json (the marker that the run's files are
    complete)."""
    evaluated, page_eval = {}, None
    best_path = os.path.join(run_dir, "best.pth")
    if os.path.isfile(best_path):
        for split in ("train", "test", "val"):  # train through the val transform; test when the split has one
            if split == "test" and not os.path.isfile(os.path.join(cfg["data_root"], "test.txt")) or \
                    split == "val" and not cfg["report_page"]:
                continue
            result = engine.evaluate_weights(best_path, cfg, split, len(classes), rt.device, rt.amp_dtype,
                                             rt.eval_batch, rank=rt.rank, world=rt.world)
            if split == "val":  # for the page: the summary's val figures are the best epoch's own evaluation
                page_eval = result
            else:
                evaluated[split] = result[2]
    summary = run_report.summary(cfg, rows, stopper, cfg["ema_decay"] > 0, stopper.reason, evaluated)
    if rt.main:
        curves = plots.plot_curves(run_dir)
        page = write_report_page(cfg, run_dir, classes, best_path, page_eval, summary, rt.amp_dtype) \
            if cfg["report_page"] else None
        if cfg.get("save_safetensors") and os.path.isfile(best_path):
            weights_file.write(os.path.join(run_dir, "best.safetensors"), model_utils.load_state_dict_file(best_path),
                               cfg["arch"], classes, presets.eval_size(cfg), runs.kit_version())
        fileio.write_atomic(json.dumps(summary, indent=1) + "\n", os.path.join(run_dir, "summary.json"))
        reached = summary["time_to_val_top1"]
        print(f"done: best {cfg['monitor']} {stopper.best:.4f} at epoch {stopper.best_epoch}; weights "
              f"{best_path}; curves {curves}" + (f"; report page {page}" if page else "")
              + (f"; {metrics.describe_time_to_reach(reached)}" if reached else ""))
    return summary


def write_report_page(cfg, run_dir, classes, best_path, evaluation, summary, amp_dtype):
    """report.json and report.html of a finished run (rank 0); without best.pth, the page of what exists."""
    if evaluation is None:
        return report_page.write_run_page(os.path.join(run_dir, "report.html"), run_dir, summary=summary)
    report, pics = report_page.evaluation_files(
        run_dir, evaluation, best_path, "val", "none", cfg, presets.eval_size(cfg), amp_dtype,
        splits.read_split(cfg["data_root"], "val")[0], classes, splits.image_root(cfg["data_root"]))
    return report_page.write_run_page(os.path.join(run_dir, "report.html"), run_dir, report, pics, summary)


def stopped_run_page(cfg, run_dir, rows, how):
    """A signal stop's page: what exists (settings, curves, evaluations so far), written before the process ends;
    nothing is evaluated, so the stop stays quick."""
    if not cfg["report_page"] or not distributed.is_main():
        return
    if rows:
        plots.plot_curves(run_dir)
    report_page.write_run_page(os.path.join(run_dir, "report.html"), run_dir, stopped=how)


def launch_free(cfg):
    """The settings as a rerun file holds them: without those that say how a process was launched."""
    return {k: v for k, v in cfg.items() if k not in presets.LAUNCH_KEYS}


def set_determinism(cfg, device):
    if cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # autotuned kernels: fastest, not bit-reproducible


def build_parts(cfg, rt, model, optimizer, scheduler, train_loader, num_classes, class_weights=None):
    """checkpoint.Parts: the model and everything else stateful that last.pth saves."""
    return checkpoint.Parts(
        model, optimizer, scheduler, torch.amp.GradScaler(rt.device.type, enabled=rt.use_scaler),
        augment.MixupCutmix(num_classes, cfg["mixup_alpha"], cfg["cutmix_alpha"], cfg["mix_switch_prob"],
                            cfg["label_smoothing"], seed=[cfg["seed"], rt.rank],
                            class_weights=None if class_weights is None else class_weights.to(rt.device)), train_loader,
        engine.ModelEma(model, cfg["ema_decay"], cfg["ema_every"], cfg["ema_warmup"]) if cfg["ema_decay"] else None,
        engine.EarlyStopping(cfg["monitor"], cfg["early_stop_patience"], cfg["min_delta"]))


def prepare_run_dir(cfg, resume_path, split_id, classes, rt, ran_on):
    """The run's folder (the resumed one, or a new one claimed by rank 0) with config.json, classes.txt and the
    training list written in it."""
    run_dir = os.path.dirname(os.path.abspath(resume_path)) if resume_path else \
        distributed.broadcast_object(runs.new_run_dir(cfg["out_dir"], cfg["name"] or cfg["exp"])
                                     if rt.main else None)
    if rt.main:
        try:
            fileio.write_atomic(json.dumps(dict(launch_free(cfg), split=split_id, world_size=rt.world, ran_on=ran_on),
                                                    indent=2) + "\n", os.path.join(run_dir, "config.json"))
        except OSError as e:
            raise errors.ConfigError(f"cannot write to the output folder {run_dir}: {e.strerror}") from None
        fileio.write_atomic("\n".join(classes) + "\n", os.path.join(run_dir, "classes.txt"))
        runs.copy_into_run(os.path.join(cfg["data_root"], "train.txt"), run_dir, "train_list.txt")
    distributed.barrier()
    return run_dir


def epoch_start(state, epoch, device):
    """(tally, first step) of an epoch: a fresh tally from step 0, or the saved one when resuming inside it."""
    tally = engine.EpochTally(device)
    if epoch != state["next_epoch"] or not state["next_step"]:
        return tally, 0
    if state["tally"] is not None:
        tally.load_state_dict(state["tally"])
    return tally, state["next_step"]


def record_epoch(row, rows, writer, run_dir):
    """Rank 0: the epoch's row into TensorBoard (train_loss -> train/loss, lr_head_decay -> lr/head_decay, ...)
    and metrics.csv."""
    rows.append(row)
    if writer is None:
        return
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)):
            writer.add_scalar(key.replace("_", "/", 1), value, row["epoch"])
    writer.flush()
    checkpoint.write_metrics(rows, os.path.join(run_dir, "metrics.csv"))


def start_run(cfg, rt, resume_path, ckpt, notes, log):
    """Everything a run needs before its first step, checked before its folder is created or touched: split,
    loaders, model, optimizer and schedule, the stateful parts (restored on resume), the run folder, and the
    start-up lines (settings, derived quantities, duration estimate). Returns (split_id, classes, parts, val_loader,
    state, run_dir)."""
    split_id = splits.split_identity(cfg["data_root"])
    if ckpt is not None and ckpt.get("split") != split_id:
        raise errors.ConfigError(f"--resume {resume_path}: the split lists in {cfg['data_root']} are not the ones "
                                  f"this run was trained on (re-split since?); resume needs the same split")
    classes = splits.read_classes(cfg["data_root"])
    data = data_utils.data_settings(cfg, rt.dtype)
    train_loader, val_loader = (data_utils.build_loader(cfg["data_root"], split, size, rt.device, data, rt.rank,
                                                        rt.world) for split, size in
                                (("train", rt.batch), ("val", rt.eval_batch)))
    num_classes, steps_per_epoch = len(classes), len(train_loader)
    model, optimizer, frozen_stages = engine.build_model(cfg, num_classes, rt.device, quiet=not rt.main)
    scheduler, total_steps, warmup_steps = engine.build_schedule(optimizer, cfg, steps_per_epoch, frozen_stages)
    train_labels = splits.read_split(cfg["data_root"], "train")[1]
    class_weights = augment.class_weights(train_labels, num_classes) if cfg["class_balance"] == "loss" else None
    parts = build_parts(cfg, rt, model, optimizer, scheduler, train_loader, num_classes, class_weights)
    state = {"next_epoch": 1, "next_step": 0, "rows": [], "wall_time_s": 0.0, "tally": None}
    if ckpt is not None:
        state, restore_notes = checkpoint.restore(ckpt, resume_path, parts, rt.rank, rt.world)
        notes += restore_notes
    ran_on = {"device": str(rt.device), "amp": devices.describe_amp(rt.amp_dtype, rt.use_scaler),
              "kit": runs.kit_version()}
    run_dir = prepare_run_dir(cfg, resume_path, split_id, classes, rt, ran_on)

    log("config: " + json.dumps(cfg))
    for note in notes:
        log(f"note (resume): {note}")
    if resume_path:
        log(f"resumed from {resume_path}: continuing at epoch {state['next_epoch']} step {state['next_step']}")
    run_report.describe(cfg, rt, parts, val_loader, total_steps, warmup_steps, run_dir, log)
    run_report.describe_balance(cfg, log, train_labels, classes, class_weights)
    run_report.estimate_duration(cfg, rt, model, steps_per_epoch, val_loader.plan.num_images, log)
    return split_id, classes, parts, val_loader, state, run_dir


def train(cfg, rt, resume_path, ckpt, notes, judge=None):
    """The run's story: start it, then epochs of training, evaluation and checkpoints, then the end-of-run files."""
    log = print if rt.main else (lambda *a, **k: None)
    engine.seed_everything(cfg["seed"])
    set_determinism(cfg, rt.device)
    split_id, classes, parts, val_loader, state, run_dir = start_run(cfg, rt, resume_path, ckpt, notes, log)
    model, num_classes, steps_per_epoch, stopper = parts.model, len(classes), len(parts.loader), parts.stopper

    writer = None
    if rt.main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(run_dir, "tb"))
    rows = state["rows"]
    last = checkpoint.LastCheckpoint(parts, cfg, split_id, num_classes, rows, run_dir, rt.main)
    run_start, last_save = time.perf_counter(), time.perf_counter()
    stop = checkpoint.GracefulStop(quiet=not rt.main)

    def wall_time():  # of the whole run, the time before a resume included
        return state["wall_time_s"] + time.perf_counter() - run_start

    trainable = engine.phase(cfg, state["next_epoch"])
    model_utils.apply_freeze(model, trainable)
    step_model = engine.step_model_for(model, cfg, rt.device, rt.world)
    eval_model = engine.compiled(model, cfg) if cfg["compile"] and rt.world > 1 else \
        (step_model if rt.world == 1 else model)
    save_every, stop_reason = cfg["save_every_steps"], None
    try:
        for epoch in range(state["next_epoch"], cfg["epochs"] + 1):
            if engine.phase(cfg, epoch) != trainable:  # gradual unfreezing: everything trains from here
                trainable = engine.phase(cfg, epoch)
                model_utils.apply_freeze(model, trainable)
                step_model = engine.step_model_for(model, cfg, rt.device, rt.world)  # DDP: the new trainable set
                eval_model = step_model if rt.world == 1 else eval_model
                log(f"epoch {epoch}: unfreezing every stage (the backbone's LR warms up from here)")
            tally, start_step = epoch_start(state, epoch, rt.device)
            on_step = (lambda done, e=epoch, t=tally: last.save(e, done, wall_time(), t)
                       if done % save_every == 0 and done < steps_per_epoch else None) if save_every else None
            stats = engine.train_one_epoch(parts, rt.amp_dtype, cfg, epoch, step_model, start_step, tally, stop,
                                           on_step)
            if not stats["completed"]:  # stopped by a signal mid-epoch: keep exactly where we are
                last.save(epoch, stats["steps_done"], wall_time(), tally, wait=True)
                stopped_run_page(cfg, run_dir, rows, f"stopped by a signal in epoch {epoch} (step "
                                 f"{stats['steps_done']}); --resume continues it")
                return checkpoint.stopped(stop.signum or signal.SIGTERM, cfg, epoch, stats["steps_done"], last.path,
                                          rt.main)
            row = {"epoch": epoch, **{k: v for k, v in stats.items() if k not in ("steps_done", "completed")},
                   **{f"lr_{g['name']}": g["lr"] for g in parts.optimizer.param_groups}}
            if epoch % cfg["eval_every"] == 0 or epoch == cfg["epochs"]:
                stop_reason = evaluate_epoch(cfg, rt, epoch, row, parts, eval_model, val_loader, num_classes,
                                             run_dir, rows)
                if stop_reason is None and judge is not None:
                    stop_reason = stopper.reason = judge(epoch, row[cfg["monitor"]])
            row["wall_time_s"] = wall_time()
            record_epoch(row, rows, writer, run_dir)
            stopping = distributed.any_rank(stop.requested, rt.device)  # the ranks agree once per epoch
            finished = epoch == cfg["epochs"] or stop_reason is not None
            if finished or stopping or cfg["keep_checkpoints"] or \
                    time.perf_counter() - last_save >= cfg["save_interval_s"]:
                last.save(epoch + 1, 0, wall_time(), wait=finished or stopping, finished=finished)
                last_save = time.perf_counter()
            log(run_report.epoch_line(cfg, epoch, stats, row, stopper, parts.ema, run_start, state), flush=True)
            if stop_reason is not None:
                log(f"early stop after epoch {epoch}: {stop_reason}")
                break
            if stopping and not finished:
                stopped_run_page(cfg, run_dir, rows, f"stopped by a signal after epoch {epoch}; --resume continues "
                                                     f"it")
                return checkpoint.stopped(stop.signum or signal.SIGTERM, cfg, epoch + 1, 0, last.path, rt.main)
        if writer is not None:
            writer.close()
            writer = None
        last.wait()
        # last.pth says the run is finished: a signal now lets this work complete first, and a kill leaves a run
        # whose --resume writes the missing files (finished_run).
        signalled_before = stop.requested
        summary = finish_run(cfg, rt, run_dir, rows, stopper, classes)
        if stop.requested:
            log(f"{signal.Signals(stop.signum).name} arrived "
                + ("during the last epoch" if signalled_before else "during the end-of-run work")
                + ": the end-of-run work was finished first; the run is complete")
    finally:
        stop.restore()
        if writer is not None:
            writer.close()
        last.wait()
    return {"best_top1": summary["best"]["val_top1"], "best_epoch": stopper.best_epoch, "rows": rows,
            "out_dir": run_dir, "exit_code": 0, "summary": summary, "signalled": stop.requested}


def evaluate_epoch(cfg, rt, epoch, row, parts, eval_model, val_loader, num_classes, run_dir, rows):
    """Evaluate (the EMA model when there is one, the raw model's top-1 beside it), keep best.pth by the monitor and
    best_loss.pth by val loss; returns the early-stopping reason, or None."""
    model, ema, stopper = parts.model, parts.ema, parts.stopper
    distributed.broadcast_buffers(model)  # rank 0's BatchNorm statistics: what the checkpoints hold
    static_eval = rt.eval_batch if cfg["compile"] else None  # torch.compile: one shape, no recompiling
    figures = engine.evaluate(eval_model, val_loader, num_classes, rt.amp_dtype, static_batch=static_eval)
    judged = model
    if ema is not None:
        distributed.broadcast_buffers(ema.module)
        row["raw_val_top1"] = figures["val_top1"]
        figures = engine.evaluate(ema.module, val_loader, num_classes, rt.amp_dtype)
        judged = ema.module
    row.update(figures)
    best_loss_so_far = min((r["val_loss"] for r in rows if r.get("val_loss") is not None), default=math.inf)
    is_best, should_stop = stopper.step(figures[cfg["monitor"]], epoch)
    if rt.main:
        if is_best:
            checkpoint.save_atomic(model_utils.export_state_dict(judged), os.path.join(run_dir, "best.pth"))
        if math.isfinite(figures["val_loss"]) and figures["val_loss"] < best_loss_so_far:
            checkpoint.save_atomic(model_utils.export_state_dict(judged), os.path.join(run_dir, "best_loss.pth"))
    row["best_epoch"] = stopper.best_epoch
    return stopper.reason if should_stop else None
