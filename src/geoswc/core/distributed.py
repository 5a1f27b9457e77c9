"""The engine under every device, precision and data-parallel path: Lightning Fabric.

A plain command runs as one process on one device. Under ``torchrun`` (any number of nodes) each process
joins Fabric's DDP strategy (NCCL on GPUs, gloo on CPUs) on ``cuda:LOCAL_RANK`` or the CPU, and Fabric
synchronises the gradients during the backward pass. Mixed precision is Fabric's too (``--run.precision``:
``fp32`` -> ``32-true``, ``bf16`` -> ``bf16-mixed``, ``fp16`` -> ``16-mixed`` with its loss scaler).

Training keeps one *global* batch per step, the same on every rank; each rank computes its contiguous slice of
it (:func:`shard_range`) and the gradients are averaged, so a run gives the same model on any number of
processes (up to floating-point summation order). What stays here is only what SwC needs on top of Fabric:
the rank's slice, and a differentiable gather of rows of uneven counts for the contrastive loss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from geoswc.core.config import RunConfig
from geoswc.core.errors import SettingError

if TYPE_CHECKING:
    from lightning_fabric import Fabric

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_FABRIC_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def launched_by_torchrun() -> bool:
    """Whether this process is one of a launched group: ``torchrun`` (torch elastic), or any launcher that sets
    ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` as torchrun does."""
    if not dist.is_available():
        return False
    return dist.is_torchelastic_launched() or all(
        k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    )


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
            f"device {str(device)!r} is not a device ({e}); use auto, cpu or cuda[:N]", RunConfig, "device"
        ) from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingError(f"device {dev} is not available here (no CUDA GPU); use auto or cpu", RunConfig, "device")
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise SettingError(
            f"device {dev} is not available here ({torch.cuda.device_count()} GPUs)", RunConfig, "device"
        )
    if dev.type not in ("cpu", "cuda"):
        raise SettingError(f"device {dev} is not supported; use auto, cpu or cuda[:N]", RunConfig, "device")
    return dev


def fabric_precision(device: torch.device, precision: str = "auto") -> str:
    """Fabric's name for ``--run.precision`` on ``device``: ``auto`` is ``32-true`` on a CPU and ``bf16-mixed``
    on a GPU that has bf16 (else ``16-mixed``).

    Raises:
        SettingError: an unknown name, or fp16 on a CPU (PyTorch has no fp16 autocast there).
    """
    if precision not in PRECISIONS:
        raise SettingError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}", RunConfig, "precision"
        )
    if precision == "auto":
        if device.type != "cuda":
            return "32-true"
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if precision == "fp16" and device.type != "cuda":
        raise SettingError("precision fp16 needs a CUDA GPU; on a CPU use bf16 or fp32", RunConfig, "precision")
    return _FABRIC_PRECISION[precision]


class Engine:
    """This process's place in a run and the Fabric that drives it (rank 0 of 1 outside ``torchrun``)."""

    def __init__(self, fabric: Fabric, precision: str, local_rank: int = 0) -> None:
        self.fabric, self.local_rank = fabric, local_rank
        self.precision = precision
        """Fabric's precision setting (``32-true``, ``bf16-mixed``, ``16-mixed``)."""

    @property
    def rank(self) -> int:
        return int(self.fabric.global_rank)

    @property
    def world_size(self) -> int:
        return int(self.fabric.world_size)

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and shows progress."""
        return self.rank == 0

    def peak_memory_gib(self) -> float:
        """The most GPU memory this process's tensors held so far, in GiB (0 on a CPU)."""
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0

    def setup(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """``module`` on this engine's device under its precision (DDP-wrapped under torchrun) and its
        optimizer (its step scales fp16 losses). Call the returned module; its parameters are ``module``'s."""
        return self.fabric.setup(module, optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass (gradients averaged over ranks as they are computed; fp16 losses scaled)."""
        self.fabric.backward(loss)

    def autocast(self) -> AbstractContextManager[Any]:
        """The precision's autocast, for forward passes outside :meth:`setup` (feature extraction)."""
        return self.fabric.autocast()

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            self.fabric.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks (``t`` itself in a single process)."""
        return self.fabric.all_reduce(t, reduce_op="sum") if self.enabled else t

    def mean(self, value: float) -> float:
        """Mean of a Python number over ranks."""
        if not self.enabled:
            return value
        return float(self.fabric.all_reduce(torch.tensor([value], dtype=torch.float64), reduce_op="mean")[0])

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x (n_r, ...)`` in rank order -> ``(sum n_r, ...)``, differentiably (counts may differ).

        When every rank computes the same loss on the gathered rows and the gradients are averaged (DDP), each
        parameter receives exactly the gradient of that loss.
        """
        if not self.enabled:
            return x
        counts = [int(c) for c in self.fabric.all_gather(torch.tensor(x.shape[0], device=x.device)).tolist()]
        top = max(counts)
        padded = torch.cat([x, x.new_zeros((top - x.shape[0], *x.shape[1:]))]) if x.shape[0] < top else x
        with warnings.catch_warnings():  # Fabric's gather with gradients calls torch.distributed.nn's all_gather
            warnings.filterwarnings("ignore", category=FutureWarning, module="lightning_fabric")
            parts = self.fabric.all_gather(padded, sync_grads=True)
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def _create(device: str, precision: str, timeout_s: float) -> Engine:
    """A Fabric for ``device`` and ``precision``: one device, or DDP over torchrun's processes (launched)."""
    from lightning_fabric import Fabric  # import-time cost (1 s): only extracting and training load Lightning
    from lightning_fabric.plugins.environments import TorchElasticEnvironment  # (the same)
    from lightning_fabric.strategies import DDPStrategy  # (the same)

    elastic = launched_by_torchrun()
    world = int(os.environ.get("WORLD_SIZE", "1")) if elastic else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if elastic else 0
    if elastic and str(device).startswith("cuda:"):
        raise SettingError(
            f"under torchrun each process drives cuda:LOCAL_RANK; use --run.device cuda or auto, not {device}",
            RunConfig,
            "device",
        )
    dev = resolve_device(device, local_rank)
    fabric_prec = fabric_precision(dev, precision)
    if elastic:  # DDP on any number of processes, one included (its process group is the one torchrun's run uses)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        os.environ.setdefault("LOCAL_RANK", "0")  # (what TorchElasticEnvironment reads; torchrun sets it)
        strategy: Any = DDPStrategy(cluster_environment=TorchElasticEnvironment(), timeout=timedelta(seconds=timeout_s))
        devices: Any = local_world
        nodes = world // local_world
    else:
        strategy, devices, nodes = "auto", [dev.index] if dev.type == "cuda" else 1, 1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Lightning.*", category=UserWarning)
        fabric = Fabric(
            accelerator=dev.type, devices=devices, num_nodes=nodes, strategy=strategy, precision=fabric_prec
        )
        fabric.launch()
    return Engine(fabric, fabric_prec, local_rank)


_current: Engine | None = None
_made: dict[tuple[str, str], Engine] = {}
"""Single-process engines made for the Python API, by ``(device, precision)``."""


def start(device: str = "auto", precision: str = "auto", timeout_s: float = 3600.0) -> Engine:
    """Make this process's engine for a command (under torchrun: join the process group) and log it once.

    Args:
        device: ``auto`` (``cuda:LOCAL_RANK`` if present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (see :func:`fabric_precision`).
        timeout_s: how long collectives wait for the slowest rank (feature extraction can be uneven).

    Raises:
        SettingError: a device this machine lacks, or a precision it cannot run.
    """
    global _current
    if _current is not None:
        return _current
    _current = _create(device, precision, timeout_s)
    e = _current
    if e.is_main:
        backend = f", {dist.get_backend()}" if e.enabled else ""
        log.info(
            "Lightning Fabric %s: %d process(es) on %s%s, precision %s",
            type(e.fabric.strategy).__name__,
            e.world_size,
            e.device.type,
            backend,
            e.precision,
        )
    return e


def engine() -> Engine:
    """The engine :func:`start` made; without one, a single-process engine on the CPU in fp32."""
    return _current if _current is not None else engine_for("cpu", "fp32")


def engine_for(device: str = "auto", precision: str = "auto") -> Engine:
    """The started engine (a command's), else a single-process one for ``device`` and ``precision`` (the
    Python API's; under torchrun it is started)."""
    if _current is not None:
        return _current
    if launched_by_torchrun():
        return start(device, precision)
    key = (str(device), precision)
    if key not in _made:
        _made[key] = _create(*key, 3600.0)
    return _made[key]


def stop() -> None:
    """Leave the process group (if any) and forget the started engine."""
    global _current
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _current = None


def rank() -> int:
    """This process's rank in the started engine (0 without one); cheap: no Fabric is made."""
    return _current.rank if _current is not None else 0


def world_size() -> int:
    """Processes in the started engine (1 without one); cheap: no Fabric is made."""
    return _current.world_size if _current is not None else 1


def barrier() -> None:
    """Wait for every rank of the started engine (nothing without one)."""
    if _current is not None:
        _current.barrier()


def autocast() -> AbstractContextManager[Any]:
    """The started engine's autocast (nothing without one): for inference outside :meth:`Engine.setup`."""
    return _current.autocast() if _current is not None else contextlib.nullcontext()


def is_main() -> bool:
    """Rank 0: the only process that writes files and shows progress."""
    return rank() == 0


def shard_range(n: int, eng: Engine | None = None) -> tuple[int, int]:
    """This rank's contiguous slice ``[lo, hi)`` of ``n`` items (sizes differ by at most one)."""
    r, world = (eng.rank, eng.world_size) if eng is not None else (rank(), world_size())
    base, extra = divmod(n, world)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)
