"""Training runs that survive a kill: atomic per-epoch checkpoints, and the epoch loop that writes them.

Every epoch's randomness is derived from ``(seed, phase, epoch)``, and a checkpoint (weights, optimizer
state, progress) is written atomically after each epoch, so a killed run re-run with the same command
resumes where it stopped and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from geoswc.core import atomic_files, distributed, json_records, tensor_files
from geoswc.core.config import TrainConfig, canonical_json, digest
from geoswc.core.errors import ArtifactError, SettingError
from geoswc.core.progress import progress_bar

log = logging.getLogger(__name__)


TRAINING_SCHEME = 2
"""How training draws its batches and computes its losses (2: contrastive positives sampled on the fly). Bump it
with any change that would make a resumed run differ from a fresh one: a checkpoint of another scheme is not
resumed."""


def run_key(**parts: Any) -> str:
    """Identity of a training run (its settings, data and :data:`TRAINING_SCHEME`): a checkpoint resumes only the
    run it belongs to."""
    return digest(canonical_json({**parts, "scheme": TRAINING_SCHEME}))


def epoch_seed(seed: int, phase: str, epoch: int) -> int:
    """The seed of one epoch of one phase: an epoch's randomness never depends on the epochs before it."""
    return int(digest(f"{seed}/{phase}/{epoch}", length=8), 16)


def cosine_lr(base: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up to ``base`` over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


@dataclass
class Checkpointer:
    """Atomic per-epoch checkpoints of a training run's ``modules`` in ``folder`` (None disables them)."""

    folder: Path | None
    run_key: str
    modules: dict[str, nn.Module] = field(default_factory=dict)
    """What a checkpoint holds, by name (with the optimizer's state)."""
    state: dict[str, Any] = field(default_factory=dict)

    def resume(self) -> dict[str, Any]:
        """Load the last checkpoint into the modules; returns its progress record (empty if none)."""
        if self.folder is None or not (self.folder / "checkpoint.json").is_file():
            return {}
        try:
            meta = json_records.read_json(self.folder / "checkpoint.json", "training checkpoint")
        except ArtifactError as e:
            raise ArtifactError(f"{e}; or delete {self.folder} to start the training over") from e
        if meta.get("run_key") != self.run_key:
            raise ArtifactError(
                f"the checkpoint in {self.folder} belongs to a run with other data or settings; "
                "use another --out folder, or delete that checkpoint to start over"
            )
        name = str(meta.get("tensors_file", "checkpoint.safetensors"))
        if Path(name).name != name:
            raise ArtifactError(f"the checkpoint in {self.folder} names an odd tensors file {name!r}; delete it")
        try:
            t = tensor_files.load_tensors(self.folder / name, "training checkpoint", meta.get("tensors_sha256"))
        except ArtifactError as e:
            raise ArtifactError(f"{e}; or delete {self.folder} to start the training over") from e
        for name, mod in self.modules.items():
            prefix = f"{name}."
            mod.load_state_dict({k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)})
        self.state = meta
        self.state["optimizer_tensors"] = {k[4:]: v for k, v in t.items() if k.startswith("opt.")}
        log.info("resuming from checkpoint: phase %s, epoch %s", meta.get("phase"), meta.get("epoch"))
        return meta

    def save(self, optimizer: torch.optim.Optimizer | None, progress: dict[str, Any]) -> None:
        """Write the modules, the optimizer's state and ``progress`` (under torchrun: rank 0 only)."""
        if self.folder is None or not distributed.is_main():
            return
        tensors = {f"{n}.{k}": v.detach().cpu() for n, m in self.modules.items() for k, v in m.state_dict().items()}
        opt_meta: dict[str, Any] = {}
        if optimizer is not None:
            sd = optimizer.state_dict()
            for pid, st in sd["state"].items():
                for k, v in st.items():
                    tensors[f"opt.{pid}.{k}"] = torch.as_tensor(v).detach().cpu()
            opt_meta = {"param_groups": sd["param_groups"]}
        # A new file name per save: a kill between the two writes leaves checkpoint.json naming the previous
        # tensors, still there and intact, so the re-run resumes from it (one file would mismatch its digest).
        name = f"checkpoint-{progress.get('phase', 'x')}-{progress.get('epoch', 0)}.safetensors"
        sha = tensor_files.save_tensors(self.folder / name, tensors)
        atomic_files.write_json(
            self.folder / "checkpoint.json",
            {"run_key": self.run_key, "tensors_file": name, "tensors_sha256": sha, "optimizer": opt_meta, **progress},
        )
        for old in self.folder.glob("checkpoint*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def restore_optimizer(self, optimizer: torch.optim.Optimizer, phase: str) -> None:
        """Give ``optimizer`` the state the checkpoint saved, when it was saved inside ``phase``."""
        if self.state.get("phase") != phase or not self.state.get("optimizer"):
            return
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in self.state.get("optimizer_tensors", {}).items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": self.state["optimizer"]["param_groups"]})


@dataclass
class Phase:
    """One training phase: how its batches are drawn, the loss of a batch, and what it optimises.

    ``optimizer`` comes from :meth:`~geoswc.core.distributed.Engine.setup` (under torchrun its module is
    DDP-wrapped, so gradients are averaged during ``engine.backward``); ``end_of_epoch`` runs after each epoch,
    before its checkpoint is written.
    """

    name: str
    epochs: int
    steps_per_epoch: int
    batches: Callable[[np.random.Generator], Iterable[Any]]
    """The epoch's batches, drawn with the epoch's generator."""
    loss: Callable[[Any], torch.Tensor]
    optimizer: torch.optim.Optimizer
    base_lrs: Sequence[float]
    """Peak learning rate of each parameter group."""
    modules: Sequence[nn.Module]
    """What the phase trains (put in train mode during its epochs)."""
    engine: distributed.Engine
    end_of_epoch: Callable[[], None] | None = None


def run_phase(
    phase: Phase, ckpt: Checkpointer, seed: int, history: dict[str, list[float]], progress: bool = True
) -> None:
    """Train ``phase`` epoch by epoch from the checkpoint's progress, checkpointing after each epoch."""
    done = ckpt.state.get("phase_epochs", {}).get(phase.name, 0)
    if done >= phase.epochs:
        return
    if done:
        ckpt.restore_optimizer(phase.optimizer, phase.name)
    for epoch in range(done, phase.epochs):
        es = epoch_seed(seed, phase.name, epoch)
        torch.manual_seed(es)
        t0 = time.perf_counter()
        losses = _epoch(phase, epoch, np.random.default_rng(es), progress)
        seconds = time.perf_counter() - t0
        # Each rank's loss is scaled so that their mean is the loss of the global batch.
        mean = phase.engine.mean(float(np.mean(losses))) if losses else float("nan")
        if losses and not math.isfinite(mean):  # never save (or go on from) weights that hold NaN or inf
            raise SettingError(
                f"training diverged: the {phase.name} loss of epoch {epoch + 1} is {mean}; lower "
                "the learning rate or the weight decay",
                TrainConfig,
                "finetune_lr" if phase.name == "finetune" else "lr",
            )
        history.setdefault(phase.name, []).append(mean)
        log.info(
            "%s epoch %d/%d: loss %.4f (%d steps, %.1f s)",
            phase.name,
            epoch + 1,
            phase.epochs,
            mean,
            len(losses),
            seconds,
        )
        if phase.end_of_epoch is not None:
            phase.end_of_epoch()
        phase_epochs = dict(ckpt.state.get("phase_epochs", {}), **{phase.name: epoch + 1})
        ckpt.state["phase_epochs"] = phase_epochs
        ckpt.save(
            phase.optimizer, {"phase": phase.name, "epoch": epoch + 1, "phase_epochs": phase_epochs, "history": history}
        )
    for m in phase.modules:
        m.eval()


def _epoch(phase: Phase, epoch: int, rng: np.random.Generator, progress: bool) -> list[float]:
    """One epoch of optimisation steps; returns this rank's loss of each step."""
    for m in phase.modules:
        m.train()
    total = phase.epochs * phase.steps_per_epoch
    warmup = min(total // 10, 100)
    batches = phase.batches(rng)
    losses: list[float] = []
    steps = min(len(batches), phase.steps_per_epoch) if hasattr(batches, "__len__") else phase.steps_per_epoch
    bar = progress_bar(
        itertools.islice(batches, steps),
        desc=f"{phase.name} {epoch + 1}/{phase.epochs}",
        unit="batch",
        leave=False,
        total=steps,
        show=progress and distributed.is_main(),
    )
    for b_i, batch in enumerate(bar):
        for g, base in zip(phase.optimizer.param_groups, phase.base_lrs, strict=True):
            g["lr"] = cosine_lr(base, epoch * phase.steps_per_epoch + b_i, total, warmup)
        loss = phase.loss(batch)
        phase.optimizer.zero_grad(set_to_none=True)
        phase.engine.backward(loss)
        phase.optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
