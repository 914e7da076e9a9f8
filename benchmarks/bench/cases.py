"""Benchmark cases: fixed data, recipe, query set, the model under attribution and its cached ground truth.

=============  ===============================================================  ====================================
case           data and model                                                   queries
=============  ===============================================================  ====================================
``digits-lr``  sklearn digits (1,438 train), logistic regression ``mlp(64, [], 10)``,  50 test images (seeded choice)
               SGD + momentum, 30 epochs (``ClassifierRecipe(64, 10)``)
``fmnist-mlp`` Fashion-MNIST, 5,000 train images (seeded subset), MLP 784-64-10,  50 test images (seeded subset)
               20 epochs (``ClassifierRecipe(784, 10, (64,), epochs=20)``)
``text-gpt``   the bundled text sample in 32-character chunks, the first 1,000  the last 50 chunks (held out;
               chunks; TinyGPT d=32, 2 layers, 2 heads, untied, Adam, 8 epochs  chunks 1,000–1,189 are unused)
               (:class:`~datacredit.evaluate.LMRecipe`)
=============  ===============================================================  ====================================

On disk, under ``root/<case>/`` (default root ``runs/bench``)::

    model/        the model under attribution (safetensors, trained once with seed MODEL_SEED; meta = recipe, seed,
                  data fingerprint and the training time)
    trajectory/   its checkpoints (10, evenly spaced; the last is the final model) for TracIn
    gt/           the ground truth (``datacredit groundtruth --case NAME``), gt-quick/ the ``--quick`` one
    mislabel/     model and trajectory trained on the training set with 10 % of labels flipped (classification)

The text-gpt model is untied (``tied=False``) so that every peer sees the same parameters as we do (kronfluence
tracks only Linear modules, and a tied embedding would be half-seen by it).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from datacredit.data import CharDataset, flip_labels, load_digits, load_fashion_mnist, load_text_sample
from datacredit.errors import DataError, StoreError
from datacredit.evaluate import (
    ClassifierRecipe,
    Execution,
    GroundTruth,
    LMRecipe,
    SubsetConfig,
    build_groundtruth,
    load_groundtruth,
)
from datacredit.evaluate.jobstore import fingerprint
from datacredit.evaluate.recipes import recipe_config
from datacredit.store import Store
from datacredit.task import ClassificationTask, LanguageModelingTask, Task
from datacredit.training import TrajectoryCallback

__all__ = ["CASES", "GT_CONFIG", "GT_EXECUTION", "QUICK_GT", "Case", "CaseSpec", "MODEL_SEED", "load_case"]

logger = logging.getLogger(__name__)

MODEL_SEED = 0
N_QUERIES = 50
N_CHECKPOINTS = 10
FLIP_FRACTION = 0.1
GT_CONFIG = SubsetConfig(m=100, alpha=0.5, seeds=2)  # a case's ground truth unless told otherwise
QUICK_GT = SubsetConfig(m=8, alpha=0.5, seeds=1)  # bench --quick
GT_EXECUTION = Execution(workers=2)


@dataclass(frozen=True)
class CaseSpec:
    """How to build a case: ``data() -> (train, queries, recipe)``; ``task()`` is the attribution Task
    (measurement = the query loss); ``num_classes`` is None for language modelling."""

    name: str
    description: str
    data: Callable[[], tuple[Dataset, Dataset, Any]]
    task: Callable[[], Task]
    num_classes: int | None
    trak_dim: int = 1024
    groundtruth: SubsetConfig = GT_CONFIG

    @property
    def classification(self) -> bool:
        return self.num_classes is not None


def _seeded_queries(test: Dataset, n: int, seed: int = 0) -> Dataset:
    return test.subset(np.sort(np.random.default_rng(seed).choice(len(test), n, replace=False)))


def _digits() -> tuple[Dataset, Dataset, Any]:
    train, test = load_digits(seed=0)
    return train, _seeded_queries(test, N_QUERIES), ClassifierRecipe(64, 10, ())


def _fmnist() -> tuple[Dataset, Dataset, Any]:
    try:
        train = load_fashion_mnist(split="train", limit=5000, seed=0)
        queries = load_fashion_mnist(split="test", limit=N_QUERIES, seed=0)
    except DataError as exc:
        raise DataError(f"case fmnist-mlp needs Fashion-MNIST: apt-get install dataset-fashion-mnist ({exc})") from exc
    return train, queries, ClassifierRecipe(784, 10, (64,), epochs=20)


def _text() -> tuple[Dataset, Dataset, Any]:
    chunks = CharDataset(load_text_sample(), seq_len=32)
    train = chunks.subset(np.arange(1000))
    queries = chunks.subset(np.arange(len(chunks) - N_QUERIES, len(chunks)))
    return train, queries, LMRecipe(chunks.vocab_size, 32)


CASES: dict[str, CaseSpec] = {spec.name: spec for spec in (
    CaseSpec("digits-lr", "logistic regression on sklearn digits (1,438 train images, 650 parameters)", _digits,
             ClassificationTask, 10, trak_dim=512),
    CaseSpec("fmnist-mlp", "MLP 784-64-10 on 5,000 Fashion-MNIST images (50,890 parameters)", _fmnist,
             ClassificationTask, 10),
    CaseSpec("text-gpt", "TinyGPT (d=32, 2 layers) on 1,000 32-character chunks of the text sample", _text,
             LanguageModelingTask, None),
)}


class Case:
    """One benchmark case, materialised: ``train``, ``queries``, ``recipe``, ``task()``, and (trained or loaded on
    first use) the model under attribution, its trajectory and ground truth. See the module doc for the layout."""

    def __init__(self, spec: CaseSpec, root: str | Path = "runs/bench"):
        self.spec, self.name = spec, spec.name
        self.root = Path(root)
        self.dir = self.root / spec.name
        self.train, self.queries, self.recipe = spec.data()
        self._states: dict[str, dict] = {}

    def __repr__(self) -> str:
        return f"Case({self.name!r}, n_train={len(self.train)}, n_query={len(self.queries)}, dir={str(self.dir)!r})"

    def task(self) -> Task:
        return self.spec.task()

    @property
    def trajectory_dir(self) -> Path:
        return self.dir / "trajectory"

    # -- the model under attribution ---------------------------------------------------------------------------------
    def model(self) -> nn.Module:
        """A fresh copy of the model under attribution (trained once with MODEL_SEED, then loaded from disk)."""
        return self._cached("model", self.train, self.trajectory_dir)

    def train_seconds(self) -> float:
        """Wall time of the training run that produced :meth:`model` (with checkpointing), as recorded."""
        self.model()
        return float(self._states["model"]["meta"]["seconds"])

    def mislabelled(self) -> tuple[Dataset, np.ndarray, nn.Module, Path]:
        """``(train with 10 % flipped labels, flipped ids, model trained on it, its trajectory dir)``."""
        if not self.spec.classification:
            raise DataError(f"case {self.name} is not a classification case: no labels to flip")
        flipped, ids = flip_labels(self.train, FLIP_FRACTION, seed=MODEL_SEED, num_classes=self.spec.num_classes)
        traj = self.dir / "mislabel" / "trajectory"
        return flipped, ids, self._cached("mislabel", flipped, traj), traj

    def _cached(self, name: str, train: Dataset, traj: Path) -> nn.Module:
        store = Store(self.dir / ("model" if name == "model" else name))
        meta = {"recipe": recipe_config(self.recipe), "seed": MODEL_SEED, "train_sha256": fingerprint(train),
                "checkpoints": N_CHECKPOINTS}
        if name not in self._states:
            state = None
            if store.has("model") and traj.exists():
                info = store.info("model")["meta"]
                if {k: v for k, v in info.items() if k != "seconds"} == meta:
                    state = {"tensors": store.load_tensors("model"), "meta": info}
            if state is None:
                logger.info("%s: training the %s (seed %d)", self.name, name, MODEL_SEED)
                start = time.perf_counter()
                model = self.recipe.train(train, MODEL_SEED, callbacks=[TrajectoryCallback(str(traj), N_CHECKPOINTS)])
                meta = {**meta, "seconds": time.perf_counter() - start}
                tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
                store.save_tensors("model", tensors, meta=meta)
                state = {"tensors": tensors, "meta": meta}
            self._states[name] = state
        model = self.recipe.build()
        model.load_state_dict(self._states[name]["tensors"])
        return model.eval()

    # -- ground truth ------------------------------------------------------------------------------------------------
    def gt_dir(self, quick: bool = False) -> Path:
        return self.dir / ("gt-quick" if quick else "gt")

    def build_groundtruth(self, out: str | Path | None = None, config: SubsetConfig | None = None, *,
                          execution: Execution | None = None) -> GroundTruth:
        """``build_groundtruth`` of the case's recipe and data with ``config`` (default: the case's, m=100, α=0.5,
        seeds=2) and ``execution`` (default: 2 worker processes); resumes an interrupted build in ``out``."""
        out = self.gt_dir() if out is None else Path(out)
        return build_groundtruth(self.recipe, self.train, self.queries, out, config or self.spec.groundtruth,
                                 execution=execution or GT_EXECUTION)

    def groundtruth(self, *, quick: bool = False, build: bool = True, progress: bool = True) -> GroundTruth:
        """The cached ground truth (``--quick``: the tiny one, m=8, one seed); built first if missing and ``build``."""
        out = self.gt_dir(quick)
        try:
            return load_groundtruth(out)
        except StoreError:
            if not build:
                raise
        logger.info("%s: building the %sground truth in %s", self.name, "quick " if quick else "", out)
        execution = dataclasses.replace(GT_EXECUTION, workers=1 if quick else GT_EXECUTION.workers, progress=progress)
        return self.build_groundtruth(out, QUICK_GT if quick else None, execution=execution)


def load_case(name: str, root: str | Path = "runs/bench") -> Case:
    """The case called ``name`` (one of :data:`CASES`) with its files under ``root/name``."""
    if name not in CASES:
        raise DataError(f"unknown benchmark case {name!r}; choose one of {sorted(CASES)}")
    return Case(CASES[name], root)
