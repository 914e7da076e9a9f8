"""Influence on digits logistic regression: fit+score time per curvature, Pearson r with the explicit Hessian."""
import sys
import time

import numpy as np
import torch

from datacredit.curvature import Damping
from datacredit.data import load_digits
from datacredit.methods.influence import Influence
from datacredit.models import mlp
from datacredit.task import ClassificationTask
from datacredit.training import train_classifier

threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
torch.set_num_threads(threads)
device = sys.argv[2] if len(sys.argv) > 2 else "cpu"
torch.manual_seed(0)
train, test = load_digits(seed=0)
model = train_classifier(mlp(64, [], 10), train).to(device)
acc = (model(test.tensors[0].to(device)).argmax(1).cpu() == test.tensors[1]).float().mean().item()
queries = test.subset(np.arange(50))
task = ClassificationTask()
print(f"digits LR: {len(train)} train, {len(queries)} queries, {sum(p.numel() for p in model.parameters())} params, "
      f"test acc {acc:.3f}, threads {threads}, device {device}")
for damping in (Damping(absolute=1e-3), Damping(absolute=1e-2), Damping(relative=0.1)):
    results, times = {}, {}
    for name in ("explicit", "cg", "ekfac", "kfac", "diagonal", "identity", "ekfac:true", "kfac:true", "diagonal:true"):
        if name == "cg" and damping.relative:
            continue
        cname, _, fisher = name.partition(":")
        inf = Influence(model, task, curvature=cname, damping=damping, batch_size=256,
                        fisher=fisher or "empirical", progress=False)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        inf.fit(train)
        t1 = time.perf_counter()
        results[name] = inf.score(queries).values
        if device == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        times[name] = (t1 - t0, t2 - t1)
    print(f"\ndamping {damping}")
    for name, v in results.items():
        r = np.corrcoef(v.ravel(), results["explicit"].ravel())[0, 1]
        per_q = np.mean([np.corrcoef(v[:, q], results["explicit"][:, q])[0, 1] for q in range(v.shape[1])])
        print(f"  {name:9s} fit {times[name][0]:7.3f} s  score {times[name][1]:7.3f} s  total {sum(times[name]):7.3f} s"
              f"  pearson vs explicit: all {r:.4f}  per-query mean {per_q:.4f}")
