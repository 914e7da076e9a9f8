"""Attribution of generated completions: per-token queries, the completion-only mask, sources, planted checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datacredit import GradDot, Influence, InRunShapley, Scores
from datacredit.data import CharDataset
from datacredit.dataset import ArrayDataset, example_ids
from datacredit.errors import DataError
from datacredit.generation import CompletionTask, attribute_completions, completion_credit, completion_queries
from datacredit.ledger import UNALLOCATED, compensation
from datacredit.models import TinyGPT
from datacredit.sources import Sources

from .helpers import flat, torch_func_grads

DOCS = {
    "owls": "owls hoot at night in old oak woods. ",
    "bread": "knead dough, bake bread until golden. ",
    "rivers": "rivers run past mills, under bridges. ",
}


def corpus():
    vocab = sorted(set("".join(DOCS.values())) | set("#"))
    rows, keys = [], []
    for name, text in DOCS.items():
        ds = CharDataset(text * 4, seq_len=24, stride=4, vocab=vocab)
        rows.append(ds.tensors[0])
        keys += [name] * len(ds)
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.integers(0, len(vocab), size=(12, 25)))
    tokens = torch.cat([*rows, noise])
    keys += ["noise"] * len(noise)
    ids = np.arange(len(tokens))
    return ArrayDataset(tokens, ids=ids), Sources(ids, keys), CharDataset("".join(DOCS.values()), 4, vocab=vocab)


def fit(tokens: torch.Tensor, vocab_size: int) -> TinyGPT:
    """150 full-batch Adam steps from seed 0 (deterministic: retraining on a subset is a controlled comparison)."""
    torch.manual_seed(0)
    model = TinyGPT(vocab_size, d=16, n_layers=1, n_heads=2, max_len=32, tied=False).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    task = CompletionTask(reduction="mean")
    for _ in range(150):
        opt.zero_grad()
        task.loss(model, (tokens,)).mean().backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    train, sources, coder = corpus()
    return fit(train.tensors[0], coder.vocab_size), train, sources, coder


def test_mask_counts_only_completion_targets():
    q, output_of, token_of = completion_queries([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]])
    tokens, mask = q.tensors
    assert output_of.tolist() == [0, 0, 1, 1, 1] and token_of.tolist() == [0, 1, 0, 1, 2]
    assert mask.sum(1).tolist() == [1] * 5
    # query 0 predicts token 5 from [1, 2, 3]: target index 2; query 2 predicts 7 from [4]: index 0
    assert mask[0].nonzero().item() == 2 and tokens[0, 3].item() == 5
    assert mask[2].nonzero().item() == 0 and tokens[2, 1].item() == 7
    whole, _, token_of = completion_queries([[1, 2, 3]], [[5, 6]], per_token=False)
    assert whole.tensors[1][0].tolist() == [False, False, True, True] and token_of.tolist() == [-1]


def test_bad_outputs_are_refused_by_name():
    with pytest.raises(DataError, match="output 1: empty completion"):
        completion_queries([[1], [2]], [[3], []])
    with pytest.raises(DataError, match="output 0: token ids outside"):
        completion_queries([[1]], [[99]], vocab_size=10)
    with pytest.raises(DataError, match="exceed the model's context"):
        completion_queries([[1] * 10], [[2] * 10], max_len=8)
    with pytest.raises(DataError, match="CompletionTask"):
        attribute_completions(object(), [[1]], [[2]], Sources([0], ["a"]))


def test_per_token_scores_sum_to_the_completion_and_match_torch_func(trained, float64):
    model, train, sources, coder = trained
    prompt, completion = coder.encode("owls "), coder.encode("hoot")
    task = CompletionTask()
    method = GradDot(model, task, progress=False).fit(train)
    credit = attribute_completions(method, [prompt], [completion], sources, vocab_size=coder.vocab_size)
    whole_q, _, _ = completion_queries([prompt], [completion], per_token=False)
    whole = method.score(whole_q).values[:, 0]
    np.testing.assert_allclose(credit.scores.values.sum(1), whole, rtol=1e-9, atol=1e-12)
    names = [n for n, _ in model.named_parameters()]
    g_train = flat(torch_func_grads(model, task, (train.tensors[0],)), names)
    g_query = flat(torch_func_grads(model, task, whole_q.tensors, measurement=True), names)
    np.testing.assert_allclose(whole, (g_train @ g_query.T)[:, 0].numpy(), rtol=1e-8, atol=1e-10)
    assert credit.outputs.values.shape == (4, 1) and credit.per_token[0].values.shape == (4, len(completion))
    np.testing.assert_allclose(credit.per_token[0].values.sum(1), credit.outputs.values[:, 0])


def test_planted_verbatim_source_ranks_first_and_noise_gets_no_pay(trained):
    """EK-FAC influence on the trained model. (Grad-Dot ranks the owls source first for "rivers run | past mills"
    here: without curvature, the examples the model fits worst dominate every dot product.)"""
    model, train, sources, coder = trained
    method = Influence(model, CompletionTask(), curvature="ekfac", progress=False).fit(train)
    prompts = [coder.encode("knead dough, "), coder.encode("rivers run "), coder.encode("owls ")]
    completions = [coder.encode("bake bread"), coder.encode("past mills"), coder.encode("hoot at night")]
    credit = attribute_completions(method, prompts, completions, sources)
    expected = ["bread", "rivers", "owls"]
    for n, name in enumerate(expected):
        assert credit.outputs.ranking(n)[0][0] == name
    noise = list(credit.outputs.names).index("noise")
    ledger = compensation(credit.outputs, 1.0, noise=credit.noise)
    assert sum(line["paid"] for line in ledger.lines if line["source"] == "noise") == 0
    assert credit.outputs.values[noise].max() < credit.outputs.values.max(0).min()
    for n, name in enumerate(expected):
        paid = {line["source"]: line["paid"] for line in ledger.lines if line["output"] == n}
        assert sum(paid.values()) == pytest.approx(1.0)
        # the largest payment goes to the planted source, unless no source's credit clears the noise rule
        assert max(paid, key=paid.get) in (name, UNALLOCATED)


def test_random_characters_get_no_credit_and_retraining_agrees(trained):
    """The issue's planted check: a source of random characters gets <= 0 credit for every completion, and that is
    true under retraining (the same 150 steps without the noise source lower every completion's loss)."""
    model, train, sources, coder = trained
    prompts = [coder.encode("knead dough, "), coder.encode("rivers run "), coder.encode("owls ")]
    completions = [coder.encode("bake bread"), coder.encode("past mills"), coder.encode("hoot at night")]
    noise = sources.levels["source"] == "noise"
    whole, _, _ = completion_queries(prompts, completions, per_token=False)
    without = fit(train.tensors[0][~noise], coder.vocab_size)
    with torch.no_grad():
        measured = (CompletionTask().measurement(without, whole.tensors)
                    - CompletionTask().measurement(model, whole.tensors))  # positive: the noise helped
    assert (measured < 0).all(), measured
    ekfac = Influence(model, CompletionTask(), curvature="ekfac", progress=False)
    for method in (ekfac, GradDot(model, CompletionTask(), progress=False)):
        credit = attribute_completions(method.fit(train), prompts, completions, sources)
        row = credit.outputs.values[list(credit.outputs.names).index("noise")]
        assert (row <= 0).all(), (method, row)


def test_inrun_per_token_credit_equals_the_per_step_twin(float64):
    """In-Run first order with the per-token queries as its targeted validation set, two SGD steps: every
    (training example, completion token) value equals Σ_t η/B ⟨∇ℓ_tok(θ_t), ∇ℓ_z(θ_t)⟩ from torch.func, and the
    per-output credit is the sum of the tokens' (so it equals the whole completion's value by linearity)."""
    train, sources, coder = corpus()
    torch.manual_seed(0)
    model = TinyGPT(coder.vocab_size, d=8, n_layers=1, n_heads=2, max_len=32, tied=False).double()
    task, lr = CompletionTask(), 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    prompts, completions = [coder.encode("owls "), coder.encode("knead ")], [coder.encode("hoot"), coder.encode("do")]
    queries, output_of, _ = completion_queries(prompts, completions, vocab_size=coder.vocab_size)
    whole, _, _ = completion_queries(prompts, completions, per_token=False)
    shapley = InRunShapley(model, task, validation=queries, optimizer=opt, order=1, targeted=True)
    names = [n for n, _ in model.named_parameters()]
    ids, tokens = example_ids(train), train.tensors[0]
    batches = [np.arange(0, len(ids), 2), np.arange(1, len(ids), 2)]
    twin = np.zeros((len(ids), len(queries)))
    twin_whole = np.zeros((len(ids), len(whole)))
    for rows in batches:
        g_train = flat(torch_func_grads(model, task, (tokens[rows],)), names)
        g_tokens = flat(torch_func_grads(model, task, queries.tensors, measurement=True), names)
        g_whole = flat(torch_func_grads(model, task, whole.tensors, measurement=True), names)
        twin[rows] += (lr / len(rows) * g_train @ g_tokens.T).numpy()
        twin_whole[rows] += (lr / len(rows) * g_train @ g_whole.T).numpy()
        opt.zero_grad()
        with shapley.step(ids[rows]):
            task.loss(model, (tokens[rows],)).mean().backward()
        opt.step()
    shapley.close()
    scores = shapley.values()
    np.testing.assert_array_equal(scores.train_ids, ids)
    np.testing.assert_allclose(scores.values, twin, rtol=1e-8, atol=1e-12)
    credit = completion_credit(scores, output_of, sources)
    expected = sources.values(Scores(twin_whole, ids, [0, 1], "twin"))
    np.testing.assert_allclose(credit.outputs.values, expected.values, rtol=1e-8, atol=1e-12)
    assert [p.values.shape[1] for p in credit.per_token] == [4, 2]
    with pytest.raises(DataError, match="output_of has shape"):
        completion_credit(scores, output_of[:-1], sources)
