"""Post-hoc attribution on Fashion-MNIST (or digits when the Debian data package is absent): Grad-Dot, EK-FAC
influence, TRAK and SOURCE, compared by LDS on a small ground truth.

    apt-get install dataset-fashion-mnist   # optional: without it, the example uses sklearn's digits
    python examples/posthoc_methods.py
"""

import numpy as np
import torch

import datacredit as dc
from datacredit.evaluate import ClassifierRecipe, Execution, SubsetConfig, build_groundtruth


def load(n_train: int):
    try:
        train = dc.data.load_fashion_mnist(split="train", limit=n_train)
        test = dc.data.load_fashion_mnist(split="test", limit=200)
        return "fashion-mnist", train, test
    except dc.DataError as exc:
        print(f"({exc.args[0].splitlines()[0]} — using digits instead)")
        train, test = dc.data.load_digits()
        return "digits", train.subset(np.arange(min(n_train, len(train)))), test


def main(n_train: int = 1000, m: int = 20, out: str = "runs/posthoc-example") -> dict:
    name, train, test = load(n_train)
    queries = test.subset(np.arange(20))
    d_in = train.tensors[0].shape[1]
    recipe = ClassifierRecipe(d_in, 10, hidden=(32,), epochs=10)
    torch.manual_seed(0)
    model = recipe.build()
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9)
    recorder = dc.TrajectoryRecorder(model, f"{out}/trajectory", optimizer=opt, every=30, overwrite=True)
    x, y = train.tensors
    task = dc.ClassificationTask()
    gen = torch.Generator().manual_seed(0)
    for _ in range(recipe.epochs):  # an ordinary loop, checkpointing for SOURCE
        for idx in torch.randperm(len(x), generator=gen).split(recipe.batch_size):
            opt.zero_grad()
            task.loss(model, (x[idx], y[idx])).mean().backward()
            opt.step()
            recorder.step()
    model.eval()
    trajectory = recorder.trajectory()
    methods = {
        "grad-dot": dc.GradDot(model, task, progress=False),
        "influence-ekfac": dc.Influence(model, task, curvature="ekfac", progress=False),
        "trak": dc.TRAK(model, dc.ClassificationTask(measurement="margin"), progress=False),
        "source": dc.Source(model, task, trajectory.select(np.linspace(0, len(trajectory) - 1, 6).astype(int)),
                         segments=3, progress=False),
    }
    # what the ground truth is (m random halves, one training seed each) and how it runs (2 worker processes)
    gt = build_groundtruth(recipe, train, queries, f"{out}/gt", SubsetConfig(m=m, alpha=0.5, seeds=1),
                           execution=Execution(workers=2, progress=False))
    results = {}
    for method_name, method in methods.items():
        scores = method.fit(train).score(queries)
        results[method_name] = dc.evaluate.lds(scores, gt, bootstrap=100).mean
        print(f"{name} {method_name:16s} LDS {results[method_name]:+.3f}")
    return results


if __name__ == "__main__":
    main()
