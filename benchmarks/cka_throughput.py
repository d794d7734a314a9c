"""All-layer-pairs minibatch CKA throughput: cka_jax against the alternatives, in one process.

    python benchmarks/cka_throughput.py            # full run (half an hour on 2 loaded CPU cores)
    python benchmarks/cka_throughput.py --quick    # smaller sizes, a smoke run

Workloads (one shared set of activations per workload; slow peers see its first batches only,
throughput is per example so the numbers compare):
  pair:        two models x 20 layers, features like a CIFAR ResNet (16k, 32k, 64k per example),
               n examples in minibatches of 256.
  deep pair:   two models x 50 layers (4k..16k features): torch-cka builds a gram per layer *pair*.
  population:  10 models vs 10 models, every model pair's heatmap.
Peers: a NumPy port of the paper's MinibatchCKA (efficient_CKA.py), a naive per-pair loop (a gram
for each layer pair, jitted), torch-cka and ckatorch (CPU; `pip install -e ".[bench]"`), and the
device's own float32 matmul peak. "pair-batches/s" counts (layer pair, minibatch) HSIC entries.

Eager vs jit: `MinibatchCKA.update` compiles itself; each workload also times a plain (eager)
loop of `acc.update(...)` against the same loop of `jax.jit(MinibatchCKA.update)`, step by step
in turn on the same minibatches (so load on a shared machine hits both alike), and prints the
ratio of their times.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from cka_jax import MinibatchCKA, center_gram

HIGHEST = jax.lax.Precision.HIGHEST


def timed(fn, repeat: int = 1) -> float:
    """Seconds per call of fn after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


@jax.jit
def _square(x):
    return jnp.matmul(x, x, precision=HIGHEST)


def matmul_peak() -> float:
    """Best float32 GFLOP/s of a square matmul on the default device."""
    best = 0.0
    for size in (2048, 4096):
        a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), jnp.float32)
        best = max(best, 2 * size**3 / timed(lambda a=a: _square(a).block_until_ready(), 3) / 1e9)
    return best


def make_batches(widths, batch, pool, models=None, seed=0):
    """`pool` distinct minibatches: lists of (batch, p) or (models, batch, p) float32 arrays."""
    rng = np.random.default_rng(seed)
    lead = (batch,) if models is None else (models, batch)
    return [[rng.standard_normal(lead + (p,), dtype=np.float32) for p in widths] for _ in range(pool)]


def gram_gflop(widths_a, widths_b, batch, models_a=1, models_b=1):
    """GFLOP of one minibatch: one gram per layer (and model) plus the all-pairs matmul."""
    grams = 2 * batch**2 * (models_a * sum(widths_a) + models_b * sum(widths_b))
    pairs = 2 * models_a * models_b * len(widths_a) * len(widths_b) * batch**2
    return (grams + pairs) / 1e9


# ----------------------------------------------------------------------------------------------
# The implementations, each consuming the same minibatches.


def _empty_accumulator(batches_a, batches_b, population):
    la, lb = len(batches_a[0]), len(batches_b[0])
    models = dict(num_models_a=batches_a[0][0].shape[0], num_models_b=batches_b[0][0].shape[0]) if population else {}
    return MinibatchCKA.create(la, lb, **models)


def _on_device(batches):
    return [[jnp.asarray(x) for x in b] for b in batches]


def run_cka_jax(batches_a, batches_b, num_batches, population=False):
    """A jax.jit(MinibatchCKA.update) loop over num_batches minibatches: (seconds, compile seconds, heatmap)."""
    dev_a, dev_b = _on_device(batches_a), _on_device(batches_b)
    update = jax.jit(MinibatchCKA.update)
    start = time.perf_counter()
    jax.block_until_ready(update(_empty_accumulator(batches_a, batches_b, population), dev_a[0], dev_b[0]))
    compile_s = time.perf_counter() - start

    def run():
        acc = _empty_accumulator(batches_a, batches_b, population)
        for i in range(num_batches):
            acc = update(acc, dev_a[i % len(dev_a)], dev_b[i % len(dev_b)])
        return np.asarray(acc.result())

    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, compile_s, result


def eager_vs_jit(batches_a, batches_b, num_batches, population=False):
    """Seconds of num_batches steps of an eager `acc.update` loop and of a jax.jit(MinibatchCKA.update)
    loop, timed step by step in turn on the same minibatches after one warm-up step each, and the
    largest difference of their heatmaps."""
    dev_a, dev_b = _on_device(batches_a), _on_device(batches_b)
    jitted = jax.jit(MinibatchCKA.update)
    steps = {"eager": lambda acc, a, b: acc.update(a, b), "jit": jitted}
    accs = {
        name: step(_empty_accumulator(batches_a, batches_b, population), dev_a[0], dev_b[0])
        for name, step in steps.items()
    }
    jax.block_until_ready(accs)
    seconds = dict.fromkeys(steps, 0.0)
    for i in range(num_batches):
        for name, step in steps.items():
            start = time.perf_counter()
            accs[name] = jax.block_until_ready(step(accs[name], dev_a[i % len(dev_a)], dev_b[i % len(dev_b)]))
            seconds[name] += time.perf_counter() - start
    diff = float(np.max(np.abs(np.asarray(accs["eager"].result()) - np.asarray(accs["jit"].result()))))
    return seconds["eager"], seconds["jit"], diff


def _numpy_ucentred(x):
    x = x.reshape(x.shape[0], -1)
    gram = x @ x.T
    n = gram.shape[0]
    np.fill_diagonal(gram, 0)
    means = gram.sum(0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    gram -= means[:, None] + means[None, :]
    np.fill_diagonal(gram, 0)
    return gram.reshape(-1)


def run_numpy_port(batches_a, batches_b, num_batches):
    """The paper's algorithm (grams per layer, U-centred, stacked, one matmul) in NumPy float32."""
    la, lb = len(batches_a[0]), len(batches_b[0])
    xy, xx, yy = np.zeros((la, lb), np.float32), np.zeros(la, np.float32), np.zeros(lb, np.float32)
    start = time.perf_counter()
    for i in range(num_batches):
        ga = np.stack([_numpy_ucentred(x) for x in batches_a[i % len(batches_a)]])
        gb = np.stack([_numpy_ucentred(y) for y in batches_b[i % len(batches_b)]])
        xy += ga @ gb.T
        xx += np.einsum("ij,ij->i", ga, ga)
        yy += np.einsum("ij,ij->i", gb, gb)
    result = xy / np.sqrt(xx[:, None] * yy[None, :])
    return time.perf_counter() - start, result


@jax.jit
def _pair_hsic(x, y):
    """HSIC₁(K, K), HSIC₁(K, L), HSIC₁(L, L) for one layer pair, both grams built here."""
    k = center_gram(x @ x.T, unbiased=True)
    l = center_gram(y @ y.T, unbiased=True)
    return jnp.stack([jnp.vdot(k, k), jnp.vdot(k, l), jnp.vdot(l, l)])


def run_naive_pairs(batches_a, batches_b, num_batches):
    """What a direct port does: for every layer pair, both grams and HSIC₁ (jitted per pair)."""
    la, lb = len(batches_a[0]), len(batches_b[0])
    sums = np.zeros((la, lb, 3))
    dev_a = [[jnp.asarray(x) for x in b] for b in batches_a]
    dev_b = [[jnp.asarray(x) for x in b] for b in batches_b]
    for i in range(la):  # compile every shape pair first
        for j in range(lb):
            _pair_hsic(dev_a[0][i], dev_b[0][j]).block_until_ready()
    start = time.perf_counter()
    for b in range(num_batches):
        acts_a, acts_b = dev_a[b % len(dev_a)], dev_b[b % len(dev_b)]
        for i in range(la):
            for j in range(lb):
                sums[i, j] += np.asarray(_pair_hsic(acts_a[i], acts_b[j]))
    result = sums[..., 1] / np.sqrt(sums[..., 0] * sums[..., 2])
    return time.perf_counter() - start, result


class _Replay:
    """A torch 'model' whose named layers output the workload's activations of the current batch."""

    def __init__(self, torch, batches, as_sequence):
        nn = torch.nn

        class Layer(nn.Module):
            def forward(self, x):
                return x

        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = nn.ModuleList([Layer() for _ in batches[0]])

            def forward(self, idx):
                acts = batches[int(idx.reshape(-1)[0]) % len(batches)]
                for layer, a in zip(self.layers, acts, strict=True):
                    t = torch.from_numpy(a)
                    layer(t[None] if as_sequence else t)
                return idx

        self.model = Model()
        self.names = [f"layers.{i}" for i in range(len(batches[0]))]


def run_torch_cka(batches_a, batches_b, num_batches):
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from torch_cka import CKA

    batch = batches_a[0][0].shape[0]
    a, b = _Replay(torch, batches_a, False), _Replay(torch, batches_b, False)
    loader = DataLoader(TensorDataset(torch.arange(num_batches).repeat_interleave(batch)), batch_size=batch)
    cka = CKA(a.model, b.model, "a", "b", model1_layers=a.names, model2_layers=b.names, device="cpu")
    start = time.perf_counter()
    with torch.no_grad():
        cka.compare(loader)
    return time.perf_counter() - start, cka.export()["CKA"].numpy()


def run_ckatorch(batches_a, batches_b, num_batches):
    import torch
    from ckatorch import CKA
    from torch.utils.data import DataLoader, TensorDataset

    batch = batches_a[0][0].shape[0]
    a, b = _Replay(torch, batches_a, True), _Replay(torch, batches_b, True)
    loader = DataLoader(TensorDataset(torch.arange(num_batches).repeat_interleave(batch)), batch_size=batch)
    cka = CKA(a.model, b.model, layers=a.names, second_layers=b.names, first_name="a", second_name="b", device="cpu")
    start = time.perf_counter()
    result = cka(loader, epochs=1)
    return time.perf_counter() - start, result.numpy()


# ----------------------------------------------------------------------------------------------


def pick(batches, k):
    """Model k's activations of population minibatches."""
    return [[x[k] for x in b] for b in batches]


def report(title, rows, batch, pairs, reference="cka_jax"):
    """rows: name -> (seconds, examples, gflop or None, max |difference| from cka_jax or None)."""
    ours = rows[reference][1] / rows[reference][0]
    print(f"\n### {title}")
    print(
        "| implementation | examples | seconds | examples/s | pair-batches/s | GFLOP/s | max abs diff | "
        "cka_jax speed-up |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (seconds, examples, gflop, diff) in rows.items():
        rate = examples / seconds
        flops = f"{gflop / seconds:.1f}" if gflop else "-"
        diff = "-" if diff is None else f"{diff:.1e}"
        print(
            f"| {name} | {examples} | {seconds:.2f} | {rate:.1f} | {rate / batch * pairs:.1f} | {flops} | {diff} | "
            f"{ours / rate:.1f}x |"
        )


def report_eager_vs_jit(title, eager_s, jit_s, diff, steps, batch):
    print(f"\n{title}: eager vs jitted update loop, {steps} minibatches timed in turn")
    print("| loop | seconds | examples/s | eager / jit time |")
    print("|---|---:|---:|---:|")
    print(f"| `acc.update(...)` (eager) | {eager_s:.2f} | {steps * batch / eager_s:.1f} | {eager_s / jit_s:.2f} |")
    print(f"| `jax.jit(MinibatchCKA.update)` | {jit_s:.2f} | {steps * batch / jit_s:.1f} | 1.00 |")
    print(f"max abs diff of the two heatmaps: {diff:.1e}")


def compare_with_peers(title, widths, batches_a, batches_b, models, peers, peak, args):
    """The jitted cka_jax loop over every minibatch, and the peers on the first ones."""
    batch = args.batch
    num_batches = args.examples // batch
    m = models or 1
    pairs = m * m * len(widths) ** 2
    gflop = gram_gflop(widths, widths, batch, m, m)
    seconds, compile_s, ours = run_cka_jax(batches_a, batches_b, num_batches, population=models is not None)
    rows = {"cka_jax": (seconds, num_batches * batch, num_batches * gflop, None)}
    print(
        f"\n{title}: cka_jax compile {compile_s:.1f} s; heatmap reaches "
        f"{100 * num_batches * gflop / seconds / peak:.0f}% of the matmul peak"
    )
    if models is None:
        _, _, same_batches = run_cka_jax(batches_a, batches_b, args.peer_batches)
        for name, fn in peers.items():
            seconds, result = fn(batches_a, batches_b, args.peer_batches)
            # ckatorch returns the last minibatch's CKA rather than the minibatch estimator
            diff = None if name.startswith("ckatorch") else float(np.max(np.abs(result - same_batches)))
            rows[name] = (seconds, args.peer_batches * batch, None, diff)
    else:
        seconds, diffs = 0.0, []
        _, _, same_batches = run_cka_jax(batches_a, batches_b, args.peer_batches, population=True)
        for i in range(m):
            for j in range(m):
                pair_s, _, result = run_cka_jax(pick(batches_a, i), pick(batches_b, j), args.peer_batches)
                seconds += pair_s
                diffs.append(np.max(np.abs(result - same_batches[i, j])))
        rows["per-model-pair loop of cka_jax"] = (seconds, args.peer_batches * batch, None, float(max(diffs)))
    report(title, rows, batch, pairs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--peer-batches", type=int, default=2, help="minibatches the slow peers run")
    parser.add_argument("--eager-batches", type=int, default=8, help="minibatches of the eager vs jit comparison")
    parser.add_argument("--only-eager-vs-jit", action="store_true", help="skip everything but that comparison")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()
    scale = 8 if args.quick else 1
    batch = args.batch
    print(
        f"# CKA throughput — {platform.node()} ({platform.machine()}, {jax.devices()[0].device_kind}, "
        f"{jax.local_device_count()} device(s)), {os.cpu_count()} CPU cores, load average "
        f"{os.getloadavg()[0]:.1f}, jax {jax.__version__}, {datetime.date.today()}"
    )

    peak = 0.0 if args.only_eager_vs_jit else matmul_peak()
    print(f"float32 matmul peak: {peak:.1f} GFLOP/s")
    peers = {"NumPy port of the paper's MinibatchCKA": run_numpy_port, "naive per-pair loop (JAX)": run_naive_pairs}
    if not args.skip_torch:
        try:
            import ckatorch  # noqa: F401
            import torch_cka  # noqa: F401

            peers.update({"torch-cka (CPU)": run_torch_cka, "ckatorch (CPU, float64)": run_ckatorch})
        except ImportError:
            print("torch-cka / ckatorch not installed: pip install -e '.[bench]'")

    workloads = [
        ("pair: 2 models x 20 layers (16k-64k features)", [65536, 32768, 16384] * 6 + [65536, 16384], None),
        ("deep pair: 2 models x 50 layers (4k-16k features)", [16384, 8192, 4096] * 16 + [16384, 8192], None),
        ("population: 10 vs 10 models x 8 layers (8k features)", [8192] * 8, 10),
    ]
    for title, widths, models in workloads:
        widths = [max(w // scale, 16) for w in widths]
        batches_a = make_batches(widths, batch, 2, models, seed=0)
        batches_b = make_batches(widths[::-1], batch, 2, models, seed=1)
        if not args.only_eager_vs_jit:  # first: its compile time is measured on a cold cache
            compare_with_peers(title, widths, batches_a, batches_b, models, peers, peak, args)
        eager_s, jit_s, diff = eager_vs_jit(batches_a, batches_b, args.eager_batches, population=models is not None)
        report_eager_vs_jit(title, eager_s, jit_s, diff, args.eager_batches, batch)


if __name__ == "__main__":
    main()
