"""`datacredit attribute` on small local files: the character model and a local transformers directory."""

from __future__ import annotations

import json
import re

import pytest

from datacredit import Scores
from datacredit.cli import main

DOCS = {"owls": "owls hoot at night in old oak woods. ", "bread": "knead dough, bake bread until golden. "}


def write_inputs(tmp_path, train=None, outputs=None):
    train = train if train is not None else [
        {"text": text * 3, "source": name, "licence": "cc0"} for name, text in DOCS.items() for _ in range(2)]
    outputs = outputs if outputs is not None else [
        {"prompt": "owls ", "completion": "hoot at night", "amount": 2.0}, {"prompt": "knead ", "completion": "dough"}]
    for name, rows in (("train.jsonl", train), ("outputs.jsonl", outputs)):
        (tmp_path / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return tmp_path / "train.jsonl", tmp_path / "outputs.jsonl"


def attribute(tmp_path, *extra):
    """``datacredit attribute`` on the files of :func:`write_inputs`; returns the exit status."""
    return main(["attribute", "--train", str(tmp_path / "train.jsonl"), "--outputs", str(tmp_path / "outputs.jsonl"),
                 "--out", str(tmp_path / "out"), "--seq-len", "32", "--epochs", "3", "--method", "grad-dot", *extra])


def refused(tmp_path, capsys, message, *extra):
    """The command exits 2 with a one-line ``datacredit: error:`` message matching ``message``."""
    capsys.readouterr()  # drop what earlier steps printed
    assert attribute(tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # transformers may print its loading bar before
    assert err.startswith("datacredit: error:")
    assert re.search(message, err), err


def test_character_model_run_writes_scores_ledger_and_report(tmp_path, capsys):
    write_inputs(tmp_path)
    assert attribute(tmp_path, "--source-field", "source", "--source-field", "licence", "--method", "trak") == 0
    out = tmp_path / "out"
    ledger = json.loads((out / "ledger.json").read_text())
    paid = {0: 0.0, 1: 0.0}
    for line in ledger["lines"]:
        paid[line["output"]] += line["paid"]
    assert paid == pytest.approx({0: 2.0, 1: 1.0})
    assert ledger["audit"]["source_field"] == "source" and len(ledger["audit"]["model"]) == 64
    assert (out / "ledger.csv").exists() and (out / "scores").is_dir()
    html = (out / "credit.html").read_text()
    assert "Who gets the credit" in html and "owls" in html and "Stability of the source ranking" in html
    assert (out / "scores-trak").is_dir() and ledger["audit"]["methods_compared"] == ["trak"]
    per_token = Scores.load(out / "scores")
    assert per_token.n_query == len("hoot at night") + len("dough")  # one query per completion token
    assert set(per_token.by_source("licence").names) == {"cc0"}
    assert "paid:" in capsys.readouterr().out


@pytest.mark.parametrize("train, outputs, message", [
    (['{"text": "abc"}'], None, r"train.jsonl:1: missing field\(s\) \['source'\]"),
    (['{"text": "abc", "source": ""}'], None, "must be non-empty strings"),
    (['not json'], None, "train.jsonl:1: not valid JSON"),
    (None, [{"prompt": "owls ", "completion": "hoot!"}], r"characters '!' never occur in the training text"),
    (None, [{"prompt": "owls ", "completion": "hoot", "amount": -1}], "amount must be a number >= 0"),
    (None, [{"prompt": "owls " * 10, "completion": "hoot"}], "exceed the model's context of 32"),
])
def test_input_mistakes_are_named_before_any_training(tmp_path, capsys, train, outputs, message):
    write_inputs(tmp_path, train, outputs)
    refused(tmp_path, capsys, message)
    assert not (tmp_path / "out").exists()


def test_missing_model_directory_and_file_out(tmp_path, capsys):
    write_inputs(tmp_path)
    refused(tmp_path, capsys, "no config.json", "--model", str(tmp_path))
    (tmp_path / "out").write_text("x")
    refused(tmp_path, capsys, "is a file")
    with pytest.raises(SystemExit):  # argparse: one line, exit 2
        attribute(tmp_path, "--epochs", "0")


def _save_char_gpt2(directory, chars, mismatch=False):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {c: i for i, c in enumerate(chars)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.save_pretrained(directory)
    config = transformers.GPT2Config(vocab_size=len(chars) - (5 if mismatch else 0), n_positions=64, n_embd=16,
                                     n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)


def test_local_transformers_directory(tmp_path, capsys):
    write_inputs(tmp_path)
    chars = sorted(set("".join(DOCS.values())))
    _save_char_gpt2(tmp_path / "gpt2", chars)
    assert attribute(tmp_path, "--model", str(tmp_path / "gpt2")) == 0
    ledger = json.loads((tmp_path / "out" / "ledger.json").read_text())
    assert sum(line["paid"] for line in ledger["lines"]) == pytest.approx(3.0)
    _save_char_gpt2(tmp_path / "bad", chars, mismatch=True)
    refused(tmp_path, capsys, "do not belong together", "--model", str(tmp_path / "bad"), "--out",
            str(tmp_path / "out2"))
