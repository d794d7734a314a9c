"""Cost of permutation p-values: minibatch CKA of the 20-layer pair of cka_throughput.py (a CIFAR
ResNet-20's widths, batch 256) with num_permutations = 0 and P (default 100).

    python benchmarks/permutation_cost.py               # P = 100, 4 minibatches per round, 3 rounds
    python benchmarks/permutation_cost.py --quick       # 1/16 of the features, a smoke run

Each round runs both settings from an empty accumulator (interleaved, so load on a shared machine
hits both alike) and reads the heatmap (and the p-values); the table gives the median seconds per
minibatch. Compilation is excluded (one warm-up run each). A null replicate gathers model b's
U-centred grams (upper triangles) by its permutation and does one matmul: no activation is read again.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import jax
import numpy as np

from cka_jax import MinibatchCKA

RESNET20 = [16384] * 7 + [8192] * 6 + [4096] * 7


def run(batches_a, batches_b, permutations: int) -> float:
    acc = MinibatchCKA.create(len(batches_a[0]), len(batches_b[0]), num_permutations=permutations)
    start = time.perf_counter()
    for a, b in zip(batches_a, batches_b, strict=True):
        acc = acc.update(a, b)
    jax.block_until_ready(acc.result() if not permutations else (acc.result(), acc.p_values()))
    return (time.perf_counter() - start) / len(batches_a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--permutations", type=int, default=100)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    widths = [w // 16 for w in RESNET20] if args.quick else RESNET20
    rng = np.random.default_rng(0)

    def side() -> list[np.ndarray]:
        return [np.maximum(rng.standard_normal((256, p), dtype=np.float32), 0) for p in widths]

    batches_a = [side() for _ in range(args.batches)]
    batches_b = [side() for _ in range(args.batches)]
    settings = (0, args.permutations)
    for p in settings:  # warm-up: compile
        run(batches_a[:1], batches_b[:1], p)
    times: dict[int, list[float]] = {p: [] for p in settings}
    for r in range(args.rounds):
        for p in settings if r % 2 == 0 else settings[::-1]:
            times[p].append(run(batches_a, batches_b, p))
    print(
        f"{datetime.date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; {len(widths)} x {len(widths)} layers, batch 256"
    )
    base = statistics.median(times[0])
    for p in settings:
        t = statistics.median(times[p])
        print(f"num_permutations={p:4d}: {t * 1e3:8.1f} ms per minibatch ({t / base:.2f}x)")


if __name__ == "__main__":
    main()
