"""Fine-tune (or train from scratch) a ResNet on Caltech-101 with AMP, channels_last and a DALI data path.

    python download.py                                            # once: data/Caltech101 + split lists
    python train_caltech101.py --exp r18_pretrain_lowwd_mix02     # the report's best run
    python train_caltech101.py --exp cpu_smoke                    # no GPU: learns the real data in ~15 min
    python train_caltech101.py --exp r18_pretrain_main --lr_fc 3e-3 --epochs 100   # flags beat the preset
    python train_caltech101.py --help                             # every flag, its default, every preset

Writes checkpoints/<exp>/: best.pth (plain state dict of the best-val model), last.pth (everything --resume
needs), config.json, metrics.csv, tb/ (TensorBoard).
"""
import argparse
import json
import math
import os
import sys
import time

import torch

import augment
import checkpoint
import data_utils
import engine
import model_utils
import plots
import presets


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


def get_args_parser():
    epilog = "presets (--exp):\n" + "\n".join(
        f"  {name}: " + ", ".join(f"{k}={v}" for k, v in p.items()) for name, p in presets.PRESETS.items())
    parser = ArgumentParser(description="Train a ResNet on Caltech-101. Flags override the preset chosen by --exp.",
                            epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", default=presets.DEFAULT_EXP, choices=list(presets.PRESETS), metavar="NAME",
                        help=f"preset name (default: {presets.DEFAULT_EXP}); see the list below")
    for key, default in presets.DEFAULTS.items():
        kind = {bool: _bool, int: int, float: float}.get(type(default), _optional_str)
        choices = presets.CHOICES.get(key)
        # SUPPRESS: only flags given on the command line appear in args, so they (and only they) beat the preset.
        extra = dict(nargs="?", const=True) if kind is _bool else {}  # a bare --cache means --cache true
        parser.add_argument(f"--{key}", type=kind, default=argparse.SUPPRESS, choices=choices,
                            metavar=None if choices else ("BOOL" if kind is _bool else key.upper()),
                            help=f"(default: {default})", **extra)
    return parser



# ---------------------------------------------------------------------------------------------

def main(cfg):
    out_dir = os.path.join(cfg["out_dir"], cfg["exp"])
    try:
        os.makedirs(out_dir, exist_ok=True)
        checkpoint.write_text_atomic(json.dumps(cfg, indent=2) + "\n", os.path.join(out_dir, "config.json"))
    except OSError as e:
        raise presets.ConfigError(f"cannot write to the output folder {out_dir}: {e.strerror}") from None
    print("config: " + json.dumps(cfg))
    device = engine.resolve_device(cfg["device"])
    amp_dtype, use_scaler = engine.resolve_amp(cfg["amp"], device)
    engine.seed_everything(cfg["seed"])
    if cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # autotuned kernels: fastest, not bit-reproducible

    input_dtype = amp_dtype or torch.float32
    train_loader, val_loader, classes = data_utils.build_loaders(
        cfg["data_root"], cfg["img_size"], cfg["batch_size"], device, dtype=input_dtype, loader=cfg["loader"],
        workers=cfg["workers"], seed=cfg["seed"], eval_batch_size=cfg["eval_batch_size"], drop_last=cfg["drop_last"],
        crop_scale_min=cfg["crop_scale_min"], cache=cfg["cache"])
    num_classes = len(classes)
    if cfg["cache"]:
        print(f"cache: {train_loader.num_images + val_loader.num_images} images decoded once in "
              f"{train_loader.decode_seconds + val_loader.decode_seconds:.1f}s, "
              f"{(train_loader.nbytes + val_loader.nbytes) / 2**20:.0f} MiB of uint8 on {device}")

    model = model_utils.get_model(num_classes, pretrained=cfg["pretrained"], arch=cfg["arch"], weights=cfg["weights"])
    model_utils.apply_freeze(model, cfg["freeze"])
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    # The compiled wrapper shares the parameters; checkpoints are taken from `model`, so no _orig_mod. prefix.
    step_model = torch.compile(model) if cfg["compile"] else model
    groups = model_utils.param_groups(model, cfg["lr_backbone"], cfg["lr_fc"], cfg["weight_decay"])
    optimizer = engine.build_optimizer(groups, cfg)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg["epochs"]
    warmup_steps = int(round(cfg["warmup_epochs"] * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, engine.lr_lambda(total_steps, warmup_steps, cfg["schedule"], cfg["min_lr_ratio"]))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    mixer = augment.MixupCutmix(num_classes, cfg["mixup_alpha"], cfg["cutmix_alpha"], cfg["mix_switch_prob"],
                                cfg["label_smoothing"], seed=cfg["seed"])

    state = {"next_epoch": 1, "next_step": 0, "best_top1": -1.0, "best_epoch": 0, "rows": []}
    last_path, best_path = os.path.join(out_dir, "last.pth"), os.path.join(out_dir, "best.pth")
    resume = last_path if cfg["resume"] == "auto" else cfg["resume"]
    if resume:
        state = checkpoint.load_checkpoint(resume, cfg, model, optimizer, scheduler, scaler, mixer, train_loader)
        print(f"resumed from {resume}: continuing at epoch {state['next_epoch']} step {state['next_step']} "
              f"(best val top-1 so far {state['best_top1']:.4f})")

    def save_last(next_epoch, next_step):
        checkpoint.save_atomic({"model": model_utils.export_state_dict(model), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": next_epoch - 1 if next_step == 0 else next_epoch, "next_epoch": next_epoch,
                     "next_step": next_step, "best_top1": state["best_top1"], "best_epoch": state["best_epoch"],
                     "rows": state["rows"], "rng": checkpoint.rng_state(), "mixer_rng": mixer.rng.bit_generator.state,
                     "loader": train_loader.state_dict(), "loader_kind": train_loader.kind, "arch": cfg["arch"],
                     "num_classes": num_classes,
                     "config": cfg}, last_path)

    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"device {device}, amp {amp_dtype}, grad scaler {use_scaler}, channels_last {cfg['channels_last']}, "
          f"loader {train_loader.kind}, torch.compile {cfg['compile']}")
    print(f"data: {num_classes} classes, {train_loader.num_images} train / {val_loader.num_images} val images")
    init = cfg["weights"] or ("ImageNet" if cfg["pretrained"] else "scratch")
    print(f"model: {cfg['arch']} ({init} init), {n_params / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable "
          f"(freeze={cfg['freeze']})")
    print(f"schedule: {steps_per_epoch} steps/epoch, {total_steps} steps total, {warmup_steps} warmup steps, "
          f"{cfg['schedule']} decay to {cfg['min_lr_ratio']} x peak")
    for g in optimizer.param_groups:
        print(f"  group {g['name']}: {len(g['params'])} tensors, peak lr {g['initial_lr']:.3g}, "
              f"weight decay {g['weight_decay']:.3g}")

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(os.path.join(out_dir, "tb"))
    run_start = time.perf_counter()
    rows = state["rows"]
    resumed_wall_time = rows[-1]["wall_time_s"] if rows else 0.0  # time spent before a resume
    save_every = cfg["save_every_steps"]
    stop = checkpoint.GracefulStop()
    try:
        for epoch in range(state["next_epoch"], cfg["epochs"] + 1):
            start_step = state["next_step"] if epoch == state["next_epoch"] else 0
            on_step = (lambda done, e=epoch: save_last(e, done) if done % save_every == 0 and done < steps_per_epoch
                       else None) if save_every else None
            stats = engine.train_one_epoch(step_model, train_loader, optimizer, scheduler, scaler, mixer, amp_dtype,
                                           cfg, epoch, start_step=start_step, stop=stop, on_step=on_step)
            if not stats["completed"]:  # stopped by a signal mid-epoch: keep exactly where we are
                save_last(epoch, stats["steps_done"])
                return checkpoint.stopped(stop, cfg, epoch, stats["steps_done"], last_path)
            row = {"epoch": epoch, **{k: v for k, v in stats.items() if k not in ("steps_done", "completed")},
                   **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}}
            if epoch % cfg["eval_every"] == 0 or epoch == cfg["epochs"]:
                metrics = engine.evaluate(step_model, val_loader, num_classes, amp_dtype)
                row.update(metrics)
                if math.isfinite(metrics["val_top1"]) and metrics["val_top1"] > state["best_top1"]:
                    state["best_top1"], state["best_epoch"] = metrics["val_top1"], epoch
                    checkpoint.save_atomic(model_utils.export_state_dict(model), best_path)
            row["wall_time_s"] = resumed_wall_time + time.perf_counter() - run_start
            rows.append(row)
            for key, value in row.items():  # train_loss -> train/loss, lr_head_decay -> lr/head_decay, ...
                if key != "epoch":
                    writer.add_scalar(key.replace("_", "/", 1), value, epoch)
            writer.flush()
            checkpoint.write_metrics(checkpoint.normalize_rows(rows), os.path.join(out_dir, "metrics.csv"))
            save_last(epoch + 1, 0)
            summary = f"epoch {epoch}/{cfg['epochs']}: train loss {stats['train_loss']:.4f} " \
                      f"acc {stats['train_acc']:.4f} ({stats['train_images_per_s']:.0f} img/s)"
            if "val_top1" in row:
                summary += f" | val top1 {row['val_top1']:.4f} top5 {row['val_top5']:.4f} " \
                           f"mean-class {row['val_mean_class_acc']:.4f} " \
                           f"(best {state['best_top1']:.4f} @ {state['best_epoch']})"
            print(summary + f" | {row['wall_time_s']:.0f}s", flush=True)
            if stop.requested and epoch < cfg["epochs"]:
                return checkpoint.stopped(stop, cfg, epoch + 1, 0, last_path)
    finally:
        stop.restore()
        writer.close()
    print(f"done: best val top-1 {state['best_top1']:.4f} at epoch {state['best_epoch']}; weights {best_path}; "
          f"curves {plots.plot_curves(out_dir)}")
    return {"best_top1": state["best_top1"], "best_epoch": state["best_epoch"], "rows": rows, "out_dir": out_dir,
            "exit_code": 0}



if __name__ == "__main__":
    args = vars(get_args_parser().parse_args())
    exp = args.pop("exp")
    try:
        result = main(presets.resolve(exp, args))
    except (presets.ConfigError, data_utils.DataError, model_utils.ModelError, engine.TrainingError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: stopped at once; the last checkpoint written is intact (--resume auto)")
    sys.exit(result["exit_code"])
