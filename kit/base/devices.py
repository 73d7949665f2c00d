"""Where a run computes and in what precision: --device (CUDA, Apple's MPS, the CPU; the one-line diagnosis of a GPU
torch cannot use), --amp (bf16 / fp16 with a GradScaler / off, per device) and the kit's one autocast context.

    device = devices.resolve_device("auto"); amp_dtype, use_scaler = devices.resolve_amp("auto", device)
    with devices.autocast(device, amp_dtype): logits = model(images)
    rt = devices.Runtime(device, amp_dtype, use_scaler, batch=64, eval_batch=128)   # one process's part of a run
"""
import dataclasses
import os
import shutil
import sys

import torch

from kit.base import errors


@dataclasses.dataclass(frozen=True)
class Runtime:
    """This process's part of a run, resolved once at start-up: where it computes, in what precision, and its share
    of each step."""
    device: torch.device
    amp_dtype: object  # autocast dtype (torch.bfloat16 / torch.float16), or None: float32 throughout
    use_scaler: bool  # float16's GradScaler
    batch: int  # train images per step on this rank (the global batch / world)
    eval_batch: int  # evaluation images per step on this rank
    rank: int = 0
    world: int = 1

    @property
    def main(self):
        """Rank 0: the process that writes the run's files and prints."""
        return self.rank == 0

    @property
    def dtype(self):
        """Of the image batches: the AMP dtype, or float32."""
        return self.amp_dtype or torch.float32


def nvidia_gpu_present():
    return shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0")


def unusable_gpu():
    """The one-line diagnosis when an NVIDIA GPU is present but torch cannot use it, else None."""
    if torch.cuda.is_available() or not nvidia_gpu_present():
        return None
    return (f"an NVIDIA GPU is present but this torch {torch.__version__} (built for CUDA {torch.version.cuda}) "
            f"cannot use it, usually a driver older than that CUDA; install the torch wheel for your CUDA version "
            f"(README, Install)")


def mps_available():
    """Apple's Metal backend (macOS on Apple silicon). Untested on the kit's own machines, which have no Mac."""
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def resolve_device(name, local_rank=None):
    """The torch.device for a --device setting; under torchrun (local_rank given) a CUDA run uses cuda:LOCAL_RANK.
    auto: CUDA, else Apple's MPS, else the CPU."""
    if name == "auto":
        if not torch.cuda.is_available():
            if mps_available() and local_rank is None:
                return torch.device("mps")
            if unusable_gpu():
                print(f"warning: {unusable_gpu()}; training on the CPU", file=sys.stderr)
            return torch.device("cpu")
        name = "cuda"
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not mps_available():
            raise errors.ConfigError(f"device=mps but torch {torch.__version__} has no usable MPS backend here (it "
                                      f"needs macOS 12.3+ on Apple silicon); use --device cpu")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise errors.ConfigError(f"device={name} but no CUDA device is visible (torch {torch.__version__}, built "
                                  f"for CUDA {torch.version.cuda}); use --device cpu")
    if name == "cuda":
        index = local_rank if local_rank is not None else torch.cuda.current_device()
    else:
        index = int(name.split(":", 1)[1])
        if local_rank is not None:
            raise errors.ConfigError(f"device={name}: under torchrun each rank uses cuda:LOCAL_RANK; choose the GPUs "
                                      f"with CUDA_VISIBLE_DEVICES and pass --device cuda")
        if index >= torch.cuda.device_count():
            raise errors.ConfigError(f"device={name} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def resolve_amp(amp, device):
    """(autocast dtype or None, use GradScaler). auto: bf16 only where it runs natively (CUDA compute capability
    8.0+, i.e. Ampere and newer; CPUs with AVX-512 bf16), fp16 with a GradScaler on older GPUs (T4, V100, RTX 20xx:
    their bf16 is emulated and slow although torch.cuda.is_bf16_supported() says yes), off on other CPUs and on
    Apple's MPS (fp32 where in doubt: its autocast covers fewer operators; --amp bf16 asks for it there)."""
    if amp == "auto":
        if device.type == "mps":
            amp = "off"
        elif device.type == "cuda":
            amp = "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"
        else:
            native_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
            amp = "bf16" if native_bf16 else "off"
    if amp == "fp16" and device.type != "cuda":
        raise errors.ConfigError(f"amp=fp16 needs CUDA; on {device.type} use --amp bf16 or --amp off")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp], amp == "fp16"


def autocast(device, amp_dtype):
    """The one autocast context of the kit: amp_dtype (bf16/fp16) on the device's autocast, or off when None."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def describe_amp(amp_dtype, use_scaler=False):
    """'bf16 autocast', 'fp16 autocast with a GradScaler' or 'off (fp32)': what a run's AMP setting became."""
    if amp_dtype is None:
        return "off (fp32)"
    return f"{str(amp_dtype).replace('torch.', '').replace('bfloat16', 'bf16').replace('float16', 'fp16')} autocast" \
        + (" with a GradScaler" if use_scaler else "")
