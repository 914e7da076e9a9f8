"""Efficient ensembles around any attribution method (Deng, Li, Zhang, Ma 2024, "Efficient Ensembles Improve
Training Data Attribution"): the independent reference, dropout masks on one model, LoRA fine-tunes of one base.

Every ensemble is ``Ensemble(..., method, k).fit(train).score(queries) -> Scores`` (``fit(train, keep=False)``: one
fitted member in memory at a time), where ``method`` is a factory ``(model, member) -> method``: the plain mean of
its K members' score matrices, with ``training_seconds``, ``serving_seconds`` and ``stored_bytes`` as attributes and,
split per member, in ``Scores.config["cost"]``.
``first(k)`` gives the ensemble of the first k members; ``with_method(...)`` the same members under another method.
Settings are one frozen config each (:class:`DropoutConfig`, :class:`IndependentConfig`, :class:`LoRAConfig`), or its
fields as keywords; the factory's methods report what they cache through ``cache_bytes()``.
"""

from .base import Ensemble, EnsembleCost
from .dropout import DropoutConfig, DropoutEnsemble, dropout_mask
from .independent import IndependentConfig, IndependentEnsemble
from .lora import LoRAConfig, LoRAEnsemble, finetune_classifier

__all__ = ["DropoutConfig", "DropoutEnsemble", "Ensemble", "EnsembleCost", "IndependentConfig", "IndependentEnsemble",
           "LoRAConfig", "LoRAEnsemble", "dropout_mask", "finetune_classifier"]
