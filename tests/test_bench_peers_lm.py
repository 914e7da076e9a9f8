"""Language-model peers (benchmarks/bench/peers_lm.py) agree with our methods of the same definition, on a tiny
GPT-2 built from a config and on the bench's TinyGPT; skipped where the peer is not installed.

Thresholds: dattri-llm's TracIn at one checkpoint and our Grad-Dot are the same exact numbers in float32 (measured
relative error 6e-7), so per-query Pearson ≥ 0.9999 and a relative error ≤ 1e-4. The three EK-FACs fit the same
empirical Fisher with the same relative damping; they agreed to Pearson 0.9999998 (dattri-llm) and 0.999999999
(bergson) on a GPT-2 with d=64: the bound 0.999 leaves room for float32 eigendecompositions on another machine while
a sign flip, a missing bias exclusion (0.72 here), a dropped layer or a different damping rule falls far below it.
bergson's Grad-Dot is a random projection (k = 16 per side): only its sign and rough agreement are checked
(Pearson ≥ 0.5 with exact Grad-Dot, 0.7–0.9 measured; a flipped sign gives ≤ −0.5).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.bench.peers import installed
from benchmarks.bench.peers_lm import bergson_graddot, bergson_influence, dattri_llm_scores, lm_loss
from datacredit.dataset import ArrayDataset
from datacredit.methods import GradDot, Influence
from datacredit.task import LanguageModelingTask

V, T, N, Q, BATCH = 29, 16, 24, 3, 8

needs_dattri_llm = pytest.mark.skipif(not installed("dattri_llm"), reason="dattri-llm is not installed (make peers)")
needs_bergson = pytest.mark.skipif(not installed("bergson"), reason="bergson is not installed (make peers)")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1])]))


@pytest.fixture(scope="module")
def gpt2():
    """A tiny GPT-2 with only its Conv1D weights trainable (frozen biases: dattri-llm's trap), its windows (one
    training window and one query repeated: dattri-llm's ``agnostic_matrix`` would double the repeated training
    row), and our exact Grad-Dot and EK-FAC on them."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=V, n_positions=BATCH * (T + 1), n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("transformer.h.") and name.endswith(".weight") and ".ln_" not in name)
    gen = torch.Generator().manual_seed(1)
    train, queries = torch.randint(0, V, (N, T + 1), generator=gen), torch.randint(0, V, (Q, T + 1), generator=gen)
    train[5], queries[2] = train[2], queries[0]  # duplicates: dattri-llm keys samples by content
    task = LanguageModelingTask(reduction="sum")
    exact = GradDot(model, task, batch_size=BATCH, progress=False).fit(ArrayDataset(train))
    ekfac = Influence(model, task, curvature="ekfac", batch_size=BATCH, progress=False).fit(ArrayDataset(train))
    return {"model": model, "train": train, "queries": queries,
            "graddot": np.asarray(exact.score(ArrayDataset(queries)).values, dtype=np.float64),
            "ekfac": np.asarray(ekfac.score(ArrayDataset(queries)).values, dtype=np.float64)}


@needs_dattri_llm
def test_dattri_llm_tracin_is_exact_graddot(gpt2, tmp_path):
    values = dattri_llm_scores(gpt2["model"], gpt2["train"], gpt2["queries"], "tracin", tmp_path,
                               loss=lm_loss("sum"), batch_size=BATCH)
    assert values.shape == (N, Q)
    assert pearson(values, gpt2["graddot"]) > 0.9999
    assert np.abs(values - gpt2["graddot"]).max() <= 1e-4 * np.abs(gpt2["graddot"]).max()


@needs_dattri_llm
def test_dattri_llm_ekfac_agrees_with_ours(gpt2, tmp_path):
    values = dattri_llm_scores(gpt2["model"], gpt2["train"], gpt2["queries"], "ekfac", tmp_path,
                               loss=lm_loss("sum"), batch_size=BATCH)
    assert pearson(values, gpt2["ekfac"]) > 0.999


@needs_bergson
def test_bergson_ekfac_agrees_with_ours(gpt2, tmp_path):
    values, times = bergson_influence(gpt2["model"], gpt2["train"], gpt2["queries"], tmp_path, batch_size=BATCH)
    assert values.shape == (N, Q)
    assert pearson(values, gpt2["ekfac"]) > 0.999
    assert times["fit_cpu_s"] > 0 and times["score_cpu_s"] > 0


@needs_bergson
def test_bergson_graddot_has_our_sign(gpt2, tmp_path):
    values, _ = bergson_graddot(gpt2["model"], gpt2["train"], gpt2["queries"], tmp_path, k=16, batch_size=BATCH)
    assert values.shape == (N, Q)
    assert pearson(values, gpt2["graddot"]) > 0.5


@needs_dattri_llm
def test_dattri_llm_tracin_on_tinygpt_covers_every_parameter(tmp_path):
    """The bench's text-gpt model (TinyGPT: embeddings, LayerNorms, Linear layers with biases, all trainable):
    dattri-llm's TracIn over every layer it captures equals our Grad-Dot over every parameter, mean reduction."""
    from datacredit.models import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(V, d=16, n_layers=1, n_heads=2, max_len=T, tied=False).eval()
    gen = torch.Generator().manual_seed(2)
    train, queries = torch.randint(0, V, (N, T + 1), generator=gen), torch.randint(0, V, (Q, T + 1), generator=gen)
    ours = GradDot(model, LanguageModelingTask(), batch_size=BATCH, progress=False).fit(ArrayDataset(train))
    ours = np.asarray(ours.score(ArrayDataset(queries)).values, dtype=np.float64)
    values = dattri_llm_scores(model, train, queries, "tracin", tmp_path, loss=lm_loss("mean"), batch_size=BATCH)
    assert pearson(values, ours) > 0.9999
    assert np.abs(values - ours).max() <= 1e-4 * np.abs(ours).max()
