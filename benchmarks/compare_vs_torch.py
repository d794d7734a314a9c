"""One-call CKA heatmap of two user-defined CNNs: cka_jax.compare against torch-cka and ckatorch.

    python benchmarks/compare_vs_torch.py            # 2048 examples, batches of 256 (a few minutes on 2 cores)
    python benchmarks/compare_vs_torch.py --quick    # 512 examples, a smoke run

Workload: two CNNs of the same architecture (different seeds), `layers` 3x3 convolutions of
`channels` channels on (size, size, 3) inputs, every conv output against every conv output, all
examples in minibatches of `batch`. The PyTorch models carry the same weights as the Flax ones,
so the heatmaps agree (a linear gram does not depend on the NCHW/NHWC feature order). Times are
end to end on the same CPU: building the comparison, every forward pass, every minibatch, the
heatmap; cka_jax's first call includes compilation (its "warm" row is a second call, as a user
comparing more checkpoints would see). The peers run on a prefix of the batches when
--peer-batches is given; rates are per example, so the ratios compare.

Peers (`pip install -e ".[bench]"`): torch-cka 0.21 (`CKA(model1, model2, ...).compare(loader)`:
forward hooks, HSIC₁ accumulated over minibatches, a gram per layer *pair*) and ckatorch 1.0
(`CKA(...)(loader, epochs=1)`: float64 HSIC₁ per minibatch; its result is the last minibatch's
CKA, and it treats axis 0 of a hooked output as a batch of sequences, so the CNN's outputs reach
it through probe modules that reshape (n, C, H, W) to (1, n, C·H·W)).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cka_jax import compare


class ConvNet(nn.Module):
    """`layers` conv3x3(`channels`)-ReLU layers, global average pool, dense head: a user's own model."""

    layers: int = 6
    channels: int = 32

    @nn.compact
    def __call__(self, x):
        for _ in range(self.layers):
            x = nn.relu(nn.Conv(self.channels, (3, 3))(x))
        return nn.Dense(10)(x.mean((1, 2)))


def torch_twin(torch, variables, layers: int, probes: bool):
    """The same network in PyTorch (NCHW) with the Flax weights; probes: identity-like modules after
    every conv whose output is (1, n, features), for ckatorch."""
    tnn = torch.nn

    class Probe(tnn.Module):
        def forward(self, x):
            return x.flatten(1)[None]

    class TorchConvNet(tnn.Module):
        def __init__(self):
            super().__init__()
            params = variables["params"]
            self.convs = tnn.ModuleList()
            self.probes = tnn.ModuleList()
            for i in range(layers):
                kernel = np.asarray(params[f"Conv_{i}"]["kernel"])  # (3, 3, in, out)
                conv = tnn.Conv2d(kernel.shape[2], kernel.shape[3], 3, padding=1)
                conv.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
                conv.bias.data = torch.from_numpy(np.asarray(params[f"Conv_{i}"]["bias"]).copy())
                self.convs.append(conv)
                self.probes.append(Probe())
            dense = params["Dense_0"]
            self.head = tnn.Linear(*np.asarray(dense["kernel"]).shape)
            self.head.weight.data = torch.from_numpy(np.asarray(dense["kernel"]).T.copy())
            self.head.bias.data = torch.from_numpy(np.asarray(dense["bias"]).copy())

        def forward(self, x):
            for conv, probe in zip(self.convs, self.probes, strict=True):
                x = conv(x)
                if probes:
                    probe(x)
                x = torch.relu(x)
            return self.head(x.mean((2, 3)))

    names = [f"{'probes' if probes else 'convs'}.{i}" for i in range(layers)]
    return TorchConvNet().eval(), names


def loader(torch, batches):
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.from_numpy(np.concatenate(batches).transpose(0, 3, 1, 2).copy())
    return DataLoader(TensorDataset(x), batch_size=len(batches[0]), shuffle=False)


def float64_reference(model, va, vb, batches) -> np.ndarray:
    """Minibatch CKA of the conv outputs in float64 NumPy, HSIC₁ of Song et al. 2012 from its formula."""

    def convs(variables, x):
        _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
        found = state["intermediates"]
        return [np.asarray(found[f"Conv_{i}"]["__call__"][0], np.float64) for i in range(model.layers)]

    def hsic1(k, l):
        n = len(k)
        k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
        return (np.sum(k * l) + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * np.sum(k.sum(0) * l.sum(0))) / (
            n * (n - 3)
        )

    sums = np.zeros((3, model.layers, model.layers))
    for x in batches:
        ka = [(a := f.reshape(len(f), -1)) @ a.T for f in convs(va, x)]
        kb = [(b := f.reshape(len(f), -1)) @ b.T for f in convs(vb, x)]
        for i, k in enumerate(ka):
            for j, l in enumerate(kb):
                sums[:, i, j] += hsic1(k, l), hsic1(k, k), hsic1(l, l)
    return sums[0] / np.sqrt(sums[1] * sums[2])


def run_cka_jax(model, va, vb, batches):
    start = time.perf_counter()
    result = compare((model, va), (model, vb), batches, "Conv_*", "Conv_*", progress=False, devices=1)
    return time.perf_counter() - start, result.heatmap


def run_torch_cka(torch, va, vb, layers, batches):
    from torch_cka import CKA

    start = time.perf_counter()
    (ta, names), (tb, _) = torch_twin(torch, va, layers, False), torch_twin(torch, vb, layers, False)
    cka = CKA(ta, tb, "a", "b", model1_layers=names, model2_layers=names, device="cpu")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Dataloader for Model 2 is not given": one loader for both, as intended
        cka.compare(loader(torch, batches))
    return time.perf_counter() - start, cka.export()["CKA"].numpy()


def run_ckatorch(torch, va, vb, layers, batches):
    from ckatorch import CKA

    start = time.perf_counter()
    (ta, names), (tb, _) = torch_twin(torch, va, layers, True), torch_twin(torch, vb, layers, True)
    cka = CKA(ta, tb, layers=names, second_layers=names, first_name="a", second_name="b", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it asks for shuffle=True; same order for every peer here
        result = cka(loader(torch, batches), epochs=1)
    return time.perf_counter() - start, result.numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=16, help="input height and width")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--peer-batches", type=int, default=0, help="minibatches the peers run (0: all)")
    parser.add_argument("--quick", action="store_true", help="512 examples: a smoke run")
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()
    examples = 512 if args.quick else args.examples
    rng = np.random.default_rng(0)
    batches = [
        rng.normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32) for _ in range(examples // args.batch)
    ]
    model = ConvNet(args.layers, args.channels)
    va, vb = (model.init(jax.random.key(seed), jnp.zeros((1, args.size, args.size, 3))) for seed in (0, 1))

    print(
        f"# compare() end to end — {platform.node()} ({platform.machine()}, {jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}, jax {jax.__version__}, "
        f"{datetime.date.today()}"
    )
    print(
        f"two {args.layers}-conv CNNs ({args.channels} channels, {args.size}x{args.size}x3 inputs), "
        f"{args.layers}x{args.layers} conv-output heatmap, {len(batches)} minibatches of {args.batch}"
    )
    cold, ours = run_cka_jax(model, va, vb, batches)
    warm, _ = run_cka_jax(model, va, vb, batches)
    n = len(batches) * args.batch
    reference = float64_reference(model, va, vb, batches)
    print(
        f"cka_jax against a float64 NumPy reference on the same batches: max abs diff "
        f"{np.max(np.abs(ours - reference)):.1e}"
    )
    rows = [
        ("cka_jax.compare (first call, with compilation)", cold, n, None),
        ("cka_jax.compare (second call)", warm, n, None),
    ]

    peers = []
    if args.skip_torch:
        print("torch rows skipped (--skip-torch)")
    else:
        try:
            import torch
        except ImportError:
            print(
                "torch rows skipped: torch is not installed (pip install -e '.[bench]' installs torch, torch-cka, "
                "ckatorch)"
            )
        else:
            for name, fn in (("torch-cka", run_torch_cka), ("ckatorch (float64, last batch)", run_ckatorch)):
                try:
                    __import__("torch_cka" if name == "torch-cka" else "ckatorch")
                    peers.append((name, fn))
                except ImportError:
                    print(f"{name} rows skipped: the package is not installed (pip install -e '.[bench]')")
    peer_batches = batches[: args.peer_batches] if args.peer_batches else batches
    for name, fn in peers:
        seconds, theirs = fn(torch, va, vb, args.layers, peer_batches)
        if name.startswith("ckatorch"):  # its heatmap is the last minibatch's CKA: compare with that
            same = run_cka_jax(model, va, vb, peer_batches[-1:])[1]
        else:
            same = ours if len(peer_batches) == len(batches) else run_cka_jax(model, va, vb, peer_batches)[1]
        diff = float(np.max(np.abs(theirs - same)))
        if len(peer_batches) == len(batches) and not name.startswith("ckatorch"):
            print(f"{name} against the float64 reference: max abs diff {np.max(np.abs(theirs - reference)):.1e}")
        rows.append((f"{name} (CPU, {torch.get_num_threads()} threads)", seconds, len(peer_batches) * args.batch, diff))

    base = rows[0][2] / rows[0][1]
    warm_rate = rows[1][2] / rows[1][1]
    print(
        "\n| implementation | examples | seconds | examples/s | max abs diff from cka_jax (same batches) | "
        "cka_jax speed-up (first call) | (second call) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, seconds, count, diff in rows:
        rate = count / seconds
        shown = "-" if diff is None else f"{diff:.1e}"
        print(
            f"| {name} | {count} | {seconds:.2f} | {rate:.0f} | {shown} | {base / rate:.1f}x | "
            f"{warm_rate / rate:.1f}x |"
        )


if __name__ == "__main__":
    main()
