"""The end-to-end demo on bundled data (sklearn digits, no download): train, attribute, show who helped whom."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import load_digits
from .data.dataset import ArrayDataset
from .methods import GradDot
from .models import mlp
from .scores import Scores
from .task import ClassificationTask

SHADES = " .:-=+*#%@"


def train_classifier(model: torch.nn.Module, train: ArrayDataset, epochs: int = 30, lr: float = 0.05,
                     batch_size: int = 64, seed: int = 0, progress: bool = True) -> torch.nn.Module:
    """Plain mini-batch SGD with momentum on a classification ArrayDataset ``(x, y)``; returns the model."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = train.tensors
    model.train()
    for _ in tqdm(range(epochs), desc="train", disable=not progress, leave=False):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model


def ascii_digit(pixels: torch.Tensor) -> list[str]:
    """An 8×8 image in [0, 1] as 8 lines of characters, two per pixel so it keeps its shape."""
    img = pixels.reshape(8, 8).clamp(0, 1)
    return ["".join(SHADES[int(v * (len(SHADES) - 1))] * 2 for v in row) for row in img]


def show_query(scores: Scores, q: int, train: ArrayDataset, test: ArrayDataset, k: int = 3) -> str:
    """The query image beside its top-k proponents (helped most) and opponents (hurt most)."""
    by_id = {int(i): r for r, i in enumerate(train.ids)}
    qx, qy = test[q]
    panels = [(f"query {int(test.ids[q])} (y={int(qy)})", qx)]
    for label, items in (("+", scores.topk(k, q)), ("-", scores.bottomk(k, q))):
        for train_id, value in items:
            x, y = train[by_id[train_id]]
            panels.append((f"{label} id {train_id} y={int(y)} {value:+.2g}", x))
    width = max(len(t) for t, _ in panels) + 2
    grids = [ascii_digit(x) for _, x in panels]
    lines = ["".join(t.ljust(width) for t, _ in panels)]
    lines += ["".join(g[r].ljust(width) for g in grids) for r in range(8)]
    return "\n".join(lines)


def run_demo(n_queries: int = 3, seed: int = 0, progress: bool = True) -> dict[str, Scores]:
    """Train an MLP on digits, score test images with Grad-Dot and Grad-Cos, print proponents and opponents."""
    torch.manual_seed(seed)
    train, test = load_digits(seed=seed)
    print(f"digits: {len(train)} training and {len(test)} test images (bundled with scikit-learn, no download)")
    model = train_classifier(mlp(64, 64, 10), train, progress=progress)
    accuracy = (model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
    print(f"MLP 64-64-10 trained: test accuracy {accuracy:.3f}")

    rng = np.random.default_rng(seed)
    queries = test.subset(np.sort(rng.choice(len(test), n_queries, replace=False)))
    task = ClassificationTask()
    results = {}
    for method in (GradDot(model, task, progress=progress), GradDot(model, task, normalize=True, progress=progress)):
        start = time.perf_counter()
        results[method.name] = method.fit(train).score(queries)
        print(f"{method.name}: {len(train)} × {len(queries)} scores in {time.perf_counter() - start:.2f} s")

    print("\nPositive score = the training image helps the query (lowers its loss). Grad-Cos:")
    for q in range(len(queries)):
        print()
        print(show_query(results["grad-cos"], q, train, queries))
    return results
