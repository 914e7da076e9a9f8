"""Own projected routes (no ``store=``) of Grad-Dot and TRAK before/after issue 17 moved them onto GradientStore.

fmnist-mlp (5,000 training images, MLP 784-64-10 trained 5 epochs here, untimed), 500 queries, then a second round
of 500: CPU seconds (``time.process_time``, one torch thread) of fit + score and of the second round. One JSON line
per run; run the two trees alternately in fresh processes (the machine is shared)::

    git worktree add --detach /tmp/f-old f9e8d42      # before issue 17's structural work
    for i in 1 2; do for t in /tmp/f-old /work/main; do
        PYTHONPATH=$t .venv/bin/python benchmarks/gradstore_own_routes.py >> out.jsonl; done; done
"""

import json
import os
import resource
import time

import numpy as np
import torch

torch.set_num_threads(1)
from gradstore_methods import trained_mlp  # noqa: E402  (benchmarks/, the script's directory)

import datacredit as dc  # noqa: E402  (after the thread setting)
from datacredit.data import load_fashion_mnist  # noqa: E402

train = load_fashion_mnist(split="train", limit=5000, seed=0)
test_all = load_fashion_mnist(split="test", limit=1000, seed=0)
q1, q2 = test_all.subset(np.arange(500)), test_all.subset(np.arange(500, 1000))
model = trained_mlp(train)
task, margin = dc.ClassificationTask(), dc.ClassificationTask(measurement="margin")
kw = {"batch_size": 64, "progress": False}


def cpu(fn):
    t, w = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - t, time.perf_counter() - w


row = {"tree": dc.__file__.split("/datacredit/")[0], "load": list(os.getloadavg())}
dot = dc.GradDot(model, task, projection=512, projection_kind="gaussian", **kw)
_, row["graddot_fit_score_cpu"], row["graddot_fit_score_wall"] = cpu(lambda: dot.fit(train).score(q1))
_, row["graddot_round2_cpu"], _ = cpu(lambda: dot.score(q2))
trak = dc.TRAK(model, margin, projection=512, **kw)
_, row["trak_fit_score_cpu"], row["trak_fit_score_wall"] = cpu(lambda: trak.fit(train).score(q1))
_, row["trak_round2_cpu"], _ = cpu(lambda: trak.score(q2))
row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(row))
