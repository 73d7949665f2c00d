"""torch.distributed plumbing for runs launched by torchrun: start-up from the environment, rank helpers, and
the few collectives the kit needs (agreeing on flags, gathering evaluation outputs, copying BatchNorm statistics).
Without torchrun's environment every helper is a no-op and the kit runs as one process.

    torchrun --standalone --nproc_per_node=4 train_caltech101.py --exp r18_pretrain_lowwd_mix02

NCCL on CUDA, gloo on CPU. Rank k uses cuda:LOCAL_RANK (and its DALI pipeline the same GPU).
"""
import datetime
import os

import torch
import torch.distributed as dist


def env():
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    get = os.environ.get
    return int(get("RANK", 0)), int(get("WORLD_SIZE", 1)), int(get("LOCAL_RANK", 0))


def init(device):
    """Join the process group when launched with more than one process; returns (rank, world size)."""
    rank, world, _ = env()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        # A relaunch after a failure (torchrun --max_restarts) meets in the same store: its own key prefix keeps
        # the new ranks from reading the dead ones' addresses (seen with torch 2.14: "connectFullMesh failed").
        store = dist.PrefixStore(f"caltech-kit/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return rank, world


def active():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if active() else 0


def world():
    return dist.get_world_size() if active() else 1


def is_main():
    return rank() == 0


def barrier():
    if active():
        dist.barrier()


def cleanup():
    if active():
        dist.destroy_process_group()


def any_rank(flag, device):
    """True on every rank if `flag` is true on any rank (a host bool; one tiny all-reduce)."""
    if not active():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_finite(flag):
    """A device bool tensor that is true only if `flag` is true on every rank (no host sync: the reduction is
    queued on the device)."""
    if not active():
        return flag
    t = flag.to(torch.float32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t[0] > 0


def sum_(tensor):
    """In-place sum over ranks (for counters)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_rows(tensor):
    """Every rank's rows, concatenated in rank order on every rank (ranks may hold different numbers of rows)."""
    if not active():
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world())]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    padded = tensor.new_zeros((max(counts),) + tuple(tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def gather_objects(obj):
    """Every rank's picklable object, as a list in rank order (on every rank)."""
    if not active():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's picklable object, on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module):
    """Give every rank rank 0's buffers (BatchNorm running statistics): DDP refreshes them only at the start of a
    forward, so after the last training step each rank holds its own; evaluation and checkpoints use rank 0's."""
    if active():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
