"""Benchmark: the arithmetic floor of first-order In-Run on the MLP of ``inrun_overhead.py`` (issue 16).

A hand-written step that does only the arithmetic In-Run's exact first order needs, with none of the library's
checks, capture rules or bookkeeping, timed against plain training and against ``InRunShapley`` in one process
(interleaved, 1 thread, CPU time):

* SGD: the validation forward (32 rows) and a backward to the three Linear outputs; in the training backward, each
  layer's ghost dot ``Σ_q (u·u_q)(v·v_q)`` (bias: ``Σ_q u·u_q``) from hooks on the output tensors; ``s`` times the
  summed dots;
* Adam: the validation gradient of every parameter (forward + backward), ``s ⊙ g_val`` (:func:`precondition`), and one
  val-first dot ``u_zᵀ (s ⊙ G_val) v_z`` per layer with the training inputs and output gradients.

What the library costs above this line is Python and dispatch; what this costs above plain is the floor of the
method on this model. The values of the hand-written step are checked against the library's (relative error).

Usage: ``python benchmarks/inrun_mlp_floor.py [--steps 200]``
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from datacredit import ClassificationTask, InRunShapley
from datacredit.data import load_fashion_mnist
from datacredit.models import mlp
from datacredit.optimizers import precondition


def run(opt_name: str, batches: list, task: ClassificationTask, xv: torch.Tensor, yv: torch.Tensor,
        steps: int) -> None:
    """Time plain, floor and library on one optimizer and print the ratios."""
    def make():
        torch.manual_seed(0)
        model = mlp(784, [512, 256], 10)
        opt = (torch.optim.SGD(model.parameters(), lr=0.05) if opt_name == "SGD"
               else torch.optim.Adam(model.parameters(), lr=1e-3))
        return model, opt

    models = {name: make() for name in ("plain", "floor", "library")}
    shapley = InRunShapley(*models["library"][:1], task, validation=(xv, yv), optimizer=models["library"][1])
    floor_values: dict[int, float] = {}
    lins = [m for m in models["floor"][0] if isinstance(m, torch.nn.Linear)]

    def plain(k: int) -> None:
        model, opt = models["plain"]
        task.loss(model, batches[k % 24][1]).mean().backward()
        opt.step()
        opt.zero_grad()

    def library(k: int) -> None:
        model, opt = models["library"]
        ids, batch = batches[k % 24]
        with shapley.step(ids):
            task.loss(model, batch).mean().backward()
        opt.step()
        opt.zero_grad()

    def floor(k: int) -> None:
        model, opt = models["floor"]
        ids, batch = batches[k % 24]
        h, ins, outs = xv, [], []
        for j, lin in enumerate(lins):  # the validation forward, keeping each Linear's input and output
            ins.append(h)
            out = lin(h)
            outs.append(out)
            h = torch.relu(out) if j < len(lins) - 1 else out
        val_loss = -h.log_softmax(-1).gather(1, yv[:, None]).sum()
        params = [p for lin in lins for p in (lin.weight, lin.bias)]
        if opt_name == "SGD":
            u_val = torch.autograd.grad(val_loss, outs)
        else:
            g_val = torch.autograd.grad(val_loss, params)
        dots, train_in, train_gout = [], [], []

        def forward_hook(module, inputs, output, j=None):
            a = inputs[0].detach()
            j = len(train_in)
            train_in.append(a)

            def on_grad(g):
                if opt_name == "SGD":  # ghost dots, weight and bias, scaled by 1/N of the mean loss later
                    uu = g @ u_val[j].T
                    dots.append((uu * (a @ ins[j].detach().T)).sum(1) + uu.sum(1))
                else:
                    train_gout.append((j, g))

            output.register_hook(on_grad)

        handles = [lin.register_forward_hook(forward_hook) for lin in lins]
        task.loss(model, batch).mean().backward()
        for handle in handles:
            handle.remove()
        if opt_name == "SGD":
            phi = torch.stack(dots).sum(0) * opt.param_groups[0]["lr"]
        else:
            scaled = precondition(opt, dict(zip(params, g_val)))
            phi = 0
            for j, g in train_gout:
                lin = lins[j]
                phi = phi + ((g @ scaled[lin.weight]) * train_in[j]).sum(1) + g @ scaled[lin.bias]
        for i, v in zip(ids.tolist(), phi.tolist()):
            floor_values[i] = floor_values.get(i, 0.0) + v
        opt.step()
        opt.zero_grad()

    variants = {"plain": plain, "floor": floor, "library": library}
    cpu = {name: [] for name in variants}
    load = [os.getloadavg()[0]]
    for k in range(steps + 5):
        order = list(variants)[k % 3:] + list(variants)[: k % 3]
        for name in order:
            start = time.process_time()
            variants[name](k)
            if k >= 5:
                cpu[name].append(time.process_time() - start)
    load.append(os.getloadavg()[0])
    med = {name: float(np.median(v)) for name, v in cpu.items()}
    scores = shapley.values()
    lib = dict(zip(scores.train_ids.tolist(), scores.values[:, 0].tolist()))
    keys = sorted(lib)
    a = np.array([lib[i] for i in keys])
    b = np.array([floor_values[i] for i in keys])  # hooks see the mean loss: the 1/64 is in already
    print(f"{opt_name}: plain {1e3 * med['plain']:.2f} ms CPU; floor {med['floor'] / med['plain']:.2f}x; "
          f"library {med['library'] / med['plain']:.2f}x; floor vs library values rel. err "
          f"{np.linalg.norm(a - b) / np.linalg.norm(a):.1e}; load {load[0]:.2f}-{load[1]:.2f}")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train = load_fashion_mnist(split="train", limit=64 * 24, seed=0)
    test = load_fashion_mnist(split="test", limit=256, seed=0)
    x, y = train.tensors
    xv, yv = (t[:32] for t in test.tensors)
    batches = [(train.ids[k * 64:(k + 1) * 64], (x[k * 64:(k + 1) * 64], y[k * 64:(k + 1) * 64])) for k in range(24)]
    task = ClassificationTask()
    for opt_name in ("SGD", "Adam"):
        run(opt_name, batches, task, xv, yv, args.steps)


if __name__ == "__main__":
    main()
