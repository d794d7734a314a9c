"""The first `MinibatchCKA.update` of a new shape: seconds spent tracing, lowering and compiling
its program, and the program's size.

    python benchmarks/first_call.py             # 5 rounds, each with its own batch size
    python benchmarks/first_call.py --rounds 2  # a smoke run

A new minibatch size (or layer count) gives a new program: what a user waits for once per shape,
and what a test suite pays for each shape it tries. The layers' widths do not matter on the CPU
backend (the host builds the grams), so the workloads are narrow. No persistent compilation cache
is used. The table gives the medians over rounds of jax's own timings of each stage
(`jax.monitoring`), and the number of equations in the traced program (nested ones included).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import statistics
import time

import jax
import numpy as np

from cka_jax import MinibatchCKA

STAGES = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}
# name: (layers of a, layers of b (None: within a), models of a, bootstrap replicates, permutations)
WORKLOADS = {
    "pair, 20 + 20 layers": (20, 20, None, 0, 0),
    "self, 20 layers": (20, None, None, 0, 0),
    "pair + 100 bootstrap + 100 permutations": (20, 20, None, 100, 100),
    "population, 10 models x 10 layers": (10, None, 10, 0, 0),
}


def _equations(jaxpr: jax.extend.core.Jaxpr) -> int:
    """Equations of a jaxpr and of every jaxpr nested in it."""
    count = 0
    for eqn in jaxpr.eqns:
        count += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _equations(inner)
    return count


def first_update(workload: tuple, batch: int, rng: np.random.Generator) -> dict[str, float]:
    """Seconds per stage of one first update at this batch size, and the program's equations."""
    layers_a, layers_b, models, bootstrap, permutations = workload
    lead = (models,) if models else ()

    def side(layers: int) -> list[np.ndarray]:
        return [rng.standard_normal(lead + (batch, 32), dtype=np.float32) for _ in range(layers)]

    acc = MinibatchCKA.create(
        layers_a, layers_b, num_models_a=models, num_bootstrap=bootstrap, num_permutations=permutations
    )
    acts_a, acts_b = side(layers_a), side(layers_b) if layers_b else None
    spent: collections.Counter[str] = collections.Counter()

    def listener(event: str, duration: float, **kwargs: object) -> None:
        if event in STAGES and kwargs.get("fun_name") in ("update", "jit(update)"):
            spent[STAGES[event]] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        start = time.perf_counter()
        jax.block_until_ready(acc.update(acts_a, acts_b).xy)
        spent["first call"] = time.perf_counter() - start
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    jaxpr = jax.make_jaxpr(lambda a: a.update(acts_a, acts_b).xy)(acc)  # the activations stay host arrays
    spent["equations"] = _equations(jaxpr.jaxpr)
    return dict(spent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    first_update(WORKLOADS["self, 20 layers"], 8, rng)  # jax's own first-use costs
    rows = []
    for name, workload in WORKLOADS.items():
        runs = [first_update(workload, 64 + 8 * r, rng) for r in range(args.rounds)]
        rows.append((name, {k: statistics.median(r[k] for r in runs) for k in runs[0]}))
    print(
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}, {jax.devices()[0].platform}; medians of {args.rounds} rounds\n"
    )
    print("| workload | first call | trace | lower | compile | equations |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t in rows:
        print(
            f"| {name} | {t['first call']:.3f} s | {t['trace']:.3f} s | {t['lower']:.3f} s | "
            f"{t['compile']:.3f} s | {t['equations']:.0f} |"
        )


if __name__ == "__main__":
    main()
