"""Attribution of generated text: which training sources explain a completion, token by token.

A generated output is a prompt followed by a completion. Only the completion's tokens are attributed: the measurement
of a completion is the summed next-token cross-entropy of its tokens given everything before them (its negative
log-likelihood), so a positive score means the training example made the model *more likely* to produce exactly this
completion. Per-token attribution makes every completion token its own query (the same sequence, with only that token's
target counted); by linearity of the gradient the per-token scores of a completion sum to its whole-completion score,
for every gradient method here (Grad-Dot, TracIn, influence, TRAK, SOURCE).

:class:`CompletionTask` is the task: batches are ``(tokens (N, T+1), mask (N, T))`` with ``mask[n, t]`` marking the
targets ``tokens[n, t+1]`` that count; a batch of ``(tokens,)`` alone (the training data) counts every target, as
:class:`~datacredit.task.LanguageModelingTask` does. :func:`completion_queries` builds the per-token query set and
:func:`attribute_completions` runs a fitted method on it and rolls the result up to sources
(:func:`completion_credit` does the roll-up alone, e.g. for In-Run values recorded during training with the per-token
queries as the validation set).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datacredit.dataset import ArrayDataset
from datacredit.errors import DataError
from datacredit.scores import Scores
from datacredit.sources import Sources, SourceValues
from datacredit.task import LanguageModelingTask, _logits

__all__ = ["CompletionCredit", "CompletionTask", "attribute_completions", "completion_credit", "completion_queries"]


class CompletionTask(LanguageModelingTask):
    """Next-token cross-entropy per sequence over the masked targets only (see module doc).

    reduction: ``"sum"`` (default: the completion's negative log-likelihood, so per-token scores add up to it) or
    ``"mean"`` over counted targets. The training loss (batches without a mask) follows the same reduction.
    """

    def __init__(self, reduction: str = "sum", modules: list[str] | None = None, position_ids: bool = False):
        super().__init__(reduction=reduction, modules=modules, position_ids=position_ids)

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        if isinstance(batch, dict):
            tokens, mask = batch["input_ids"], batch.get("target_mask")
        elif isinstance(batch, (tuple, list)):
            tokens, mask = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            tokens, mask = batch, None
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if mask is None:
            mask = torch.ones_like(targets, dtype=torch.bool)
        if mask.shape != targets.shape:
            raise DataError(f"target mask has shape {tuple(mask.shape)}, expected {tuple(targets.shape)} "
                            "(one flag per predicted token: tokens (N, T+1), mask (N, T))")
        if self.position_ids:
            positions = torch.arange(inputs.shape[1], device=inputs.device).expand(inputs.shape[0], -1)
            logits = _logits(model(input_ids=inputs, position_ids=positions))
        else:
            logits = _logits(model(inputs))
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                    reduction="none").reshape(targets.shape)
        total = (per_token * mask.to(per_token.dtype)).sum(1)
        if self.reduction == "sum":
            return total
        return total / mask.sum(1).clamp(min=1).to(total.dtype)


def _as_ids(seq: Sequence[int] | Tensor | np.ndarray, what: str) -> Tensor:
    t = torch.as_tensor(np.asarray(seq.detach().cpu() if isinstance(seq, Tensor) else seq), dtype=torch.long)
    if t.ndim != 1:
        raise DataError(f"{what} must be a 1-D sequence of token ids, got shape {tuple(t.shape)}")
    return t


def completion_queries(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                       per_token: bool = True, pad_id: int = 0, max_len: int | None = None,
                       vocab_size: int | None = None) -> tuple[ArrayDataset, np.ndarray, np.ndarray]:
    """Query set for generated outputs ``prompt + completion`` (token ids), counting completion targets only.

    Returns ``(queries, output_of, token_of)``: ``queries`` an ArrayDataset of ``(tokens (Q, L+1), mask (Q, L))``
    (right-padded with ``pad_id``; padding is never a counted target and, the models being causal, never seen by a
    counted one), and for each query the index of its output and of its completion token (-1 when ``per_token`` is
    False: one query per whole completion). Query ids are ``0..Q-1``.
    ``max_len`` (the model's context) and ``vocab_size`` are checked when given, with errors naming the output.
    """
    if len(prompts) != len(completions) or not len(prompts):
        raise DataError(f"need as many prompts as completions (and at least one): {len(prompts)} vs {len(completions)}")
    seqs, masks, output_of, token_of = [], [], [], []
    for n, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        p, c = _as_ids(p, f"prompt {n}"), _as_ids(c, f"completion {n}")
        if len(c) == 0:
            raise DataError(f"output {n}: empty completion (nothing to attribute)")
        if len(p) == 0:
            raise DataError(f"output {n}: empty prompt; the first completion token needs a context (add a BOS token)")
        seq = torch.cat([p, c])
        if max_len is not None and len(seq) - 1 > max_len:
            raise DataError(f"output {n}: {len(seq) - 1} input tokens exceed the model's context of {max_len}")
        if vocab_size is not None and (seq.min() < 0 or seq.max() >= vocab_size):
            raise DataError(f"output {n}: token ids outside the model's vocabulary of {vocab_size} "
                            "(was it tokenized with another tokenizer?)")
        targets = torch.zeros(len(seq) - 1, dtype=torch.bool)
        first = len(p) - 1  # target index of the first completion token
        if per_token:
            for k in range(len(c)):
                m = targets.clone()
                m[first + k] = True
                seqs.append(seq), masks.append(m), output_of.append(n), token_of.append(k)
        else:
            m = targets.clone()
            m[first:] = True
            seqs.append(seq), masks.append(m), output_of.append(n), token_of.append(-1)
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
    for q, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        tokens[q, : len(s)] = s
        mask[q, : len(m)] = m
    return ArrayDataset(tokens, mask), np.asarray(output_of), np.asarray(token_of)


@dataclass(eq=False)
class CompletionCredit:
    """Source credit for generated outputs.

    ``per_token[n]``: SourceValues ``(n_source, len(completion n))`` — column k explains completion token k.
    ``outputs``: SourceValues ``(n_source, n_outputs)`` — the sum over each completion's tokens.
    ``noise``: ``(n_source, n_outputs)`` bootstrap standard error of that sum, resampling the completion's tokens
    (0 for a one-token completion), for the ledger's minimum-evidence rule.
    ``scores``: the per-example Scores behind them (one column per query of :func:`completion_queries`).
    """

    per_token: list[SourceValues]
    outputs: SourceValues
    noise: np.ndarray
    scores: Scores


def attribute_completions(method: Any, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                          sources: Sources, *, level: str | None = None, n_boot: int = 500, seed: int = 0,
                          **query_kwargs: Any) -> CompletionCredit:
    """Score every completion token with a fitted ``method`` (its task must be a :class:`CompletionTask`) and roll
    the scores up to ``sources``. Cost: one ``score`` call with ``Σ len(completion)`` queries."""
    if not isinstance(getattr(method, "task", None), CompletionTask):
        raise DataError("attribute_completions needs a method built with task=CompletionTask(...), so that only the "
                        f"completion's tokens are measured; got {type(getattr(method, 'task', None)).__name__}")
    queries, output_of, _ = completion_queries(prompts, completions, per_token=True, **query_kwargs)
    return completion_credit(method.score(queries), output_of, sources, level=level, n_boot=n_boot, seed=seed)


def completion_credit(scores: Scores, output_of: np.ndarray, sources: Sources, *, level: str | None = None,
                      n_boot: int = 500, seed: int = 0) -> CompletionCredit:
    """Roll per-token ``scores`` ``(n_train, Q)`` (columns in the order of :func:`completion_queries`, per token)
    up to sources, per token and per output. For scores that are not computed by a post-hoc ``score`` call, e.g.
    In-Run Data Shapley recorded during training with the per-token queries as its targeted validation set
    (``InRunCallback(CompletionTask(), queries, targeted=True)``): the completions must be known before training."""
    output_of = np.asarray(output_of)
    if output_of.shape != (scores.n_query,):
        raise DataError(f"output_of has shape {output_of.shape}, expected ({scores.n_query},): one output index per "
                        "query column of the scores (from completion_queries(..., per_token=True))")
    token_values = sources.values(scores, level)
    per_token, totals, noise = [], [], []
    for n in range(int(output_of.max()) + 1):
        cols = np.flatnonzero(output_of == n)
        if not len(cols):
            raise DataError(f"output {n} has no query column in the scores")
        sv = SourceValues(token_values.values[:, cols], token_values.names, np.arange(len(cols)),
                          token_values.counts, token_values.level, token_values.method, token_values.config)
        per_token.append(sv)
        totals.append(sv.total("sum"))
        noise.append(sv.bootstrap(n_boot, reduce="sum", seed=seed)[2] if len(cols) > 1 else np.zeros(sv.n_source))
    outputs = SourceValues(np.stack(totals, 1), token_values.names, np.arange(len(per_token)),
                           token_values.counts, token_values.level, token_values.method, token_values.config)
    return CompletionCredit(per_token, outputs, np.stack(noise, 1), scores)
