"""What owning the caller's host arrays costs: copy them on the way in, or wait before returning.

    python benchmarks/host_inputs.py            # the issue's workloads, batch 256
    python benchmarks/host_inputs.py --quick    # smaller sizes, a smoke run

JAX on CPU may compute directly from a NumPy array's memory (a 64-byte aligned array is not
copied), and a dispatched computation may read it after the call returned. An entry point can own
its inputs in two ways: copy host arrays before dispatch (into a private 64-byte aligned buffer,
which JAX then uses without a second copy), or block until the computation has finished before
handing control back. This script times a `MinibatchCKA.update` loop over NumPy minibatches
(fresh arrays from a pool, as a data loader gives them) four ways, stepped in turn so that load
on the machine hits all alike:

  unowned (before)   the compiled update on the caller's arrays, as before inputs were owned
                     (NumPy's usual allocation is unaligned, and JAX copies those itself)
  copy (update now)  `MinibatchCKA.update`: each array copied into an aligned buffer first
  plain copy         np.array(x) first (NumPy's allocation: JAX copies it a second time)
  wait               the caller's arrays, then block until the update has finished

and reports seconds per minibatch and each way's time relative to the unowned loop.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import jax
import numpy as np

from cka_jax import MinibatchCKA
from cka_jax import _minibatch_ops as minibatch_ops


def make_batches(widths, batch, pool, models=None, seed=0):
    rng = np.random.default_rng(seed)
    lead = (batch,) if models is None else (models, batch)
    return [[rng.standard_normal(lead + (p,), dtype=np.float32) for p in widths] for _ in range(pool)]


def _dispatch(acc, acts_a, acts_b):
    """The compiled update on the caller's arrays as they are: the library before it owned them."""
    return minibatch_ops.update(acc, list(acts_a), list(acts_b), False)


def _owning(acc, acts_a, acts_b):
    """`MinibatchCKA.update`: host arrays copied into private aligned buffers first."""
    return acc.update(acts_a, acts_b)


def _plain_copies(acc, acts_a, acts_b):
    """np.array copies (NumPy's own allocation): JAX copies unaligned ones a second time."""
    return _dispatch(acc, [np.array(a) for a in acts_a], [np.array(b) for b in acts_b])


def _waiting(acc, acts_a, acts_b):
    """The caller's arrays as they are, then block until the update has read them."""
    return jax.block_until_ready(_dispatch(acc, acts_a, acts_b))


def _loop(update, batches_a, batches_b, steps, population):
    la, lb = len(batches_a[0]), len(batches_b[0])
    models = {}
    if population:
        models = dict(num_models_a=batches_a[0][0].shape[0], num_models_b=batches_b[0][0].shape[0])
    acc = MinibatchCKA.create(la, lb, **models)
    start = time.perf_counter()
    for i in range(steps):
        acc = update(acc, batches_a[i % len(batches_a)], batches_b[i % len(batches_b)])
    result = np.asarray(acc.result())
    return time.perf_counter() - start, result


WAYS = {
    "unowned (before)": _dispatch,
    "copy (update now)": _owning,
    "plain copy": _plain_copies,
    "wait": _waiting,
}


def measure(title, batches_a, batches_b, steps, rounds, population=False):
    for update in WAYS.values():  # compile and warm up every way
        _loop(update, batches_a, batches_b, 1, population)
    seconds: dict[str, list[float]] = {name: [] for name in WAYS}
    results = {}
    for _ in range(rounds):
        for name, update in WAYS.items():
            s, results[name] = _loop(update, batches_a, batches_b, steps, population)
            seconds[name].append(s / steps)
    base = min(seconds["unowned (before)"])
    print(f"\n{title} ({steps} minibatches x {rounds} rounds, best round)\n")
    print("| way | s / minibatch | time vs unowned | max abs diff |")
    print("|---|---:|---:|---:|")
    for name in WAYS:
        diff = float(np.nanmax(np.abs(results[name] - results["unowned (before)"])))
        print(f"| {name} | {min(seconds[name]):.4f} | {min(seconds[name]) / base:.3f} | {diff:.1e} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = parser.parse_args()
    scale = 16 if args.quick else 1
    print(
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    pair = [w // scale for w in (4096, 8192, 16384)] * 7
    pair = pair[:20]
    a, b = make_batches(pair, args.batch, 2, seed=0), make_batches(pair, args.batch, 2, seed=1)
    measure("pair: 2 models x 20 layers, 4k-16k features", a, b, args.steps, args.rounds)
    deep = [512 // scale] * 50
    a, b = make_batches(deep, args.batch, 2, seed=2), make_batches(deep, args.batch, 2, seed=3)
    measure("deep pair: 2 x 50 layers x 512", a, b, args.steps, args.rounds)
    models = 2 if args.quick else 10
    pop = [4096 // scale] * 10
    a = make_batches(pop, args.batch, 2, models=models, seed=4)
    b = make_batches(pop, args.batch, 2, models=models, seed=5)
    measure(f"population: {models} x {models} models x 10 layers x {pop[0]}", a, b, args.steps, args.rounds, True)


if __name__ == "__main__":
    main()
