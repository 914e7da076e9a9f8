"""One gradient store under several methods vs each method featurizing on its own: fmnist-mlp, 500 queries, CPU.

    .venv/bin/python benchmarks/gradstore_methods.py --out benchmarks/results/gradstore_methods.json

Setup (built here from ``datacredit.data.load_fashion_mnist``, so it does not depend on the benchmark package being
moved): 5,000 training images (seeded subset, seed 0), 500 test queries (seed 0), MLP 784-64-10 (50,890 parameters)
trained here for 5 epochs (Adam, lr 1e-3, batch 64, seed 0; untimed). One process, one torch thread, every step timed
by process CPU seconds (and wall) side by side, in this order:

* store route: build a store of training-loss gradients once (``GradientStore``, dense Gaussian projection k), then
  Grad-Dot, influence with the store's projected Fisher (LoGra style) and influence with the identity curvature score
  on it; TRAK needs margin gradients of the training examples, so it gets a second store (``train_target=
  "measurement"``) built once and scored on. A second round of 500 other queries then shows what a new round costs.
* the same on Kronecker stores (``KronProjection(16)``, LoGra style), the cheap featurization.
* own route: ``GradDot(projection=k, "gaussian")``, ``TRAK(projection=k)`` with ``store=`` (since issue 17 these are
  GradientStores with the same projection, so the scores agree with the store route up to the order of float64
  sums; a new method object on the same ``store=`` featurizes nothing), and the influence methods that featurize on
  their own:
  ``Influence(curvature="identity")`` (exact Grad-Dot numbers), ``"kfac"`` and ``"ekfac"``.

Agreement of store and own routes: the largest relative difference of the score matrices.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}


def trained_mlp(train, epochs: int = 5) -> torch.nn.Module:
    """The MLP 784-64-10 of these benchmarks: seed 0, Adam lr 1e-3, batches of 64, ``epochs`` epochs on ``train``."""
    from datacredit.models import mlp

    torch.manual_seed(0)
    model = mlp(784, [64], 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = train.tensors
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for s in range(0, len(x), 64):
            idx = perm[s : s + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=512, help="projected dimension k (dense Gaussian)")
    parser.add_argument("--kron-k", type=int, default=16, help="KronProjection width per side")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-own-influence", action="store_true", help="leave out KFAC / EK-FAC / identity")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import datacredit as dc
    from datacredit.capture.kronecker import KronProjection
    from datacredit.data import load_fashion_mnist
    from datacredit.gradstore import DenseProjection, GradientStore

    train = load_fashion_mnist(split="train", limit=args.n_train, seed=0)
    test_all = load_fashion_mnist(split="test", limit=2 * args.queries, seed=0)
    queries = test_all.subset(np.arange(args.queries))
    queries2 = test_all.subset(np.arange(args.queries, 2 * args.queries))
    model = trained_mlp(train)

    task, margin = dc.ClassificationTask(), dc.ClassificationTask(measurement="margin")
    kw = {"batch_size": 64, "progress": False}
    rows: dict[str, dict] = {}
    scores: dict[str, np.ndarray] = {}
    tmp = Path(tempfile.mkdtemp(prefix="gradstore-methods-"))

    def record(name, fn):
        out, t = _timed(fn)
        t["peak_rss_mb_so_far"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows[name] = t
        print(f"{name:50s} cpu {t['cpu_s']:8.2f} s   wall {t['wall_s']:8.2f} s   peak RSS so far "
              f"{t['peak_rss_mb_so_far']:7.0f} MB", flush=True)
        return out

    # -- store route ---------------------------------------------------------------------------------------------
    proj = DenseProjection(args.dim, "gaussian", seed=0)
    gs = GradientStore(tmp / "loss", model, task, projection=proj, batch_size=64)
    record("store: build (loss gradients)", lambda: gs.build(train))
    built = gs.batches_featurized
    dot = dc.GradDot(model, task, features=gs, **kw)
    scores["graddot-store"] = record("store: Grad-Dot fit + score", lambda: dot.fit(train).score(queries)).values
    inf = dc.Influence(model, task, features=gs, **kw)
    scores["influence-pf-store"] = record("store: influence projected-Fisher fit + score",
                                          lambda: inf.fit(train).score(queries)).values
    ident = dc.Influence(model, task, features=gs, curvature="identity", **kw)
    record("store: influence identity fit + score", lambda: ident.fit(train).score(queries))
    gs_m = GradientStore(tmp / "margin", model, margin, projection=DenseProjection(args.dim, "gaussian", seed=0),
                         batch_size=64, train_target="measurement")
    record("store: build (margin gradients, for TRAK)", lambda: gs_m.build(train))
    trak = dc.TRAK(model, margin, features=gs_m, **kw)
    scores["trak-store"] = record("store: TRAK fit + score", lambda: trak.fit(train).score(queries)).values
    record("store: round 2, Grad-Dot score", lambda: dot.score(queries2))
    record("store: round 2, influence projected-Fisher score", lambda: inf.score(queries2))
    record("store: round 2, TRAK score", lambda: trak.score(queries2))
    featurized = {"training batches featurized (loss store)": built,
                  "all batches featurized on the loss store": gs.batches_featurized}

    # the same three methods on a Kronecker store (LoGra-style, D = 442 at k = 16): never forms d_out × d_in
    gs_k = GradientStore(tmp / "kron", model, task, projection=KronProjection(args.kron_k), batch_size=64)
    record(f"kron store: build (KronProjection({args.kron_k}), D={gs_k.dim})", lambda: gs_k.build(train))
    record("kron store: Grad-Dot fit + score", lambda: dc.GradDot(model, task, features=gs_k, **kw).fit(train)
           .score(queries))
    record("kron store: influence projected-Fisher fit + score",
           lambda: dc.Influence(model, task, features=gs_k, **kw).fit(train).score(queries))
    gs_km = GradientStore(tmp / "kron-margin", model, margin, projection=KronProjection(args.kron_k), batch_size=64,
                          train_target="measurement")
    record("kron store: build (margin gradients, for TRAK)", lambda: gs_km.build(train))
    record("kron store: TRAK fit + score", lambda: dc.TRAK(model, margin, features=gs_km, **kw).fit(train)
           .score(queries))

    # -- own route -------------------------------------------------------------------------------------------------
    # since issue 17 the own routes are GradientStores too (own_store): in store=, or a private temporary directory
    own_dot = dc.GradDot(model, task, projection=args.dim, projection_kind="gaussian", store=tmp / "own", **kw)
    scores["graddot-own"] = record("own: Grad-Dot projected fit + score",
                                   lambda: own_dot.fit(train).score(queries)).values
    own_trak = dc.TRAK(model, margin, projection=args.dim, store=tmp / "own", **kw)
    scores["trak-own"] = record("own: TRAK projected fit + score", lambda: own_trak.fit(train).score(queries)).values
    record("own: round 2, Grad-Dot projected score", lambda: own_dot.score(queries2))
    record("own: round 2, TRAK projected score", lambda: own_trak.score(queries2))
    # a new method object (another process, later) on the same store= finds the features (and finished scores)
    again = dc.GradDot(model, task, projection=args.dim, projection_kind="gaussian", store=tmp / "own", **kw)
    record("own: new Grad-Dot object, same store=, fit + score round 2", lambda: again.fit(train).score(queries2))
    featurized["own Grad-Dot store: batches featurized by the new object"] = again._features_store().batches_featurized
    again_trak = dc.TRAK(model, margin, projection=args.dim, store=tmp / "own", **kw)
    record("own: new TRAK object, same store=, fit + score round 2", lambda: again_trak.fit(train).score(queries2))
    featurized["own TRAK store: batches featurized by the new object"] = sum(
        gs.batches_featurized for gs in again_trak._stores())
    if not args.skip_own_influence:
        for curvature in ("identity", "kfac", "ekfac"):
            method = dc.Influence(model, task, curvature=curvature, **kw)
            record(f"own: influence {curvature} fit + score", lambda m=method: m.fit(train).score(queries))

    def rel(a, b):
        return float(np.abs(scores[a] - scores[b]).max() / np.abs(scores[b]).max())

    agreement = {"graddot store vs own (max rel diff)": rel("graddot-store", "graddot-own"),
                 "trak store vs own (max rel diff)": rel("trak-store", "trak-own"),
                 "trak relative ridge store / own": [trak.relative_ridges, own_trak.relative_ridges]}
    store_steps = ("store: build (loss gradients)", "store: Grad-Dot fit + score",
                   "store: influence projected-Fisher fit + score", "store: build (margin gradients, for TRAK)",
                   "store: TRAK fit + score")
    store_total = sum(rows[k]["cpu_s"] for k in store_steps)
    result = {"args": vars(args), "torch_threads": torch.get_num_threads(), "rows": rows, "agreement": agreement,
              "featurized": featurized, "store_route_total_cpu_s": store_total,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
