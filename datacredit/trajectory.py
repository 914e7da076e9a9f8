"""Checkpoints of a training run with the learning rate in force and the step count (what TracIn and SOURCE need).

Record in any loop with two added lines::

    recorder = TrajectoryRecorder(model, "runs/traj", optimizer=opt, every=100)   # or at_steps=[...]
    start = recorder.resume()            # 0 on a fresh directory; else reloads the last checkpoint, continues its count
    for step in range(start, total_steps):
        ...; opt.step()
        recorder.step()                  # after optimizer.step(), before scheduler.step()
    recorder.save()                      # the final state, if it is not on the schedule

and read back with ``traj = Trajectory.load("runs/traj")``; ``traj.load_into(model, k)`` loads checkpoint ``k``.

Interval semantics. Checkpoint ``k`` closes the interval of optimizer steps since checkpoint ``k − 1`` (or since the
start of recording). It carries ``steps`` (how many), ``lr`` (the learning rate of ``param_groups[0]`` in force at the
last step of the interval), ``lr_sum`` (the learning rates of all the interval's steps summed: ``lr · steps`` under a
constant rate, the exact integral under a schedule) and ``momentum`` (SGD's ``momentum`` if the optimizer has one).
SOURCE's segments are runs of consecutive checkpoints (:meth:`Trajectory.segments`); each segment's ``K_ℓ`` and ``η_ℓ``
come from these fields.

On disk a trajectory is a :class:`~datacredit.store.Store`: every checkpoint is ``checkpoint-<step>.safetensors``
(``model.state_dict()``, written atomically) with its fields in the manifest entry's ``meta``; the optimizer state
(momentum buffers, Adam moments) of the latest checkpoint is kept beside it so a killed run resumes exactly.
A checkpoint exists once its manifest entry is written, so a crash never leaves a half-written one behind.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .digests import config_digest
from .errors import DataError, StoreError
from .store import Store

__all__ = ["Checkpoint", "Trajectory", "TrajectoryRecorder"]

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint-"
OPTIMIZER = "optimizer-"
_HYPER = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "betas", "eps", "alpha")


@dataclass(frozen=True)
class Checkpoint:
    """One saved model state and the interval of training that ends at it.

    step: optimizer steps taken when it was saved (0 = before training).
    steps: optimizer steps since the previous checkpoint (for the first one: since recording started).
    lr: learning rate of ``param_groups[0]`` in force at the interval's last step; None if unknown.
    lr_sum: sum of the learning rates of the interval's steps (``lr · steps`` for a constant rate); None if unknown.
    momentum: SGD momentum in force (None if the optimizer has none or is unknown).
    epoch: the epoch the caller reported (or ``step / steps_per_epoch``), None if not given.
    stage: a label for multi-stage pipelines (``"pretrain"``, ``"finetune"``).
    hyper: the scalar settings of ``param_groups[0]`` (lr, momentum, weight_decay, betas, ...).
    name: its artefact name in the store (None for a trajectory held in memory).
    digest: sha256 of the saved weights (None in memory: see :meth:`Trajectory.digest`).
    """

    step: int
    steps: int
    lr: float | None = None
    lr_sum: float | None = None
    momentum: float | None = None
    epoch: float | None = None
    stage: str = "train"
    hyper: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    digest: str | None = None

    def meta(self) -> dict[str, Any]:
        return {"step": self.step, "steps": self.steps, "lr": self.lr, "lr_sum": self.lr_sum,
                "momentum": self.momentum, "epoch": self.epoch, "stage": self.stage, "hyper": self.hyper}


def _state_of(obj: Mapping[str, Tensor] | nn.Module) -> dict[str, Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return dict(obj)
    raise DataError(f"expected a state_dict (dict of tensors) or an nn.Module, got {type(obj).__name__}")


def state_digest(state: Mapping[str, Tensor]) -> str:
    """sha256 of weights by value (names, dtypes, shapes and bytes; :func:`~datacredit.digests.config_digest`), for
    cache metadata. Cheap statistics (sums, norms) are not enough: a permutation of rows keeps them. Cost: one read."""
    return config_digest(dict(state))  # hash_tree orders the keys


class Trajectory:
    """An ordered list of :class:`Checkpoint` s with their weights, on disk (:meth:`load`) or in memory
    (:meth:`from_states`). Index it like a list; ``len(traj)`` checkpoints, oldest first."""

    def __init__(self, checkpoints: Sequence[Checkpoint], read: Callable[[int], dict[str, Tensor]],
                 store: Store | None = None):
        self.checkpoints = list(checkpoints)
        self._read = read  # position in self.checkpoints -> state dict
        self.store = store

    # -- construction --------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str] | Store) -> Trajectory:
        """The checkpoints recorded in ``path`` (a directory written by :class:`TrajectoryRecorder`), by step."""
        store = path if isinstance(path, Store) else Store(path, create=False)
        entries = store._read_manifest()  # one read for all checkpoints (store.info would re-read it per name)
        found = [_checkpoint(entry.get("meta", {}), name, entry.get("sha256"))
                 for name, entry in sorted(entries.items()) if name.startswith(CHECKPOINT)]
        if not found:
            raise StoreError(f"{store.root}: no checkpoints recorded there")
        found.sort(key=lambda c: c.step)
        return cls(found, lambda k: store.load_tensors(found[k].name), store)

    @classmethod
    def from_states(cls, states: Sequence[Mapping[str, Tensor] | nn.Module], lrs: Sequence[float] | None = None,
                    steps: Sequence[int] | None = None) -> Trajectory:
        """A trajectory held in memory: state dicts (or models, whose live weights are read) with optional
        learning rates ``(C,)`` and interval lengths ``(C,)`` (default 1 each)."""
        states = list(states)
        if not states:
            raise DataError("a trajectory needs at least one checkpoint")
        for what, seq in (("lrs", lrs), ("steps", steps)):
            if seq is not None and len(seq) != len(states):
                raise DataError(f"{len(seq)} {what} for {len(states)} checkpoints")
        dicts = [_state_of(s) for s in states]
        counts = [1] * len(states) if steps is None else [int(s) for s in steps]
        checkpoints, total = [], 0
        for k, n in enumerate(counts):
            total += n
            lr = None if lrs is None else float(lrs[k])
            checkpoints.append(Checkpoint(step=total, steps=n, lr=lr, lr_sum=None if lr is None else lr * n))
        return cls(checkpoints, lambda k: dicts[k])

    # -- access ----------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.checkpoints)

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self.checkpoints)

    def __getitem__(self, k: int) -> Checkpoint:
        return self.checkpoints[self._index(k)]

    def __repr__(self) -> str:
        return f"Trajectory({len(self)} checkpoints at steps {[c.step for c in self.checkpoints]})"

    def _index(self, k: int) -> int:
        n = len(self.checkpoints)
        if not -n <= k < n:
            raise DataError(f"checkpoint index {k} out of range for a trajectory of {n}")
        return k % n

    @property
    def steps(self) -> np.ndarray:
        """Step of each checkpoint, ``(C,)`` int64."""
        return np.array([c.step for c in self.checkpoints], dtype=np.int64)

    @property
    def lrs(self) -> np.ndarray:
        """Learning rate in force for each checkpoint's interval, ``(C,)`` float64 (NaN where unknown)."""
        return np.array([np.nan if c.lr is None else c.lr for c in self.checkpoints], dtype=np.float64)

    def state_dict(self, k: int) -> dict[str, Tensor]:
        """The weights of checkpoint ``k`` (on CPU when read from disk)."""
        return self._read(self._index(k))

    def load_into(self, model: nn.Module, k: int = -1, strict: bool = True) -> nn.Module:
        """Copy checkpoint ``k``'s weights into ``model`` (in place, as ``load_state_dict``); returns ``model``."""
        model.load_state_dict(self.state_dict(k), strict=strict)
        return model

    def digest(self, k: int) -> str:
        """A fingerprint of checkpoint ``k``'s weights (the file's sha256 when on disk)."""
        c = self.checkpoints[self._index(k)]
        return c.digest or state_digest(self.state_dict(k))

    def select(self, indices: Sequence[int]) -> Trajectory:
        """The trajectory restricted to checkpoints ``indices`` (in that order); intervals are not merged."""
        picked = [self._index(int(k)) for k in indices]
        if not picked:
            raise DataError("select needs at least one checkpoint index")
        return Trajectory([self.checkpoints[k] for k in picked], lambda j: self._read(picked[j]), self.store)

    def segments(self, n: int) -> list[Trajectory]:
        """``n`` runs of consecutive checkpoints, as equal in count as possible (SOURCE's segments)."""
        if not 1 <= n <= len(self):
            raise DataError(f"cannot split {len(self)} checkpoints into {n} segments")
        return [self.select(part.tolist()) for part in np.array_split(np.arange(len(self)), n)]

    def load_optimizer(self, optimizer: torch.optim.Optimizer, k: int = -1) -> torch.optim.Optimizer:
        """Restore the optimizer state saved with checkpoint ``k`` (only the latest is kept by default)."""
        c = self.checkpoints[self._index(k)]
        name = OPTIMIZER + c.name[len(CHECKPOINT):] if c.name else None
        if self.store is None or name is None or not self.store.has(name):
            raise StoreError(f"no optimizer state saved with the checkpoint at step {c.step}")
        meta = self.store.info(name)["meta"]
        state: dict[int, dict[str, Any]] = {}
        for key, t in self.store.load_tensors(name).items():
            pid, attr = key.split(".", 1)
            state.setdefault(int(pid), {})[attr] = t
        for key, value in meta["scalars"].items():
            pid, attr = key.split(".", 1)
            state.setdefault(int(pid), {})[attr] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        return optimizer


def _checkpoint(meta: dict[str, Any], name: str, digest: str | None) -> Checkpoint:
    try:
        return Checkpoint(step=int(meta["step"]), steps=int(meta["steps"]), lr=meta.get("lr"),
                          lr_sum=meta.get("lr_sum"), momentum=meta.get("momentum"), epoch=meta.get("epoch"),
                          stage=meta.get("stage", "train"), hyper=meta.get("hyper", {}), name=name, digest=digest)
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"checkpoint {name!r}: malformed metadata {meta!r}") from exc


def _scalar(value: Any) -> Any:
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_scalar(v) for v in value]
    return value if isinstance(value, (int, float, bool, str)) or value is None else repr(value)


class TrajectoryRecorder:
    """Training-loop callback that checkpoints ``model`` into ``out_dir`` (see module doc).

    optimizer: read for the learning rate and momentum (``param_groups[0]``) and saved for exact resumption.
    every / at_steps: checkpoint when the step count is a multiple of ``every``, or is in ``at_steps`` (0 in
        ``at_steps`` saves the initial weights at construction). With neither, only :meth:`save` checkpoints.
    lr: the learning rate when there is no optimizer: a number or a function of the step count.
    steps_per_epoch: derive ``epoch = step / steps_per_epoch`` when :meth:`step` is not told the epoch.
    stage: label stored with each checkpoint (multi-stage pipelines).
    keep_optimizer: ``"last"`` (default) keeps the optimizer state of the latest checkpoint only, ``"all"`` every
        one, ``"none"`` none.
    overwrite: delete the checkpoints already in ``out_dir`` instead of continuing after them.

    Reopening a directory that holds checkpoints continues after the last one: the step count restarts from its
    step. Call :meth:`resume` to load its weights (and optimizer state) back into ``model`` / ``optimizer``.
    One process writes a directory at a time: under DDP, record on rank 0 only.
    """

    def __init__(self, model: nn.Module, out_dir: str | os.PathLike[str], *,
                 optimizer: torch.optim.Optimizer | None = None, every: int | None = None,
                 at_steps: Sequence[int] | None = None, lr: float | Callable[[int], float] | None = None,
                 steps_per_epoch: int | None = None, stage: str = "train", keep_optimizer: str = "last",
                 overwrite: bool = False):
        if every is not None and at_steps is not None:
            raise ValueError("give either every=K or at_steps=[...], not both")
        if every is not None and every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        if at_steps is not None and any(int(s) < 0 for s in at_steps):
            raise ValueError(f"at_steps must be non-negative step counts, got {list(at_steps)}")
        if keep_optimizer not in ("last", "all", "none"):
            raise ValueError(f"keep_optimizer must be 'last', 'all' or 'none', got {keep_optimizer!r}")
        if optimizer is not None and lr is not None:
            raise ValueError("give the learning rate through optimizer= or lr=, not both")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        self.model, self.optimizer, self.every, self.lr = model, optimizer, every, lr
        self.at_steps = None if at_steps is None else {int(s) for s in at_steps}
        self.steps_per_epoch, self.stage, self.keep_optimizer = steps_per_epoch, stage, keep_optimizer
        self.store = Store(out_dir)
        if overwrite:
            for name in self.store.names():
                if name.startswith((CHECKPOINT, OPTIMIZER)):
                    self.store.remove(name)
        last = self._last_checkpoint = self._last()
        self.global_step = 0 if last is None else last.step
        self._interval_steps, self._interval_lr_sum = 0, 0.0
        self._last_lr: float | None = None
        if last is not None:
            logger.info("%s: continuing after the checkpoint at step %d", self.store.root, last.step)
        elif self.at_steps is not None and 0 in self.at_steps:
            self.save()

    # -- state ------------------------------------------------------------------------------------------------------
    def _last(self) -> Checkpoint | None:
        """The latest checkpoint on disk (read at construction; the recorder keeps track of it afterwards)."""
        if not any(n.startswith(CHECKPOINT) for n in self.store.names()):
            return None
        return Trajectory.load(self.store)[-1]

    def trajectory(self) -> Trajectory:
        """What has been recorded so far."""
        return Trajectory.load(self.store)

    def resume(self) -> int:
        """Load the last checkpoint's weights (and saved optimizer state) into the model (and optimizer); return
        the step count to continue from (0, touching nothing, when nothing is recorded yet)."""
        last = self._last_checkpoint = self._last()
        if last is None:
            return 0
        traj = Trajectory.load(self.store)
        traj.load_into(self.model, -1)
        if self.optimizer is not None and self.store.has(OPTIMIZER + last.name[len(CHECKPOINT):]):
            traj.load_optimizer(self.optimizer, -1)
        self.global_step = last.step
        self._interval_steps, self._interval_lr_sum = 0, 0.0
        return last.step

    def _current_lr(self) -> float | None:
        if self.optimizer is not None:
            return float(self.optimizer.param_groups[0]["lr"])
        if callable(self.lr):
            return float(self.lr(self.global_step))
        return None if self.lr is None else float(self.lr)

    def _due(self) -> bool:
        if self.every is not None:
            return self.global_step % self.every == 0
        return self.at_steps is not None and self.global_step in self.at_steps

    # -- the callback -----------------------------------------------------------------------------------------------
    def step(self, epoch: float | None = None) -> Checkpoint | None:
        """Count one optimizer step (call it right after ``optimizer.step()``); checkpoint if one is due."""
        lr = self._current_lr()  # read before counting: a function of the step sees the step just taken
        self.global_step += 1
        self._interval_steps += 1
        self._interval_lr_sum = None if lr is None or self._interval_lr_sum is None else self._interval_lr_sum + lr
        self._last_lr = lr
        return self.save(epoch) if self._due() else None

    def save(self, epoch: float | None = None) -> Checkpoint:
        """Checkpoint the model now (a no-op returning the existing one if this step is already saved)."""
        name = f"{CHECKPOINT}{self.global_step:09d}"
        last = self._last_checkpoint
        if last is not None and last.step == self.global_step:
            return last
        if last is not None and last.step > self.global_step:
            raise StoreError(f"{self.store.root}: a checkpoint at step {last.step} exists after step "
                             f"{self.global_step}; call resume() or pass overwrite=True")
        group = self.optimizer.param_groups[0] if self.optimizer is not None else {}
        lr = self._last_lr if self._interval_steps else self._current_lr()
        if epoch is None and self.steps_per_epoch is not None:
            epoch = self.global_step / self.steps_per_epoch
        momentum = group.get("momentum")
        checkpoint = Checkpoint(
            step=self.global_step, steps=self._interval_steps, lr=lr,
            lr_sum=self._interval_lr_sum if self._interval_steps else (0.0 if lr is not None else None),
            momentum=None if momentum is None else float(momentum), epoch=epoch, stage=self.stage,
            hyper={k: _scalar(group[k]) for k in _HYPER if k in group}, name=name)
        if self.optimizer is not None and self.keep_optimizer != "none":
            self._save_optimizer(OPTIMIZER + name[len(CHECKPOINT):])
        state = {k: v.detach() for k, v in self.model.state_dict().items()}
        self.store.save_tensors(name, state, meta=checkpoint.meta())
        if self.keep_optimizer == "last" and last is not None:
            old = OPTIMIZER + last.name[len(CHECKPOINT):]
            if self.store.has(old):
                self.store.remove(old)
        self._interval_steps, self._interval_lr_sum = 0, 0.0
        self._last_checkpoint = replace(checkpoint, digest=self.store.info(name)["sha256"])
        return self._last_checkpoint

    def _save_optimizer(self, name: str) -> None:
        sd = self.optimizer.state_dict()
        tensors, scalars = {}, {}
        for pid, entries in sd["state"].items():
            for key, value in entries.items():
                if isinstance(value, Tensor):
                    tensors[f"{pid}.{key}"] = value
                else:
                    scalars[f"{pid}.{key}"] = _scalar(value)
        groups = [{k: _scalar(v) for k, v in g.items()} for g in sd["param_groups"]]
        self.store.save_tensors(name, tensors, meta={"param_groups": groups, "scalars": scalars})
