"""In-Run Data Shapley in an ordinary PyTorch training loop: two added lines.

Trains an MLP on sklearn's digits with 10 % of the labels flipped, values every training example while it trains
(second order, Adam), and shows that the lowest-valued examples are mostly the flipped ones.

    python examples/inrun_plain_loop.py
"""

import numpy as np
import torch

import datacredit as dc
from datacredit.models import mlp


def main(epochs: int = 5) -> float:
    torch.manual_seed(0)
    clean, test = dc.data.load_digits()
    train, flipped = dc.data.flip_labels(clean, 0.1, seed=0, num_classes=10)
    model = mlp(64, 64, 10)
    task = dc.ClassificationTask()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    validation = test.tensors  # a clean validation batch: values say who lowered its loss

    shapley = dc.InRunShapley(model, task, validation=validation, optimizer=opt, order=2)
    x, y = train.tensors
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            with shapley.step(train.ids[idx.numpy()]):  # added line 1: record this batch
                task.loss(model, (x[idx], y[idx])).mean().backward()
            opt.step()  # added line 2 is nothing: values are computed in the optimizer's pre-step hook
            opt.zero_grad()

    values = shapley.values()  # Scores (n_train, 1); positive = lowered the validation loss
    result = dc.evaluate.mislabel_detection(values, flipped, higher_is_suspicious=False)
    lowest = [i for i, _ in values.bottomk(20)]
    print(f"{len(np.intersect1d(lowest, flipped))} of the 20 lowest-valued examples have flipped labels "
          f"(chance: {20 * len(flipped) / len(train):.0f}); mislabel AUROC {result['auroc']:.3f}")
    return result["auroc"]


if __name__ == "__main__":
    main()
