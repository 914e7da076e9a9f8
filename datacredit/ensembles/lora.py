"""LoRA ensemble (Deng et al. 2024): one base model, K short LoRA fine-tunes (peft) from K seeds; each member's
method sees only the LoRA parameters.

Member ``j`` (seed ``seed + j``): a copy of the base with peft's ``LoraConfig(r=rank, lora_alpha=alpha,
target_modules=…)`` injected by ``get_peft_model``, then fine-tuned by ``train_fn(peft_model, seed + j)`` or the
default loop (:func:`finetune_classifier`: SGD + momentum on the adapters, cross-entropy, batch order from the seed).
Both run under ``torch.manual_seed(seed + j)`` in a forked RNG, so the adapter initialisation and any dropout during
fine-tuning come from the member's seed, and the caller's global RNG is untouched.

Gradients. peft freezes the base, so the only trainable parameters are the adapters' ``lora_A`` / ``lora_B``, plain
``nn.Linear`` modules the capture engine's Linear rule handles (peft's LoRA wrapper layer owns no trainable parameter
itself). The method is built on the peft model's inner model (``get_base_model()``, the user's module tree with LoRA
layers injected), so ``Task.tracked_modules`` paths of the base model still resolve (a path of a wrapped layer tracks
its adapters).

Storage. The base weights are copied once, frozen, and shared by the K members' modules; a member stores only its
adapters (:meth:`LoRAEnsemble.adapter_state_dict`), which is what ``stored_bytes`` counts (plus cached features).
The user's base model is never modified.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from ..methods.base import configure
from ..training import train_classifier
from .base import Ensemble, MethodFactory, check_k, config_settings, timed, weight_bytes


def linear_paths(model: nn.Module) -> list[str]:
    """Paths of every ``nn.Linear`` in ``model`` (the default LoRA targets)."""
    return [path for path, m in model.named_modules() if isinstance(m, nn.Linear) and path]


def finetune_classifier(model: nn.Module, data: Dataset | DataLoader, seed: int, *, epochs: int = 3,
                        lr: float = 0.05, batch_size: int = 64, momentum: float = 0.9) -> nn.Module:
    """The default member fine-tune: :func:`datacredit.training.train_classifier` (SGD + momentum on ``model``'s
    trainable parameters, mean cross-entropy of ``model(x)`` or its ``.logits``, batch order from ``seed``)."""
    return train_classifier(model, data, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum, seed=seed)


@dataclass(frozen=True)
class LoRAConfig:
    """k: members. rank, alpha (None: ``rank``, a scaling of 1), target_modules (None: every ``nn.Linear``; a tuple),
    lora_dropout: peft's ``LoraConfig``. seed: member j uses ``seed + j``. epochs, lr, batch_size, momentum: the
    default fine-tune (:func:`finetune_classifier`; unused with a ``train_fn``)."""

    k: int
    rank: int = 4
    alpha: float | None = None
    target_modules: tuple[str, ...] | None = None
    lora_dropout: float = 0.0
    seed: int = 0
    epochs: int = 3
    lr: float = 0.05
    batch_size: int = 64
    momentum: float = 0.9

    def __post_init__(self) -> None:
        check_k(self.k)
        if self.rank < 1:
            raise ValueError(f"rank must be positive, got {self.rank}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError(f"epochs must be >= 0 and batch_size positive, got epochs={self.epochs}, "
                             f"batch_size={self.batch_size}")
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(str(m) for m in self.target_modules))


class LoRAEnsemble(Ensemble):
    """K LoRA fine-tunes of ``base_model`` (see the module docstring); the adapters are trained at the first ``fit``.

    method: a factory ``(model, member) -> method`` (see :data:`~datacredit.ensembles.base.MethodFactory`); it is
    called with the member's inner model. config: a :class:`LoRAConfig` (k, rank, alpha, target_modules,
    lora_dropout, seed and the default fine-tune's epochs, lr, batch_size, momentum), or its fields as keywords (``k``
    also positionally; not both). train_fn: ``(peft_model, seed) -> None`` fine-tunes in place; None = the default
    classification loop on the data given to ``fit``. base_training_seconds: how long the base took to train (for the
    cost report; None = unknown).
    """

    kind = "lora"

    def __init__(self, base_model: nn.Module, method: MethodFactory, k: int | None = None, *,
                 config: LoRAConfig | None = None, train_fn: Callable[[nn.Module, int], Any] | None = None,
                 base_training_seconds: float | None = None, **settings: Any):
        if k is not None:
            settings["k"] = k
        self.config = c = configure(LoRAConfig, config, settings)
        super().__init__(method, c.k)
        self.base_model, self.train_fn = base_model, train_fn
        self.rank, self.alpha = int(c.rank), float(c.rank if c.alpha is None else c.alpha)
        self.target_modules = linear_paths(base_model) if c.target_modules is None else list(c.target_modules)
        if not self.target_modules:
            raise ValueError(f"{type(base_model).__name__} has no nn.Linear to put adapters on; pass target_modules")
        self.lora_dropout, self.seed = float(c.lora_dropout), int(c.seed)
        self.finetune = {"epochs": int(c.epochs), "lr": float(c.lr), "batch_size": int(c.batch_size),
                         "momentum": float(c.momentum)}
        self.peft_models: list[nn.Module] = []
        self._base: nn.Module | None = None
        self.cost.shared_training = base_training_seconds

    def _lora_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=self.target_modules,
                          lora_dropout=self.lora_dropout, bias="none")

    def _prepare(self, train: Dataset | DataLoader) -> None:
        if self.peft_models:
            return
        try:
            from peft import get_peft_model
        except ImportError as exc:  # an optional dependency
            raise ImportError("LoRAEnsemble needs peft: pip install 'datacredit[lora]'") from exc
        base = copy.deepcopy(self.base_model).eval()
        for p in base.parameters():
            p.requires_grad_(False)
        self._base = base
        shared = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
        models, seconds = [], []
        for j in range(self.k):
            seed = self.seed + j
            with torch.random.fork_rng(devices=[]):  # adapter init and dropout during fine-tuning: from the seed
                torch.manual_seed(seed)
                peft_model = get_peft_model(copy.deepcopy(base, dict(shared)), self._lora_config())
                _, sec = timed(lambda m=peft_model, s=seed: self._train_member(m, s, train), self.clock)
            peft_model.eval()
            _check_trainable(peft_model)
            models.append(peft_model)
            seconds.append(sec)
        self.peft_models, self.cost.member_training = models, seconds

    def _train_member(self, peft_model: nn.Module, seed: int, train: Dataset | DataLoader) -> None:
        if self.train_fn is not None:
            self.train_fn(peft_model, seed)
        else:
            finetune_classifier(peft_model, train, seed, **self.finetune)

    def _model(self, member: int) -> nn.Module:
        return self.peft_models[member].get_base_model()

    def adapter_state_dict(self, member: int) -> dict[str, Tensor]:
        """What member ``member`` stores: its adapter weights (peft's ``get_peft_model_state_dict``)."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.peft_models[member])

    def _settings(self) -> dict[str, Any]:
        return {**config_settings(self.config), "rank": self.rank, "alpha": self.alpha,
                "target_modules": self.target_modules,
                "lora_dropout": self.lora_dropout, "seed": self.seed,
                "finetune": "train_fn" if self.train_fn is not None else self.finetune}

    def _weight_bytes(self) -> tuple[int, list[int]]:
        return weight_bytes(self._base), [weight_bytes(m, trainable_only=True) for m in self.peft_models]


def _check_trainable(peft_model: nn.Module) -> None:
    others = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    if others:
        raise DataError(f"after get_peft_model, non-LoRA parameters are trainable: {others[:5]}; the ensemble "
                        "attributes with the adapters only (leave modules_to_save unset)")
