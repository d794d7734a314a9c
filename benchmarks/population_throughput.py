r"""Images/s per model of population training at each chunk size vs M separate single-model runs.

For each population size M this times, interleaved round by round so that machine load hits
all of them alike (median over rounds):
  * ``separate``: M separate single-model runs, i.e. one model's plain jitted step called for
    each of the M models in turn (no population machinery),
  * ``c=1 (loop)``, ``c=2``, ..., ``c=per_device (vmap)``: one population step of
    cka_jax.train.population over all local devices, each device stepping its models c at a time
    (by default the chunk sizes ``population.strategy=auto`` would measure),
and prints per-model images/s, the ratio to ``separate`` and each one's compile time; ``fallback``
marks the chunk size auto starts from (and keeps when it measures nothing else), ``fastest`` the
fastest population row. Synthetic uint8 data, CIFAR ResNet of the chosen depth/width, batch per
model as in training.

  python benchmarks/population_throughput.py                          # M = 1, 8, 32, 100, 32x32x3
  python benchmarks/population_throughput.py --sizes 1,8 --rounds 3 --image_size 8 --channels 1
  python benchmarks/population_throughput.py --sizes 32 --chunks 1,32   # loop and vmap only
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cka_jax import models
from cka_jax.train import population as pop
from cka_jax.train import step as training
from cka_jax.train import strategy_tuning
from cka_jax.workdir.config import Strategy, base_config


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,8,32,100", help="population sizes M")
    parser.add_argument(
        "--chunks",
        default="auto",
        help="chunk sizes: numbers, loop, vmap (those that divide M/D), or auto's candidates",
    )
    parser.add_argument("--depth", type=int, default=14)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after a warm-up")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default="", help="also write the results here")
    return parser.parse_args()


class Bench:
    """Model, optimizer, step and synthetic data shared by every measurement."""

    def __init__(self, args):
        self.args = args
        config = base_config()
        config.model.depth, config.model.width, config.model.dtype = args.depth, args.width, args.dtype
        self.shape = (args.image_size, args.image_size, args.channels)
        num_train = 8 * args.batch_size
        self.model = models.from_config(config.model, num_classes=10)
        self.tx = training.make_optimizer(config, num_train // args.batch_size)
        self.step = training.make_in_memory_train_step(self.model, self.tx, config, 10, num_train, args.batch_size)
        rng = np.random.default_rng(0)
        self.data = (
            rng.integers(0, 256, (num_train,) + self.shape, dtype=np.uint8),
            rng.integers(0, 10, num_train).astype(np.int32),
            np.full(args.channels, 0.5, np.float32),
            np.full(args.channels, 0.25, np.float32),
        )

    def init(self, keys):
        return training.create_train_state(
            self.model, self.tx, keys[0], keys[1], jnp.zeros((1,) + self.shape, jnp.float32)
        )


def compiled_timed(fn, *args):
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - start


def separate_runner(bench, size):
    """M single-model states and a function doing one step of each, one after the other.

    The single-model step is compiled once (its compile time is reported at every M).
    """
    init = jax.jit(bench.init)  # one jit object: traced once for all M models
    states = [init(np.stack([k, k])) for k in pop.model_keys(0, size)]
    data = tuple(jnp.asarray(a) for a in bench.data)
    if not hasattr(bench, "separate_step"):
        bench.separate_step = compiled_timed(jax.jit(bench.step, donate_argnums=0), states[0], *data)
    step, compile_s = bench.separate_step

    def run():
        for i in range(size):
            states[i] = step(states[i], *data)
        jax.block_until_ready(states)

    return run, compile_s


def initial_population(bench, size):
    """The stacked initial states (M_pad, ...) over all devices, initialised one model per call
    (the initialisation compiles once per M, not once per chunk size)."""
    layout = pop.make_layout(size, "loop")
    keys = pop.model_keys(0, layout.padded_size)
    keys = np.stack([keys, keys], axis=1)
    init = pop.map_models(bench.init, layout)
    chunks = [init(pop.host_to_sharded(keys[layout.chunk_models(k)], layout.sharded)) for k in range(layout.num_chunks)]
    return pop.merge_chunks(chunks, layout)


def population_runner(bench, stacked, size, models_per_call):
    """One population step at ``models_per_call`` on copies of ``stacked`` (the step donates them)."""
    layout = pop.make_layout(size, "loop").with_models_per_call(models_per_call)
    chunks = [jax.tree.map(jnp.copy, chunk) for chunk in pop.split_chunks(stacked, layout)]
    shared = tuple(pop.host_to_sharded(a, layout.replicated) for a in bench.data)
    step, compile_s = compiled_timed(pop.map_models(bench.step, layout, donate=True), chunks[0], *shared)

    def run():
        chunks[:] = [step(c, *shared) for c in chunks]
        jax.block_until_ready(chunks)

    return run, compile_s


def chunk_sizes(args, size):
    """(label, c) of each population row at population size ``size``."""
    per_device = pop.make_layout(size, "loop").per_device
    if args.chunks == "auto":
        sizes = strategy_tuning.candidate_sizes(per_device, 1)
    else:
        named = ({"loop": 1, "vmap": per_device}.get(c) or int(c) for c in args.chunks.split(","))
        sizes = sorted({c for c in named if per_device % c == 0})
    names = {1: " (loop)", per_device: " (vmap)"} if per_device > 1 else {1: " (loop = vmap)"}
    return [(f"c={c}{names.get(c, '')}", c) for c in sizes]


def measure(runners, rounds):
    """Seconds of each runner's step per round, after one warm-up, interleaved round by round."""
    for run, _ in runners.values():
        run()
    seconds = {name: [] for name in runners}
    for _ in range(rounds):
        for name, (run, _) in runners.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def main():
    args = parse_args()
    bench = Bench(args)
    fallback = pop.AUTO_STRATEGY.get(jax.default_backend(), "loop")
    print(
        f"backend {jax.default_backend()}, {jax.device_count()} device(s) "
        f"({jax.devices()[0].device_kind}); ResNet-{args.depth} {args.width}x, "
        f"{args.image_size}x{args.image_size}x{args.channels}, batch {args.batch_size} per model, "
        f"median of {args.rounds} rounds; fallback = {fallback}"
    )
    print(f"{'M':>4} {'strategy':>16} {'img/s/model':>12} {'vs separate':>11} {'compile s':>9}")
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        per_device = pop.make_layout(size, "loop").per_device
        fallback_c = pop.strategy_chunk_size(Strategy.parse(fallback), per_device, jax.default_backend())
        runners = {"separate": (*separate_runner(bench, size), None)}
        stacked = initial_population(bench, size)
        for name, c in chunk_sizes(args, size):
            runners[name] = (*population_runner(bench, stacked, size, c), c)
        del stacked
        seconds = measure({name: (run, c) for name, (run, _, c) in runners.items()}, args.rounds)
        median = {name: statistics.median(s) for name, s in seconds.items()}
        fastest = min((n for n in runners if n != "separate"), key=median.get, default=None)
        base = size * args.batch_size / median["separate"]
        for name, (_, compile_s, c) in runners.items():
            per_model = size * args.batch_size / median[name]
            rows.append(
                dict(
                    size=size,
                    strategy=name,
                    models_per_call=c,
                    per_model_images_per_s=per_model,
                    ratio_vs_separate=per_model / base,
                    compile_s=compile_s,
                    round_seconds=seconds[name],
                )
            )
            marks = [m for m, on in (("fallback", c == fallback_c), ("fastest", name == fastest)) if on]
            print(
                f"{size:>4} {name:>16} {per_model:>12.0f} {per_model / base:>10.2f}x {compile_s:>9.1f}"
                + (f" ({', '.join(marks)})" if marks else ""),
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "backend": jax.default_backend(),
                    "devices": jax.device_count(),
                    "fallback": fallback,
                    "rows": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
