"""All-layer-pairs minibatch CKA: cka_jax against its peers, side by side in one process.

    python benchmarks/cka_throughput.py                  # the four workloads and the offset row
    python benchmarks/cka_throughput.py --quick          # smaller sizes, a smoke run
    python benchmarks/cka_throughput.py --slow-peers     # adds torch-cka and ckatorch (one minibatch,
                                                         # not in population mode)

Every implementation gets the same float32 NumPy minibatches, as a user passes them (cka_jax's
copy of the caller's arrays is part of its time), and computes the minibatch CKA heatmap of
every layer pair from an empty state: a loop over `--batches` minibatches of 256, then the
heatmap. Rounds are interleaved (A B C, then B C A, ...) so that load on a shared machine hits
every implementation alike; the table gives the median seconds per minibatch over the rounds,
each peer's time as a multiple of cka_jax's, and the largest error of its heatmap against a
float64 NumPy reference written from the formulas (features centred, grams, U-centring, HSIC₁
sums). Compilation is excluded (one warm-up run each).

Workloads (batch 256):
  pair:        2 models x 20 layers, a CIFAR ResNet-20's widths (16384, 8192, 4096 features).
  deep pair:   2 models x 50 layers x 512 features.
  self:        one model against itself, 20 layers (`update(acts)`; pytorch-cka with model1 is model2).
  population:  10 vs 10 models x 10 layers x 4096 (cka_jax's population mode; the peers get the
               100 (model, layer) activations of each side as the layers of one model).
  offset:      the pair workload with 1000 added to every activation: CKA is unchanged in exact
               arithmetic, so this row tests accuracy, not speed.

Peers: pytorch-cka (`pip install pytorch-cka`, module `cka`), a 30-line NumPy version of the
same algorithm (raw grams, U-centred, one matmul for all pairs), and with --slow-peers torch-cka
and ckatorch (`pip install -e ".[bench]"`); also cka_jax's own loop under jax.jit, where compiled
code builds the grams (as in `update_sharded` and on accelerators) instead of the host. The
float32 matmul peak is measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cka_jax import MinibatchCKA

RESNET20 = [16384] * 7 + [8192] * 6 + [4096] * 7
Side = list[np.ndarray]  # one minibatch of one side: per-layer (batch, p) or (models, batch, p)


def make_batches(widths: list[int], batch: int, pool: int, models: int | None, seed: int) -> list[Side]:
    """`pool` distinct minibatches of float32 activations, ReLU-like (non-negative, mean > 0)."""
    rng = np.random.default_rng(seed)
    lead = (batch,) if models is None else (models, batch)
    out = []
    for _ in range(pool):
        side = []
        for p in widths:
            x = rng.standard_normal(lead + (p,), dtype=np.float32)
            side.append(np.maximum(x, 0, out=x))
        out.append(side)
    return out


def as_layers(side: Side, population: bool) -> Side:
    """A population minibatch's (models, batch, p) arrays as one model's layers (batch, p)."""
    return [m for x in side for m in x] if population else side


# ---- the implementations: each runs `steps` minibatches from an empty state and returns the heatmap


_JITTED_UPDATE = jax.jit(MinibatchCKA.update)


def run_cka_jax(batches_a, batches_b, steps, population, update=MinibatchCKA.update):
    """`MinibatchCKA.update` loop on the NumPy arrays as given; b None: model a against itself."""
    side = batches_a[0]
    layers_a = len(side)
    layers_b = None if batches_b is None else len(batches_b[0])
    models = dict(num_models_a=side[0].shape[0], num_models_b=batches_b[0][0].shape[0]) if population else {}
    acc = MinibatchCKA.create(layers_a, layers_b, **models)
    for i in range(steps):
        a = batches_a[i % len(batches_a)]
        acc = update(acc, a) if batches_b is None else update(acc, a, batches_b[i % len(batches_b)])
    out = np.asarray(acc.result())
    if population:  # (Ma, Mb, La, Lb) -> the peers' layout, (La·Ma, Lb·Mb)
        ma, mb, la, lb = out.shape
        out = out.transpose(2, 0, 3, 1).reshape(la * ma, lb * mb)
    return out


def run_cka_jax_jitted(batches_a, batches_b, steps, population):
    """The same loop of jax.jit(MinibatchCKA.update): grams built by compiled code (XLA's matmul)."""
    return run_cka_jax(batches_a, batches_b, steps, population, _JITTED_UPDATE)


def _u_centred(x: np.ndarray, dtype) -> np.ndarray:
    gram = x @ x.T
    n = gram.shape[0]
    np.fill_diagonal(gram, 0)
    means = gram.sum(0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    gram -= means[:, None] + means[None, :]
    np.fill_diagonal(gram, 0)
    return gram.reshape(-1).astype(dtype, copy=False)


def minibatch_cka_numpy(batches_a, batches_b, steps, population, dtype=np.float32, centre=False):
    """The 30-line NumPy version: a raw gram per layer, U-centred, all pairs from one matmul.
    dtype=float64 with centre=True is the reference (features centred first, all in float64)."""
    xy = xx = yy = 0.0
    for i in range(steps):
        grams = []
        for batches in (batches_a, batches_b if batches_b is not None else batches_a):
            side = as_layers(batches[i % len(batches)], population)
            if centre:
                side = [x.astype(np.float64) - x.astype(np.float64).mean(0) for x in side]
            grams.append(np.stack([_u_centred(x.astype(dtype, copy=False), dtype) for x in side]))
        ga, gb = grams
        xy = xy + ga @ gb.T
        xx = xx + np.einsum("ij,ij->i", ga, ga)
        yy = yy + np.einsum("ij,ij->i", gb, gb)
    return xy / np.sqrt(np.outer(xx, yy))


class _Replay:
    """A torch model whose named layers output the workload's activations of the current minibatch."""

    def __init__(self, torch, batches, population, as_sequence=False):
        nn = torch.nn
        sides = [as_layers(b, population) for b in batches]

        class Layer(nn.Module):
            def forward(self, x):
                return x

        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = nn.ModuleList([Layer() for _ in sides[0]])

            def forward(self, idx):
                acts = sides[int(idx.reshape(-1)[0]) % len(sides)]
                for layer, a in zip(self.layers, acts, strict=True):
                    t = torch.from_numpy(a)
                    layer(t[None] if as_sequence else t)
                return idx

        self.model = Model()
        self.names = [f"layers.{i}" for i in range(len(sides[0]))]


def _loader(torch, steps, batch):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(torch.arange(steps).repeat_interleave(batch)), batch_size=batch)


def run_pytorch_cka(batches_a, batches_b, steps, population):
    import torch
    from cka import compute_cka

    a = _Replay(torch, batches_a, population)
    b = a if batches_b is None else _Replay(torch, batches_b, population)
    batch = as_layers(batches_a[0], population)[0].shape[0]
    loader = _loader(torch, steps, batch)
    (heatmap,) = compute_cka(
        a.model, b.model, loader, layers=a.names, model2_layers=b.names, device="cpu", progress=False
    )
    return heatmap.numpy()


def run_torch_cka(batches_a, batches_b, steps, population):
    import torch
    from torch_cka import CKA

    a = _Replay(torch, batches_a, population)
    b = a if batches_b is None else _Replay(torch, batches_b, population)
    batch = as_layers(batches_a[0], population)[0].shape[0]
    cka = CKA(a.model, b.model, "a", "b", model1_layers=a.names, model2_layers=b.names, device="cpu")
    with torch.no_grad():
        cka.compare(_loader(torch, steps, batch))
    return cka.export()["CKA"].numpy()


def run_ckatorch(batches_a, batches_b, steps, population):
    import torch
    from ckatorch import CKA

    a = _Replay(torch, batches_a, population, as_sequence=True)
    b = a if batches_b is None else _Replay(torch, batches_b, population, as_sequence=True)
    batch = as_layers(batches_a[0], population)[0].shape[0]
    cka = CKA(a.model, b.model, layers=a.names, second_layers=b.names, first_name="a", second_name="b", device="cpu")
    return cka(_loader(torch, steps, batch), epochs=1).numpy()  # the last minibatch's CKA, not the estimator


# ---- timing


def matmul_peak() -> float:
    """Best float32 GFLOP/s of a square JAX matmul on the default device."""
    square = jax.jit(lambda x: jnp.matmul(x, x, precision=jax.lax.Precision.HIGHEST))
    best = 0.0
    for size in (2048, 4096):
        x = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), jnp.float32)
        square(x).block_until_ready()
        for _ in range(3):
            start = time.perf_counter()
            square(x).block_until_ready()
            best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def interleaved(runs: dict[str, Callable[[], np.ndarray]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each run per round, the order rotated every round, after one warm-up each."""
    for run in runs.values():
        run()
    names, seconds = list(runs), {name: [] for name in runs}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def gram_gflop(batches_a, batches_b, population, batch) -> float:
    """GFLOP per minibatch: a full gram per layer (of each model) and the all-pairs matmul."""
    sides = [as_layers(batches_a[0], population)]
    if batches_b is not None:
        sides.append(as_layers(batches_b[0], population))
    grams = sum(2 * batch**2 * x.shape[1] for side in sides for x in side)
    pairs = 2 * len(sides[0]) * len(sides[-1]) * batch**2
    return (grams + pairs) / 1e9


def workloads(quick: bool, batch: int, pool: int) -> list[tuple[str, list[Side], list[Side] | None, bool]]:
    scale = 8 if quick else 1
    resnet = [w // scale for w in RESNET20]
    pair_a, pair_b = make_batches(resnet, batch, pool, None, 0), make_batches(resnet[::-1], batch, pool, None, 1)
    deep = [512 // scale] * 50
    models = 10 if not quick else 3
    return [
        ("pair: 2 models × 20 layers, 4k–16k features", pair_a, pair_b, False),
        (
            "deep pair: 2 × 50 layers × 512",
            make_batches(deep, batch, pool, None, 2),
            make_batches(deep, batch, pool, None, 3),
            False,
        ),
        ("self: one model against itself, 20 layers", pair_a, None, False),
        (
            f"population: {models} × {models} models × 10 layers × {4096 // scale}",
            make_batches([4096 // scale] * 10, batch, pool, models, 4),
            make_batches([4096 // scale] * 10, batch, pool, models, 5),
            True,
        ),
        (
            "offset: pair + 1000 (accuracy)",
            [[x + 1000 for x in s] for s in pair_a],
            [[x + 1000 for x in s] for s in pair_b],
            False,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4, help="minibatches per timed run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--only", help="run the workloads whose title starts with this")
    parser.add_argument("--slow-peers", action="store_true", help="also torch-cka and ckatorch (one round)")
    args = parser.parse_args()
    print(
        f"# CKA throughput — {platform.node()} ({platform.machine()}, {jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}, jax {jax.__version__}, "
        f"{datetime.date.today()}"
    )
    peak = matmul_peak()
    print(f"float32 matmul peak: {peak:.0f} GFLOP/s")
    peers = {
        "cka_jax under jax.jit": run_cka_jax_jitted,
        "pytorch-cka": run_pytorch_cka,
        "NumPy, 30 lines": minibatch_cka_numpy,
    }
    slow = {"torch-cka": run_torch_cka, "ckatorch (last minibatch only)": run_ckatorch} if args.slow_peers else {}
    for title, batches_a, batches_b, population in workloads(args.quick, args.batch, pool=2):
        if args.only and not title.startswith(args.only):
            continue
        steps = args.batches

        def bind(fn, steps=steps, batches_a=batches_a, batches_b=batches_b, population=population):
            return lambda: fn(batches_a, batches_b, steps, population)

        runs = {"cka_jax": bind(run_cka_jax)} | {name: bind(fn) for name, fn in peers.items()}
        reference = minibatch_cka_numpy(batches_a, batches_b, steps, population, np.float64, centre=True)
        seconds = interleaved(runs, args.rounds)
        failed = {}
        for name, fn in slow.items() if not population else ():  # a gram per (model, layer) pair: hours
            try:
                seconds[name] = [min(interleaved({name: bind(fn, steps=1)}, 1)[name]) * steps]
            except Exception as error:  # noqa: BLE001 - a peer's failure is a result to report
                failed[name] = f"{type(error).__name__}: {error}"
        ours = statistics.median(seconds["cka_jax"]) / steps
        gflop = gram_gflop(batches_a, batches_b, population, args.batch)
        print(f"\n### {title}\ncka_jax at {100 * gflop / ours / peak:.0f}% of the matmul peak (full-gram FLOPs)\n")
        print("| implementation | s / minibatch | × cka_jax's time | max error vs float64 |")
        print("|---|---:|---:|---:|")
        for name in list(runs) + [name for name in slow if name in seconds]:
            per = statistics.median(seconds[name]) / steps
            if name in slow:
                error = "-"
            else:
                error = f"{np.max(np.abs(np.asarray(runs[name](), np.float64) - reference)):.1e}"
            print(f"| {name} | {per:.3f} | {per / ours:.2f} | {error} |")
        for name, message in failed.items():
            print(f"| {name} | fails: {message} | | |")


if __name__ == "__main__":
    main()
