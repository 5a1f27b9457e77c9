"""Data-parallel helpers for runs launched by ``torchrun``; every helper is a no-op in a single process.

Under ``torchrun`` each process reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from its environment
and joins a process group: NCCL when it drives a GPU (``cuda:LOCAL_RANK``), gloo on CPU. Training keeps
one *global* batch per step, the same on every rank; each rank computes its contiguous slice of it
(:func:`shard_range`) and the gradients are averaged, so a run gives the same model on any number of
processes (up to floating-point summation order).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from geoswc.core.errors import InputError, SettingError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a data-parallel run (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and shows progress."""
        return self.rank == 0


_context: DistContext | None = None


def launched_by_torchrun() -> bool:
    """Whether the torchrun environment variables are set."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def resolve_device(device: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """``device`` as given, else ``cuda:LOCAL_RANK`` when a GPU is present, else the CPU.

    Raises:
        SettingError: a device this machine does not have (no CUDA, or no GPU of that number).
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise SettingError(
            f"device {str(device)!r} is not a device ({e}); use auto, cpu or cuda[:N]", None, "device"
        ) from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingError(f"device {dev} is not available here (no CUDA GPU); use auto or cpu", None, "device")
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise SettingError(f"device {dev} is not available here ({torch.cuda.device_count()} GPUs)", None, "device")
    if dev.type not in ("cpu", "cuda"):
        raise SettingError(f"device {dev} is not supported; use auto, cpu or cuda[:N]", None, "device")
    return dev


def init_distributed(device: str | torch.device | None = None, timeout_s: float = 3600.0) -> DistContext:
    """Join the torchrun process group (NCCL on GPU, gloo on CPU); without torchrun, a single-process context.

    Args:
        device: ``auto``/None (``cuda:LOCAL_RANK`` if available, else CPU), ``cpu`` or ``cuda``.
        timeout_s: how long collectives wait for the slowest rank (feature extraction can be uneven).
    """
    global _context
    if dist.is_available() and dist.is_initialized():
        return context()
    if not launched_by_torchrun():
        _context = DistContext(device=resolve_device(device))
        return _context
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    _context = DistContext(rank, world, local, dev)
    log.info("rank %d of %d on %s (%s)", rank, world, dev, backend)
    return _context


def context() -> DistContext:
    """The current context: the one :func:`init_distributed` made, else rank 0 of 1 on the CPU."""
    global _context
    if dist.is_available() and dist.is_initialized():
        if _context is None or _context.world_size != dist.get_world_size():
            _context = DistContext(
                dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), resolve_device(None)
            )
        return _context
    return _context if _context is not None else DistContext()


def shutdown() -> None:
    """Leave the process group (if any)."""
    global _context
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _context = None


def shard_range(n: int, ctx: DistContext | None = None) -> tuple[int, int]:
    """This rank's contiguous slice ``[lo, hi)`` of ``n`` items (sizes differ by at most one)."""
    ctx = ctx or context()
    base, extra = divmod(n, ctx.world_size)
    lo = ctx.rank * base + min(ctx.rank, extra)
    return lo, lo + base + (1 if ctx.rank < extra else 0)


def _comm_device() -> torch.device:
    ctx = context()
    return ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if context().enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor on ``t``'s device); ``t`` itself in a single process."""
    if not context().enabled:
        return t
    buf = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf)
    return buf.to(t.device)


def all_reduce_mean(value: float) -> float:
    """Mean of a Python number over ranks."""
    if not context().enabled:
        return value
    return float(all_reduce_sum(torch.tensor([value], dtype=torch.float64))[0]) / context().world_size


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce and average the gradients of ``params`` in place (missing gradients count as zeros),
    in flat buckets of about 25 MB."""
    ctx = context()
    if not ctx.enabled:
        return
    grads = []
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket: list[torch.Tensor] = []
    size = 0
    for g in [*grads, None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= 25 << 20):
            flat = torch.cat([b.reshape(-1) for b in bucket]).to(_comm_device())
            dist.all_reduce(flat)
            flat /= ctx.world_size
            off = 0
            for b in bucket:
                b.copy_(flat[off : off + b.numel()].view_as(b).to(b.device))
                off += b.numel()
            bucket, size = [], 0


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if not context().enabled:
        return
    for t in module.state_dict().values():
        buf = t.detach().to(_comm_device())
        dist.broadcast(buf, 0)
        if buf.data_ptr() != t.data_ptr():
            t.copy_(buf.to(t.device))


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 with per-rank sizes; the backward sums the gradients of every rank."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        dev = _comm_device()
        sizes_t = torch.zeros(world, dtype=torch.long, device=dev)
        sizes_t[rank] = x.shape[0]
        dist.all_reduce(sizes_t)
        sizes = [int(s) for s in sizes_t.tolist()]
        top = max(sizes)
        padded = torch.zeros((top, *x.shape[1:]), dtype=x.dtype, device=dev)
        padded[: x.shape[0]] = x.detach().to(dev)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        ctx.lo, ctx.n, ctx.in_device = sum(sizes[:rank]), x.shape[0], x.device
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).to(x.device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = grad.contiguous().to(_comm_device(), copy=True)
        dist.all_reduce(g)
        return g[ctx.lo : ctx.lo + ctx.n].to(ctx.in_device)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x (n_r, ...)`` in rank order -> ``(sum n_r, ...)``, differentiably.

    When every rank computes the same loss on the gathered rows and the gradients are then averaged
    (:func:`average_gradients` or DDP), each parameter receives exactly the gradient of that loss.
    """
    if not context().enabled:
        return x
    return _GatherRows.apply(x)


def resolve_precision(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``: None (fp32) on the CPU and for ``fp32``;
    ``auto`` picks bf16 where the GPU supports it, else fp16."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Mixed precision on GPUs (``dtype`` from :func:`resolve_precision`); nothing when ``dtype`` is None."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
