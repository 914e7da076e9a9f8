"""``datacredit attribute``: credit generated outputs to the sources of a user's own text data, with a ledger.

Inputs (local files only, no network):

* ``--train FILE.jsonl``: one JSON object per line with a text field (``--text-field``, default ``text``) and one or
  more source fields (``--source-field``, default ``source``; the first is the one paid). Each record is cut into
  windows of ``--seq-len`` tokens; every window is one training example and inherits its record's sources.
* ``--outputs FILE.jsonl``: one generated output per line: ``prompt``, ``completion`` and optionally ``amount``
  (default ``--amount``).
* the model: ``--model DIR``, a local ``transformers`` causal LM directory (config + weights + tokenizer, read with
  ``local_files_only``), or, without ``--model``, a character-level TinyGPT trained here on the training windows.

Writes into ``--out``: ``scores/`` (per completion token, a Scores), ``sources.json``, ``ledger.json`` and
``ledger.csv``, ``credit.html``. Mistakes in the inputs raise DataError naming the file, line and field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datacredit.dataset import ArrayDataset
from datacredit.digests import data_digest, model_digest
from datacredit.errors import DataError
from datacredit.generation import CompletionTask, attribute_completions, completion_queries
from datacredit.ledger import PayoutRule, compensation
from datacredit.models import TinyGPT
from datacredit.sources import Sources
from datacredit.store import atomic_write_json

__all__ = ["METHODS", "read_jsonl", "run"]

METHODS = ("influence-ekfac", "influence-kfac", "grad-dot", "trak")


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be checked before any work (DataError naming the argument)."""
    for name in ("train", "outputs"):
        if not Path(getattr(args, name)).is_file():
            raise DataError(f"--{name} {getattr(args, name)}: no such file")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise DataError(f"--out {args.out} is a file, not a directory")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise DataError(f"--model {args.model}: not a transformers model directory (no config.json)")
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


class _Tokenizer:
    """encode(str) -> list[int] and the vocabulary size, over a transformers tokenizer or characters."""

    def __init__(self, encode: Callable[[str], list[int]], vocab_size: int, pad_id: int) -> None:
        self.encode, self.vocab_size, self.pad_id = encode, vocab_size, pad_id


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
    return model, _Tokenizer(lambda s: tok.encode(s, add_special_tokens=False), model.config.vocab_size, pad)


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
    from datacredit.methods import TRAK, GradDot, Influence

    if name == "grad-dot":
        return GradDot(model, task)
    if name == "trak":
        return TRAK(model, task, projection=512)
    return Influence(model, task, curvature=name.split("-")[1])


def run(args: argparse.Namespace) -> int:
    """The command: read, (train,) fit, attribute, pay, write; prints a summary. Returns the exit code."""
    from datacredit.report.credit import render_credit_report

    check_arguments(args)
    fields = args.source_field or ["source"]
    records = read_jsonl(args.train, [args.text_field, *fields])
    outputs = read_jsonl(args.outputs, ["prompt", "completion"])
    amounts = []
    for n, out in enumerate(outputs):
        amount = out.get("amount", args.amount)
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not math.isfinite(amount) or amount < 0:
            raise DataError(f"{args.outputs}: output {n}: amount must be a number >= 0, got {amount!r}")
        amounts.append(float(amount))
    out_dir = Path(args.out)
    if args.model is not None:
        model, tok = _transformers(args.model)
        task = CompletionTask(position_ids=True)
        max_len = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    else:
        model, task, max_len = None, CompletionTask(), args.seq_len
        tok = _char_tokenizer([r[args.text_field] for r in records], outputs)
    prompts = [tok.encode(o["prompt"]) for o in outputs]
    completions = [tok.encode(o["completion"]) for o in outputs]
    limits = {"pad_id": tok.pad_id, "max_len": max_len, "vocab_size": tok.vocab_size}
    completion_queries(prompts, completions, **limits)  # refuse bad outputs before any training
    tokens, mask, owner = windows(records, args.text_field, tok, args.seq_len)
    train = ArrayDataset(tokens, mask)
    sources = Sources(np.arange(len(tokens)), {f: [records[r][f] for r in owner] for f in fields})
    if model is None:
        print(f"training a character model on {len(tokens)} windows of {args.seq_len} characters "
              f"({args.epochs} epochs)")
        model = train_char_model(train, tok.vocab_size, args.seq_len, args.epochs, args.seed)
    names = list(dict.fromkeys(args.method or ["influence-ekfac"]))  # the first one pays; the others check stability
    by_method = {}
    for name in names:
        method = _method(name, model, task).fit(train)
        by_method[name] = attribute_completions(method, prompts, completions, sources, level=fields[0],
                                                seed=args.seed, **limits)
    credit = by_method[names[0]]
    ledger = compensation(credit.outputs, np.asarray(amounts), noise=credit.noise,
                          rule=PayoutRule(min_evidence=args.min_evidence),
                          audit={"model": model_digest(model), "model_source": args.model or "character TinyGPT",
                                 "train_file": str(args.train), "train_digest": data_digest(train),
                                 "outputs_file": str(args.outputs), "n_train_windows": len(tokens),
                                 "source_field": fields[0], "methods_compared": names[1:]})
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, (name, c) in enumerate(by_method.items()):  # per-token Scores, with their sources
        dataclasses.replace(c.scores, sources=sources).save(out_dir / ("scores" if k == 0 else f"scores-{name}"))
    atomic_write_json(out_dir / "sources.json", sources.to_json())
    ledger.save(out_dir)
    labels = {n: f"{o['prompt']} | {o['completion']}"[:120] for n, o in enumerate(outputs)}
    report = render_credit_report(out_dir / "credit.html", ledger, labels=labels,
                                  by_method={name: c.outputs for name, c in by_method.items()})
    for n in range(len(outputs)):
        top = credit.outputs.ranking(n)[:3]
        print(f"output {n}: " + ", ".join(f"{s} {v:+.3g}" for s, v in top))
    print("paid: " + ", ".join(f"{s} {v:g}" for s, v in ledger.totals().items()))
    print(f"ledger: {out_dir / 'ledger.json'}, report: {report}")
    return 0

