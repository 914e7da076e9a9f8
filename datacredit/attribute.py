"""``datacredit attribute``: credit generated outputs to the sources of a user's own text data, with a ledger.

Inputs (local files only, no network):

* ``--train FILE.jsonl``: one JSON object per line with a text field (``--text-field``, default ``text``) and one or
  more source fields (``--source-field``, default ``source``; the first is the one paid). Each record is cut into
  windows of ``--seq-len`` tokens; every window is one training example and inherits its record's sources.
* ``--outputs FILE.jsonl``: one generated output per line: ``prompt``, ``completion`` and optionally ``amount``
  (default ``--amount``).
* the model: ``--model DIR``, a local ``transformers`` causal LM directory (config + weights + tokenizer, read with
  ``local_files_only``), or, without ``--model``, a character-level TinyGPT trained here on the training windows.

Several models, the measured best practice (benchmarks/SOURCES.md Case 3b: EK-FAC averaged over 5 training seeds):
``--seeds K`` trains K character models (seeds ``seed .. seed+K-1``), or ``--model DIR`` repeated names K local models
(e.g. one recipe trained with K seeds) that must share one tokenizer. Every method attributes each model with the same
settings and the credit is the plain mean of the K score matrices
(:class:`~datacredit.ensembles.IndependentEnsemble`). Cost: K trainings (character models) and K fits + scorings per
method. ``--seeds 1`` and one ``--model`` run the single-model path unchanged.

Noise for the ledger's minimum-evidence rule, per source and output: ``sqrt(b² + s²/K)``, with ``b`` the bootstrap
standard error over the completion's tokens of the averaged credit (the one-model rule) and ``s`` the standard
deviation (ddof 1) of the K models' credits, so ``s/√K`` is the standard error of their mean: which tokens and which
training seed are independent sources of error, so their variances add. With one model it is ``b``.

Writes into ``--out``: ``scores/`` (per completion token, a Scores; the K-model mean), ``sources.json``,
``ledger.json`` and ``ledger.csv``, ``credit.html``. Mistakes in the inputs raise DataError naming the file, line and
field.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datacredit.dataset import ArrayDataset
from datacredit.digests import data_digest, model_digest
from datacredit.ensembles import IndependentEnsemble
from datacredit.errors import DataError
from datacredit.generation import (
    CompletionCredit,
    CompletionTask,
    attribute_completions,
    completion_credit,
    completion_queries,
)
from datacredit.ledger import PayoutRule, compensation
from datacredit.models import TinyGPT
from datacredit.scores import Scores
from datacredit.sources import Sources
from datacredit.store import atomic_write_json

__all__ = ["METHODS", "combined_noise", "read_jsonl", "run"]

METHODS = ("influence-ekfac", "influence-kfac", "grad-dot", "trak")
NOISE_RULE = ("sqrt(b^2 + s^2/K), b the bootstrap standard error over the completion's tokens of the averaged credit, "
              "s the standard deviation (ddof 1) of the K models' credits")


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be checked before any work (DataError naming the argument)."""
    for name in ("train", "outputs"):
        if not Path(getattr(args, name)).is_file():
            raise DataError(f"--{name} {getattr(args, name)}: no such file")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise DataError(f"--out {args.out} is a file, not a directory")
    for model_dir in args.model or ():
        if not (Path(model_dir) / "config.json").is_file():
            raise DataError(f"--model {model_dir}: not a transformers model directory (no config.json)")
    resolved = [Path(d).resolve() for d in args.model or ()]
    if len(set(resolved)) < len(resolved):
        twice = next(d for d, r in zip(args.model, resolved, strict=True) if resolved.count(r) > 1)
        raise DataError(f"--model {twice} is given twice: averaging a model with itself only weights it double")
    if args.seeds < 1:
        raise DataError(f"--seeds must be at least 1, got {args.seeds}")
    if args.model and args.seeds > 1:
        raise DataError("--seeds trains that many character models; with --model, name each trained model "
                        "directory instead (--model DIR1 --model DIR2 ...)")
    if args.seq_len < 2 or args.epochs < 1:
        raise DataError(f"need --seq-len >= 2 and --epochs >= 1, got {args.seq_len} and {args.epochs}")
    if not math.isfinite(args.amount) or args.amount < 0:
        raise DataError(f"--amount must be a finite number >= 0, got {args.amount}")
    PayoutRule(min_evidence=args.min_evidence)


def read_jsonl(path: str | Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """Records of a JSONL file; blank lines skipped; DataError naming the line for bad JSON or missing fields."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc})") from exc
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in required if k not in rec]
            if missing:
                raise DataError(f"{path}:{n}: missing field(s) {missing}")
            bad = [k for k in required if not isinstance(rec[k], str) or not rec[k]]
            if bad:
                raise DataError(f"{path}:{n}: field(s) {bad} must be non-empty strings")
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _amounts(outputs: Sequence[dict[str, Any]], default: float, path: str) -> list[float]:
    amounts = []
    for n, out in enumerate(outputs):
        amount = out.get("amount", default)
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not math.isfinite(amount) or amount < 0:
            raise DataError(f"{path}: output {n}: amount must be a number >= 0, got {amount!r}")
        amounts.append(float(amount))
    return amounts


class _Tokenizer:
    """encode(str) -> list[int] and the vocabulary size, over a transformers tokenizer or characters.
    ``vocab``: token -> id (transformers; None for characters), to tell two tokenizers apart."""

    def __init__(self, encode: Callable[[str], list[int]], vocab_size: int, pad_id: int,
                 vocab: dict[str, int] | None = None) -> None:
        self.encode, self.vocab_size, self.pad_id, self.vocab = encode, vocab_size, pad_id, vocab


def _char_tokenizer(texts: Sequence[str], outputs: Sequence[dict[str, Any]]) -> _Tokenizer:
    vocab = sorted(set("".join(texts)))
    index = {c: i for i, c in enumerate(vocab)}
    for n, out in enumerate(outputs):
        unknown = set(out["prompt"] + out["completion"]) - index.keys()
        if unknown:
            raise DataError(f"output {n}: characters {''.join(sorted(unknown))!r} never occur in the training text, "
                            "so the character model cannot score them")
    return _Tokenizer(lambda s: [index[c] for c in s], len(vocab), 0)


def _transformers(model_dir: str) -> tuple[nn.Module, _Tokenizer]:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise DataError("--model needs the transformers package (pip install 'datacredit[transformers]')") from exc
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).float().eval()
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"--model {model_dir}: no tokenizer saved beside the model ({exc})") from exc
    if len(tok) > model.config.vocab_size:
        raise DataError(f"--model {model_dir}: the tokenizer has {len(tok)} tokens but the model only "
                        f"{model.config.vocab_size}: they do not belong together")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return model, _Tokenizer(lambda s: tok.encode(s, add_special_tokens=False), model.config.vocab_size, pad,
                             tok.get_vocab())


def _tokenizer_difference(first: _Tokenizer, other: _Tokenizer, texts: Sequence[str]) -> str | None:
    """How ``other`` differs from ``first`` (vocabulary, padding id, or the ids of one of ``texts``), or None."""
    if other.vocab != first.vocab:
        if len(other.vocab) != len(first.vocab):
            return f"{len(other.vocab)} tokens against {len(first.vocab)}"
        token = next(t for t in sorted(first.vocab) if other.vocab.get(t) != first.vocab[t])
        return f"token {token!r} has id {other.vocab.get(token)} against {first.vocab[token]}"
    if other.pad_id != first.pad_id:
        return f"padding id {other.pad_id} against {first.pad_id}"
    for text in texts:
        if other.encode(text) != first.encode(text):
            return f"it encodes {text[:40]!r} differently"
    return None


def _load_models(model_dirs: Sequence[str], texts: Sequence[str]) -> tuple[list[nn.Module], _Tokenizer, int | None]:
    """The models of ``--model`` directories, their one shared tokenizer (DataError naming the first directory whose
    tokenizer differs from the first's, on ``texts``: all training texts, prompts and completions) and the shortest
    context. The vocabulary limit is the smallest model's."""
    models, toks = zip(*(_transformers(d) for d in model_dirs), strict=True)
    for model_dir, tok in zip(model_dirs[1:], toks[1:], strict=True):
        why = _tokenizer_difference(toks[0], tok, texts)
        if why is not None:
            raise DataError(f"--model {model_dir}: its tokenizer differs from that of --model {model_dirs[0]} "
                            f"({why}); models averaged together must share one tokenizer")
    contexts = [getattr(m.config, "n_positions", None) or getattr(m.config, "max_position_embeddings", None)
                for m in models]
    tok = toks[0]
    tok.vocab_size = min(t.vocab_size for t in toks)
    return list(models), tok, None if None in contexts else min(contexts)


def windows(records: Sequence[dict[str, Any]], text_field: str, tok: _Tokenizer, seq_len: int
            ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Token windows ``(n, seq_len + 1)``, their target masks ``(n, seq_len)`` and the record of each window.

    Consecutive windows of a record overlap by one token (the last target of one is the first input of the next),
    so every token of the record is predicted exactly once; a short tail is right-padded and masked.
    """
    rows, masks, owner = [], [], []
    for r, rec in enumerate(records):
        ids = tok.encode(rec[text_field])
        if len(ids) < 2:
            raise DataError(f"training record {r}: text of {len(ids)} token(s) has nothing to predict")
        for start in range(0, len(ids) - 1, seq_len):
            piece = ids[start : start + seq_len + 1]
            row = piece + [tok.pad_id] * (seq_len + 1 - len(piece))
            mask = [True] * (len(piece) - 1) + [False] * (seq_len + 1 - len(piece))
            rows.append(row), masks.append(mask), owner.append(r)
    return torch.tensor(rows), torch.tensor(masks), np.asarray(owner)


def train_char_model(train: ArrayDataset, vocab_size: int, seq_len: int, epochs: int, seed: int) -> nn.Module:
    """A TinyGPT (d=64, 2 layers) trained with Adam on ``train``'s masked windows (mean token loss per window)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyGPT(vocab_size, d=64, n_layers=2, n_heads=4, max_len=seq_len, tied=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    task = CompletionTask(reduction="mean")
    tokens, mask = train.tensors
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(tokens), generator=gen).split(32):
            opt.zero_grad()
            task.loss(model, (tokens[idx], mask[idx])).mean().backward()
            opt.step()
    return model.eval()


def _method(name: str, model: nn.Module, task: CompletionTask) -> Any:
    """One model's method. Every model of an average gets the same settings (TRAK: the same projection seed, as in
    the measured seed average of benchmarks/SOURCES.md), so K models average exactly K one-model runs."""
    from datacredit.methods import TRAK, GradDot, Influence

    if name == "grad-dot":
        return GradDot(model, task)
    if name == "trak":
        return TRAK(model, task, projection=512)
    return Influence(model, task, curvature=name.split("-")[1])


def _output_totals(scores: Scores, output_of: np.ndarray, sources: Sources, level: str) -> np.ndarray:
    """Per-token ``scores`` rolled up to ``(n_source, n_output)`` credits (each output's tokens summed)."""
    values = sources.values(scores, level).values
    return np.stack([values[:, output_of == n].sum(1) for n in range(int(output_of.max()) + 1)], 1)


def combined_noise(token_noise: np.ndarray, member_credit: np.ndarray) -> np.ndarray:
    """Noise ``(n_source, n_output)`` for the ledger's minimum-evidence rule: ``sqrt(token_noise² + s²/K)``.

    token_noise: ``(n_source, n_output)`` bootstrap standard error over each completion's tokens of the averaged
        credit (:attr:`CompletionCredit.noise`). member_credit: ``(K, n_source, n_output)`` each model's credit;
        ``s`` is their standard deviation over the K models (ddof 1), ``s/√K`` the standard error of their mean.
    Independent sources of error (which tokens, which training seed) add in variance. K = 1: ``token_noise``.
    """
    token_noise = np.asarray(token_noise, dtype=np.float64)
    member_credit = np.asarray(member_credit, dtype=np.float64)
    if member_credit.ndim != 3 or member_credit.shape[1:] != token_noise.shape:
        raise DataError(f"member_credit must be (K, *{token_noise.shape}), got {member_credit.shape}")
    k = member_credit.shape[0]
    if k == 1:
        return token_noise
    return np.sqrt(token_noise**2 + member_credit.var(0, ddof=1) / k)


def _attribute(name: str, models: Sequence[nn.Module], task: CompletionTask, train: ArrayDataset,
               prompts: list[list[int]], completions: list[list[int]], sources: Sources, level: str, seed: int,
               limits: dict[str, Any], training_seconds: Sequence[float] | None) -> tuple[CompletionCredit, np.ndarray]:
    """Credit of method ``name`` averaged over ``models``, and each model's credit ``(K, n_source, n_output)``.

    One model: the method itself (the single-model path, unchanged). Several: an IndependentEnsemble over them,
    fitted one member at a time (``keep=False``: the peak memory of one fitted method), whose mean score matrix is
    rolled up by :func:`completion_credit` (the ensemble has no task for :func:`attribute_completions` to check;
    the query set is the same)."""
    if len(models) == 1:
        credit = attribute_completions(_method(name, models[0], task).fit(train), prompts, completions, sources,
                                       level=level, seed=seed, **limits)
        return credit, credit.outputs.values[None]
    ensemble = IndependentEnsemble(lambda model, member: _method(name, model, task), models=models,
                                   training_seconds=training_seconds).fit(train, keep=False)
    queries, output_of, _ = completion_queries(prompts, completions, per_token=True, **limits)
    credit = completion_credit(ensemble.score(queries), output_of, sources, level=level, seed=seed)
    members = np.stack([_output_totals(s, output_of, sources, level) for s in ensemble.member_scores])
    return credit, members


def _audit(args: argparse.Namespace, models: Sequence[nn.Module], model_dirs: Sequence[str], seeds: Sequence[int],
           train: ArrayDataset, source_field: str, names: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The ledger's audit trail and the report's notes. One model: the single-model trail, unchanged. Several:
    ``model`` is the sha256 of the models' digests in order (space-separated), and ``models`` lists every model's
    digest, seed (None for a ``--model`` directory: its training seed is not known here) and source."""
    digests = [model_digest(m) for m in models]
    one = len(models) == 1
    audit: dict[str, Any] = {
        "model": digests[0] if one else hashlib.sha256(" ".join(digests).encode()).hexdigest(),
        "model_source": (model_dirs[0] if model_dirs else "character TinyGPT") if one else
        f"mean over {len(models)} " + ("transformers models" if model_dirs else "character TinyGPTs"),
        "train_file": str(args.train), "train_digest": data_digest(train), "outputs_file": str(args.outputs),
        "n_train_windows": len(train), "source_field": source_field, "methods_compared": list(names[1:])}
    if one:
        return audit, []
    audit["n_models"] = len(models)
    audit["models"] = [{"digest": d, "seed": None if model_dirs else seeds[j],
                        "source": model_dirs[j] if model_dirs else "character TinyGPT"} for j, d in enumerate(digests)]
    audit["noise_rule"] = NOISE_RULE
    which = ", ".join(model_dirs) if model_dirs else f"character TinyGPTs trained with seeds {seeds[0]}–{seeds[-1]}"
    return audit, [f"Scores averaged over {len(models)} models ({which}). Noise for the minimum-evidence rule: "
                   f"{NOISE_RULE}."]


def _train_char_models(train: ArrayDataset, tok: _Tokenizer, args: argparse.Namespace, seeds: Sequence[int]
                       ) -> tuple[list[nn.Module], list[float]]:
    """One character model per seed, and the wall seconds each took to train."""
    many = f"{len(seeds)} character models" if len(seeds) > 1 else "a character model"
    print(f"training {many} on {len(train)} windows of {args.seq_len} characters ({args.epochs} epochs"
          + (f", seeds {seeds[0]}..{seeds[-1]})" if len(seeds) > 1 else ")"))
    models, seconds = [], []
    for s in seeds:
        start = time.perf_counter()
        models.append(train_char_model(train, tok.vocab_size, args.seq_len, args.epochs, s))
        seconds.append(time.perf_counter() - start)
    return models, seconds


def run(args: argparse.Namespace) -> int:
    """The command: read, (train,) fit, attribute, pay, write; prints a summary. Returns the exit code."""
    from datacredit.report.credit import render_credit_report

    check_arguments(args)
    fields = args.source_field or ["source"]
    records = read_jsonl(args.train, [args.text_field, *fields])
    outputs = read_jsonl(args.outputs, ["prompt", "completion"])
    amounts = _amounts(outputs, args.amount, args.outputs)
    out_dir = Path(args.out)
    model_dirs = list(args.model or [])
    if model_dirs:
        texts = [r[args.text_field] for r in records] + [o[k] for o in outputs for k in ("prompt", "completion")]
        models, tok, max_len = _load_models(model_dirs, texts)
        task = CompletionTask(position_ids=True)
    else:
        models, task, max_len = [], CompletionTask(), args.seq_len
        tok = _char_tokenizer([r[args.text_field] for r in records], outputs)
    prompts = [tok.encode(o["prompt"]) for o in outputs]
    completions = [tok.encode(o["completion"]) for o in outputs]
    limits = {"pad_id": tok.pad_id, "max_len": max_len, "vocab_size": tok.vocab_size}
    completion_queries(prompts, completions, **limits)  # refuse bad outputs before any training
    tokens, mask, owner = windows(records, args.text_field, tok, args.seq_len)
    train = ArrayDataset(tokens, mask)
    sources = Sources(np.arange(len(tokens)), {f: [records[r][f] for r in owner] for f in fields})
    seeds, training_seconds = list(range(args.seed, args.seed + args.seeds)), None
    if not model_dirs:
        models, training_seconds = _train_char_models(train, tok, args, seeds)
    names = list(dict.fromkeys(args.method or ["influence-ekfac"]))  # the first one pays; the others check stability
    by_method, member_credit = {}, {}
    for name in names:
        by_method[name], member_credit[name] = _attribute(name, models, task, train, prompts, completions, sources,
                                                          fields[0], args.seed, limits, training_seconds)
    credit = by_method[names[0]]
    audit, notes = _audit(args, models, model_dirs, seeds, train, fields[0], names)
    ledger = compensation(credit.outputs, np.asarray(amounts), noise=combined_noise(credit.noise,
                                                                                    member_credit[names[0]]),
                          rule=PayoutRule(min_evidence=args.min_evidence), audit=audit)
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, (name, c) in enumerate(by_method.items()):  # per-token Scores, with their sources
        dataclasses.replace(c.scores, sources=sources).save(out_dir / ("scores" if k == 0 else f"scores-{name}"))
    atomic_write_json(out_dir / "sources.json", sources.to_json())
    ledger.save(out_dir)
    labels = {n: f"{o['prompt']} | {o['completion']}"[:120] for n, o in enumerate(outputs)}
    report = render_credit_report(out_dir / "credit.html", ledger, labels=labels, notes=notes,
                                  by_method={name: c.outputs for name, c in by_method.items()})
    for n in range(len(outputs)):
        top = credit.outputs.ranking(n)[:3]
        print(f"output {n}: " + ", ".join(f"{s} {v:+.3g}" for s, v in top))
    print("paid: " + ", ".join(f"{s} {v:g}" for s, v in ledger.totals().items()))
    if len(models) > 1:
        print(f"credit averaged over {len(models)} models")
    print(f"ledger: {out_dir / 'ledger.json'}, report: {report}")
    return 0
