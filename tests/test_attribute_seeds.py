"""`datacredit attribute --seeds K` / repeated `--model`: credit averaged over several models, noise that includes the
spread across them, every model in the audit trail."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from datacredit import Scores
from datacredit.attribute import _char_tokenizer, combined_noise, train_char_model, windows
from datacredit.dataset import ArrayDataset
from datacredit.errors import DataError
from datacredit.generation import CompletionTask, attribute_completions, completion_credit
from datacredit.methods import GradDot
from datacredit.sources import Sources

from .test_attribute import DOCS, _save_char_gpt2, attribute, refused, write_inputs

COMPLETIONS = ("hoot at night", "dough")  # write_inputs' outputs


def _run(tmp_path, name, *extra):
    assert attribute(tmp_path, "--out", str(tmp_path / name), *extra) == 0
    out = tmp_path / name
    ledger = json.loads((out / "ledger.json").read_text())
    return Scores.load(out / "scores"), ledger, out


def _by_line(ledger, key):
    """``{(output, source): line[key]}`` over the ledger's source lines."""
    return {(ln["output"], ln["source"]): ln[key] for ln in ledger["lines"] if ln["credit"] is not None}


def _output_of():
    return np.repeat(np.arange(len(COMPLETIONS)), [len(c) for c in COMPLETIONS])


def test_seeds_2_is_the_mean_of_the_two_one_seed_runs_and_its_noise_adds_the_model_spread(tmp_path, capsys):
    write_inputs(tmp_path)
    both, ledger, out = _run(tmp_path, "k2", "--seeds", "2", "--seed", "3")
    one_a, ledger_a, _ = _run(tmp_path, "s3", "--seed", "3")
    one_b, ledger_b, _ = _run(tmp_path, "s4", "--seed", "4", "--seeds", "1")

    # per-token scores and per-source credit: the mean of the runs with seeds s and s+1
    np.testing.assert_allclose(both.values, (one_a.values + one_b.values) / 2, rtol=1e-5, atol=1e-7)
    credit, credit_a, credit_b = (_by_line(x, "credit") for x in (ledger, ledger_a, ledger_b))
    assert credit.keys() == credit_a.keys() == credit_b.keys()
    for key in credit:
        assert credit[key] == pytest.approx((credit_a[key] + credit_b[key]) / 2, rel=1e-5, abs=1e-7)
    assert sum(ln["paid"] for ln in ledger["lines"]) == pytest.approx(3.0)

    # noise by hand: sqrt(b^2 + s^2/K), b the token bootstrap of the averaged credit (the one-model rule, same seed)
    sources = Sources.from_json(json.loads((out / "sources.json").read_text()))
    token = completion_credit(both, _output_of(), sources, level="source", seed=3)
    noise = _by_line(ledger, "noise")
    names = list(token.outputs.names)
    seen_spread = False
    for (o, s), value in noise.items():
        b = token.noise[names.index(s), o]
        spread = np.var([credit_a[o, s], credit_b[o, s]], ddof=1) / 2
        assert value == pytest.approx(np.sqrt(b**2 + spread), rel=1e-6, abs=1e-12)
        assert value >= b
        seen_spread |= value > b * (1 + 1e-6)
    assert seen_spread  # the two models disagree somewhere, so the spread must show

    audit = ledger["audit"]
    assert audit["n_models"] == 2 and [m["seed"] for m in audit["models"]] == [3, 4]
    assert [m["digest"] for m in audit["models"]] == [ledger_a["audit"]["model"], ledger_b["audit"]["model"]]
    assert "n_models" not in ledger_a["audit"] and "models" not in ledger_a["audit"]
    html = (out / "credit.html").read_text()
    assert "Scores averaged over 2 models" in html and "seeds 3–4" in html
    assert "averaged over" not in (tmp_path / "s3" / "credit.html").read_text()


def test_seeds_1_is_the_single_model_path_unchanged(tmp_path):
    """--seeds 1 and no flag write bitwise the same scores and ledger lines, and both are what the single-model path
    gives by hand: one character model, the method, attribute_completions, its token-bootstrap noise."""
    train_file, _ = write_inputs(tmp_path)
    plain, ledger, _ = _run(tmp_path, "plain")
    flagged, ledger_1, _ = _run(tmp_path, "seeds1", "--seeds", "1")
    np.testing.assert_array_equal(plain.values, flagged.values)
    assert ledger["lines"] == ledger_1["lines"]
    assert {k: v for k, v in ledger["audit"].items() if k != "date"} == \
        {k: v for k, v in ledger_1["audit"].items() if k != "date"}

    records = [json.loads(line) for line in train_file.read_text().splitlines()]
    tok = _char_tokenizer([r["text"] for r in records], [])
    tokens, mask, owner = windows(records, "text", tok, 32)
    train = ArrayDataset(tokens, mask)
    sources = Sources(np.arange(len(tokens)), {"source": [records[r]["source"] for r in owner]})
    model = train_char_model(train, tok.vocab_size, 32, 3, 0)
    credit = attribute_completions(GradDot(model, CompletionTask()).fit(train),
                                   [tok.encode(p) for p in ("owls ", "knead ")], [tok.encode(c) for c in COMPLETIONS],
                                   sources, level="source", seed=0, pad_id=0, max_len=32, vocab_size=tok.vocab_size)
    np.testing.assert_array_equal(plain.values, credit.scores.values)
    names = list(credit.outputs.names)
    for (o, s), value in _by_line(ledger, "noise").items():
        assert value == credit.noise[names.index(s), o]  # bitwise: the one-model noise rule, untouched


def test_combined_noise_by_hand():
    token = np.array([[0.3, 0.0], [1.0, 2.0]])
    members = np.array([[[1.0, 2.0], [0.0, 5.0]], [[3.0, 2.0], [0.0, 1.0]], [[2.0, 2.0], [0.0, 3.0]]])  # K = 3
    # s^2 per cell (ddof 1): [[1, 0], [0, 4]]; divided by K = 3
    expected = np.sqrt(token**2 + np.array([[1.0, 0.0], [0.0, 4.0]]) / 3)
    np.testing.assert_allclose(combined_noise(token, members), expected, rtol=1e-12)
    assert (combined_noise(token, members) >= token).all()
    np.testing.assert_array_equal(combined_noise(token, members[:1]), token)  # one model: the token rule itself
    with pytest.raises(DataError, match="member_credit must be"):
        combined_noise(token, members[:, :1])


def _gpt2(directory, chars, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _save_char_gpt2(directory, chars)
    return str(directory)


def test_repeated_model_directories_average_and_share_one_tokenizer(tmp_path, capsys):
    write_inputs(tmp_path)
    chars = sorted(set("".join(DOCS.values())))
    a, b = _gpt2(tmp_path / "a", chars, 1), _gpt2(tmp_path / "b", chars, 2)
    both, ledger, out = _run(tmp_path, "ab", "--model", a, "--model", b)
    one_a, ledger_a, _ = _run(tmp_path, "a-only", "--model", a)
    one_b, ledger_b, _ = _run(tmp_path, "b-only", "--model", b)
    np.testing.assert_allclose(both.values, (one_a.values + one_b.values) / 2, rtol=1e-5, atol=1e-7)
    audit = ledger["audit"]
    assert [(m["source"], m["seed"], m["digest"]) for m in audit["models"]] == \
        [(a, None, ledger_a["audit"]["model"]), (b, None, ledger_b["audit"]["model"])]
    assert "Scores averaged over 2 models" in (out / "credit.html").read_text()

    # another character order: same size, other ids; then a smaller vocabulary
    _save_char_gpt2(tmp_path / "reordered", chars[::-1])
    reordered = re.escape(str(tmp_path / "reordered"))
    refused(tmp_path, capsys, rf"--model {reordered}: its tokenizer differs from that of --model {re.escape(a)} "
            r"\(token '.' has id \d+ against \d+\)", "--model", a, "--model", str(tmp_path / "reordered"),
            "--out", str(tmp_path / "bad1"))
    _save_char_gpt2(tmp_path / "fewer", chars[:-1])
    fewer = re.escape(str(tmp_path / "fewer"))
    refused(tmp_path, capsys, rf"--model {fewer}: its tokenizer differs .* \(\d+ tokens against \d+\)",
            "--model", a, "--model", str(tmp_path / "fewer"), "--out", str(tmp_path / "bad2"))
    refused(tmp_path, capsys, "is given twice", "--model", a, "--model", str(tmp_path / "a" / "."),
            "--out", str(tmp_path / "bad3"))
    refused(tmp_path, capsys, "--seeds trains that many character models", "--model", a, "--seeds", "2",
            "--out", str(tmp_path / "bad4"))
    assert not any((tmp_path / f"bad{k}").exists() for k in range(1, 5))
