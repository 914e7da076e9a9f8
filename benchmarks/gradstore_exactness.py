"""Scores of Grad-Dot, TracIn and TRAK (fixed ridge) on a digits MLP, saved to an .npz, to compare two trees.

    PYTHONPATH=/tmp/f-old .venv/bin/python benchmarks/gradstore_exactness.py /tmp/old.npz
    PYTHONPATH=$PWD .venv/bin/python benchmarks/gradstore_exactness.py /tmp/new.npz --compare /tmp/old.npz

MLP 64-32-10 trained 3 × 2 epochs (a checkpoint after each), 1,438 training × 100 test queries, float32. Grad-Dot /
Grad-Cos / TracIn with projection 256 (kronecker and gaussian), TracIn exact, TRAK ridge 0.1 with 2 members at
projection 512 and none, self-scores; each with and without ``store=``. Prints the largest relative difference per
matrix when ``--compare`` is given.
"""

import argparse
import copy
import sys
import tempfile
import time

import numpy as np
import torch

torch.set_num_threads(1)
import datacredit  # noqa: E402
from datacredit import TRAK, ClassificationTask, GradDot, TracIn  # noqa: E402
from datacredit.data import load_digits  # noqa: E402
from datacredit.models import mlp  # noqa: E402
from datacredit.training import train_classifier  # noqa: E402
from datacredit.trajectory import Trajectory  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--compare", default=None)
args = parser.parse_args()
print(datacredit.__file__, file=sys.stderr)
train, test = load_digits()
test = test.subset(np.arange(100))
torch.manual_seed(0)
model = mlp(64, 32, 10)
states = []
for e in range(3):
    train_classifier(model, train, epochs=2, seed=e)
    states.append(copy.deepcopy(model.state_dict()))
traj = Trajectory.from_states(states, lrs=[0.05, 0.03, 0.01])
task, margin = ClassificationTask(), ClassificationTask(measurement="margin")
out, times = {}, {}
for store in (None, "store"):
    d = None if store is None else tempfile.mkdtemp()

    def st(name, d=d):
        return None if d is None else f"{d}/{name}"

    kw = {"progress": False}
    for kind in ("kronecker", "gaussian"):
        t = time.process_time()
        proj = {"projection": 256, "projection_kind": kind}
        out[f"graddot-{kind}-{store}"] = GradDot(model, task, **proj, store=st(f"gd-{kind}"), **kw
                                                  ).fit(train).score(test).values
        out[f"gradcos-{kind}-{store}"] = GradDot(model, task, **proj, normalize=True, store=st(f"gc-{kind}"), **kw
                                                  ).fit(train).score(test).values
        out[f"tracin-{kind}-{store}"] = TracIn(model, task, traj, **proj, store=st(f"ti-{kind}"), **kw
                                                ).fit(train).score(test).values
        out[f"tracin-self-{kind}-{store}"] = TracIn(model, task, traj, **proj, store=st(f"ti-{kind}"), **kw
                                                     ).fit(train).self_scores().values
        times[f"{kind}-{store}"] = time.process_time() - t
    for proj in (512, None):
        tr = TRAK(model, margin, [states[-1], states[-2]], projection=proj, projection_kind="gaussian", ridge=0.1,
                  store=st(f"trak-{proj}"), **kw).fit(train)
        out[f"trak-{proj}-{store}"] = tr.score(test).values
        out[f"trak-self-{proj}-{store}"] = tr.self_scores().values
    out[f"tracin-exact-{store}"] = TracIn(model, task, traj, store=st("ti-exact"), **kw).fit(train).score(test).values
out = {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
np.savez(args.out, **out)
print(times, file=sys.stderr)
if args.compare:
    old = np.load(args.compare)
    for k in old.files:
        diff = np.abs(old[k] - out[k]).max() / np.abs(old[k]).max()
        print(f"{k:32s} max |diff| / max |old| = {diff:.2e}   bitwise equal: {np.array_equal(old[k], out[k])}")
