"""ClassificationTask's hand-written cross-entropy: the same numbers as torch's, and bad labels refused by name."""

import pytest
import torch
import torch.nn.functional as F

from datacredit import ClassificationTask
from datacredit.errors import DataError


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_equals_torch_cross_entropy_and_its_gradient(dtype):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 7).to(dtype)
    x, y = torch.randn(64, 5, dtype=dtype) * 30, torch.randint(0, 7, (64,))  # large logits: log_softmax's stability
    ours = ClassificationTask().loss(model, (x, y))
    ref = F.cross_entropy(model(x), y, reduction="none")
    assert ours.shape == (64,)
    assert torch.equal(ours, ref)
    g_ours = torch.autograd.grad(ours.sum(), model.weight)[0]
    g_ref = torch.autograd.grad(ref.sum(), model.weight)[0]
    assert torch.equal(g_ours, g_ref)


@pytest.mark.parametrize("labels", [torch.zeros(4), torch.zeros(4, 1, dtype=torch.long),
                                    torch.zeros(3, dtype=torch.long)])
def test_labels_that_are_not_class_indices_are_refused(labels):
    with pytest.raises(DataError, match="class indices"):
        ClassificationTask().loss(torch.nn.Linear(2, 3), (torch.randn(4, 2), labels))
