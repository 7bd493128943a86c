"""Multi-process data parallel training through `torchrun` and `torch.distributed`.

`torchrun --nproc_per_node N -m e2e_sae train CONFIG` starts N copies of the trainer with RANK,
WORLD_SIZE and LOCAL_RANK in their environment. Each rank joins one process group (gloo on CPU,
nccl on GPU, one GPU per rank: `cuda:<LOCAL_RANK>`), reads its own slice of every global batch, and
after the backward pass the SAE gradients are averaged with one all-reduce. The frozen LM is never
wrapped or synchronised. Only rank 0 writes files.

Why not `DistributedDataParallel`: the SAEs run inside forward hooks of the LM, not through a module
`forward`, so DDP's per-forward bookkeeping never fires; one coalesced all-reduce per optimizer step
does the same averaging and also covers gradient accumulation without `no_sync`.

Semantics: `batch_size` (and `effective_batch_size`) are per rank; every `*_n_samples` count
(n_samples, warmup, save/eval intervals) is global. So N ranks with batch b run exactly the steps
of one process with batch N*b on the same data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from e2e_sae.errors import UserError
from e2e_sae.resources import check_device

FIRING_BUFFER = "tokens_since_fired"


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes run directories, logs and checkpoints."""
        return self.rank == 0


SINGLE = Dist()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}: expected an integer, got '{raw}'") from None


def dist_from_env() -> Dist:
    """Read the rank layout torchrun exports (defaults: a single process)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"environment: RANK={rank} is not in [0, WORLD_SIZE={world})")
    return Dist(rank, world, local)


def init_distributed(device: str | None) -> tuple[Dist, str | None]:
    """Join torchrun's process group if WORLD_SIZE > 1; returns (layout, device for this rank).

    On CUDA every rank takes `cuda:<LOCAL_RANK>` and nccl; otherwise gloo on CPU. A process group
    that already exists (a script that set one up itself) is used as is.
    """
    check_device(device)
    d = dist_from_env()
    if not d.enabled:
        return d, device
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        device = f"cuda:{d.local_rank}"
        check_device(device, "LOCAL_RANK")
        torch.cuda.set_device(device)
    else:
        device = "cpu"
    if not tdist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        tdist.init_process_group(backend, rank=d.rank, world_size=d.world_size)
        _owned.append(True)
    return d, device


_owned: list[bool] = []  # process groups this module created (and so may destroy)


def shutdown(d: Dist) -> None:
    """Leave the process group `init_distributed` created (one made by the caller stays)."""
    if d.enabled and _owned and tdist.is_initialized():
        tdist.destroy_process_group()
        _owned.clear()


def _comm_device(t: Tensor) -> Tensor:
    """gloo works on CPU tensors, nccl on CUDA ones; small control tensors follow the backend."""
    backend = tdist.get_backend()
    return t.cuda() if backend == "nccl" and not t.is_cuda else t


def average_gradients(params: Iterable[nn.Parameter], d: Dist) -> None:
    """Replace every gradient by its mean over ranks (one all-reduce of a flat buffer).

    A parameter whose gradient is None on every rank stays None (Adam then skips it, as it would in
    one process); if only some ranks have one, the others contribute zeros.
    """
    if not d.enabled:
        return
    params = list(params)
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    has = _comm_device(has.to(params[0].device))
    tdist.all_reduce(has, op=tdist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist(), strict=True) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not live:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in live if p.grad is not None])
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    flat /= d.world_size
    offset = 0
    for p in live:
        assert p.grad is not None
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def sync_firing_stats(saes: nn.Module, d: Dist, n_local_tokens: int) -> None:
    """Make each SAE's `tokens_since_fired` what one process seeing every rank's tokens would have.

    Call after every rank updated its counters on its own micro-batch of `n_local_tokens` tokens.
    Locally a counter is 0 where the latent fired, else old + n_local; globally it must be 0 where
    it fired on any rank, else old + world * n_local. Counters start equal on every rank, so the
    minimum over ranks plus the other ranks' tokens gives exactly that.
    """
    if not d.enabled:
        return
    for name, buf in saes.named_buffers():
        if name.rsplit(".", 1)[-1] != FIRING_BUFFER:
            continue
        merged = _comm_device(buf.clone())
        tdist.all_reduce(merged, op=tdist.ReduceOp.MIN)
        merged.add_(merged.gt(0).long(), alpha=n_local_tokens * (d.world_size - 1))  # no read
        buf.copy_(merged)


def broadcast_state(module: nn.Module, d: Dist, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters and buffers (or just the buffers) to every rank, as DDP does.

    Firing counters are merged by `sync_firing_stats` instead, so they are skipped here unless the
    parameters are broadcast too (the start of a run)."""
    if not d.enabled:
        return
    tensors: list[Tensor] = [] if buffers_only else [p.data for p in module.parameters()]
    for name, buf in module.named_buffers():
        if buffers_only and name.rsplit(".", 1)[-1] == FIRING_BUFFER:
            continue
        tensors.append(buf)
    for t in tensors:
        tdist.broadcast(t, src=0)


def reduce_mean(values: Mapping[str, float], d: Dist) -> dict[str, float]:
    """Mean over ranks of each logged value (every rank must pass the same keys)."""
    if not d.enabled or not values:
        return dict(values)
    keys = sorted(values)
    t = _comm_device(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    mean = {k: float(v) / d.world_size for k, v in zip(keys, t.tolist(), strict=True)}
    return {k: mean[k] for k in values}  # the caller's key order


def mean_over_ranks_(t: Tensor, d: Dist) -> Tensor:
    """`t` replaced by its mean over ranks, on its device (no host read: the loop reads it
    later). The same float64 arithmetic as `reduce_mean`."""
    if d.enabled:
        buf = _comm_device(t)
        tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
        t.copy_(buf / d.world_size)
    return t


def max_over_ranks(value: int, d: Dist) -> int:
    """Agree on a flag or code (0 = nothing) so that every rank takes the same branch."""
    if not d.enabled:
        return value
    t = _comm_device(torch.tensor([value], dtype=torch.int64))
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


def broadcast_str(value: str | None, d: Dist) -> str | None:
    """Rank 0's string on every rank (e.g. the run directory it created)."""
    if not d.enabled:
        return value
    # Bytes through a tensor rather than broadcast_object_list, which pickles.
    data = b"" if value is None else value.encode()
    n = _comm_device(torch.tensor([len(data) if value is not None else -1], dtype=torch.int64))
    tdist.broadcast(n, src=0)
    length = int(n.item())
    buf = torch.zeros(max(length, 0), dtype=torch.uint8)
    if d.is_main:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else buf
    buf = _comm_device(buf)
    if length > 0:
        tdist.broadcast(buf, src=0)
    return None if length < 0 else bytes(buf.cpu().tolist()).decode()


__all__ = [
    "SINGLE",
    "Dist",
    "average_gradients",
    "broadcast_state",
    "broadcast_str",
    "dist_from_env",
    "init_distributed",
    "max_over_ranks",
    "mean_over_ranks_",
    "reduce_mean",
    "shutdown",
    "sync_firing_stats",
]


def on_main(fn: Callable[[], Any], d: Dist) -> Any:
    """`fn()` on rank 0 only (None elsewhere). A UserError there is raised on every rank, so the
    other ranks do not wait forever at the next collective."""
    if not d.enabled:
        return fn()
    result, message = None, None
    if d.is_main:
        try:
            result = fn()
        except UserError as err:
            message = str(err)
    message = broadcast_str(message, d)
    if message is not None:
        raise UserError(message)
    return result
