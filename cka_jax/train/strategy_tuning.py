"""``population.strategy=auto``: the chunk size measured on the run's own backend, model and batch.

The rule, in the order :func:`population_states` applies it:

1. A run resumed with the layout its ``<workdir>/population_strategy.json`` was measured for (same
   backend, device kind, device and process count, population size) takes the recorded chunk
   size without measuring; a different layout is measured again (the log says so).
2. Candidates are the divisors c of the models per device spaced at least 2x apart (1, 2, 4, ...,
   per_device: at most log2(per_device) + 1 of them), walked from the backend's fallback
   (:data:`~cka_jax.train.population.AUTO_STRATEGY`): upward from 1 on CPU and GPU, downward from
   per_device on TPU. Chunk sizes whose activations do not fit in memory are skipped.
3. Each candidate gets its own throwaway states of zeros (:meth:`ChunkedStates.fill_with_zeros`:
   the run's training state, random keys and data order are never touched, and nothing of the
   initialisation is compiled), its step is compiled (timed on its own), then stepped once to warm
   up and :data:`TIMED_STEPS` times; its step time is the fastest of those (load on a shared
   machine only ever slows a step down).
4. Budget: measuring may add ``max(MIN_TUNING_SECONDS, TUNING_FRACTION x run)`` to the run, the run
   estimated as the fastest population step so far x the run's total steps, and the time added
   counted as everything measured except the first compilation (training compiles one chunk size
   anyway). The first candidate is always measured; before each later one its cost is predicted
   from the previous candidate (its zeros, compilation and 1 + TIMED_STEPS steps) and the
   walk stops if that would pass the budget. It also stops after a candidate :data:`STOP_RATIO`
   times slower than the best: walking away from the best only got slower in every measurement
   of benchmarks/README.md.
5. The fastest candidate wins, and training steps with the program compiled for it; every
   candidate's timings and the choice are written to the json.

Candidates are measured one after the other, so a change of load between two of them (a machine
shared with other jobs) can outweigh a small difference: on a 2-core VM at load 6, c = 2 measured
0.31 s per step against 0.40 s for c = 1, where rounds interleaved on the same machine found c = 2
9-25% slower (benchmarks/README.md). On such a machine set ``population.strategy`` explicitly.

On several processes every process measures (the steps are collective), process 0's timings
decide for all, and process 0 reads and writes the json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from cka_jax import atomic_file
from cka_jax.models import ResNetTrunk
from cka_jax.train import data
from cka_jax.train import population as pop
from cka_jax.train.chunked_states import ChunkedStates
from cka_jax.train.device_batches import TrainInputs
from cka_jax.train.run_checks import memory_per_model, model_state_shape
from cka_jax.workdir import Workdir

logger = logging.getLogger(__name__)

MIN_TUNING_SECONDS = 5.0  # what measuring may always add to a run
TUNING_FRACTION = 0.01  # ... or this fraction of the run's estimated length, if larger
TIMED_STEPS = 3  # population steps timed per candidate, after one warm-up step
STOP_RATIO = 1.2  # stop the walk after a candidate this much slower than the best


@dataclasses.dataclass
class Candidate:
    """One chunk size and what measuring it gave (seconds; None where not measured)."""

    models_per_call: int
    status: str = "not measured"  # measured | does not fit in memory | over the budget | stopped early | only one
    setup_s: float | None = None  # making its throwaway states
    compile_s: float | None = None  # compiling its population step
    step_times_s: list[float] = dataclasses.field(default_factory=list)  # warm-up step first

    @property
    def step_s(self) -> float:
        """The fastest timed population step (inf where not measured)."""
        return min(self.step_times_s[1:], default=float("inf"))

    @property
    def cost_s(self) -> float:
        """Everything measuring it took."""
        return (self.setup_s or 0.0) + (self.compile_s or 0.0) + sum(self.step_times_s)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The outcome: the chosen chunk size, every candidate in walk order, the budget and the time
    measuring added (seconds, as the rule of the module docstring counts them)."""

    models_per_call: int
    candidates: list[Candidate]
    budget_s: float
    added_s: float


def candidate_sizes(per_device: int, fallback: int) -> list[int]:
    """Divisors of ``per_device`` spaced at least 2x apart, from 1 to ``per_device``, in walk
    order: from ``fallback`` (1 or ``per_device``) outward."""
    sizes = [1]
    for c in pop.chunk_sizes(per_device):
        if c >= 2 * sizes[-1] or c == per_device and c != sizes[-1]:
            sizes.append(c)
    return sizes if fallback == 1 else sizes[::-1]


def tune(sizes: list[int], measure: Callable[[int], tuple[float, float, list[float]]], total_steps: int) -> Tuning:
    """Walk ``sizes`` (in order) by the budget and stopping rules of the module docstring.

    ``measure(c)`` gives ``(setup_s, compile_s, step_times_s)`` of chunk size c, the warm-up step
    first and then :data:`TIMED_STEPS` steps. A single size is taken without measuring.
    """
    candidates = [Candidate(c) for c in sizes]
    if len(candidates) == 1:
        candidates[0].status = "only one"
        return Tuning(sizes[0], candidates, 0.0, 0.0)
    measured: list[Candidate] = []
    for candidate in candidates:
        if measured:
            best, previous = min(measured, key=lambda m: m.step_s), measured[-1]
            budget, added = _budget_and_added(measured, total_steps)
            predicted = (previous.setup_s or 0.0) + (previous.compile_s or 0.0) + (1 + TIMED_STEPS) * previous.step_s
            if previous.step_s >= STOP_RATIO * best.step_s:
                candidate.status = "stopped early"
                continue
            if added + predicted > budget:
                candidate.status = "over the budget"
                continue
        candidate.setup_s, candidate.compile_s, candidate.step_times_s = measure(candidate.models_per_call)
        candidate.status = "measured"
        measured.append(candidate)
    return Tuning(
        min(measured, key=lambda m: m.step_s).models_per_call, candidates, *_budget_and_added(measured, total_steps)
    )


def _budget_and_added(measured: list[Candidate], total_steps: int) -> tuple[float, float]:
    """(budget, time added) after the ``measured`` candidates: the budget from the fastest step
    so far, the time added without the first compilation (module docstring, 4.)."""
    fastest = min(m.step_s for m in measured)
    added = sum(m.cost_s for m in measured) - (measured[0].compile_s or 0.0)
    return max(MIN_TUNING_SECONDS, TUNING_FRACTION * fastest * total_steps), added


def layout_key(layout: pop.PopulationLayout) -> dict[str, Any]:
    """What a measured choice holds for: the backend, devices, processes and models per device."""
    device = layout.mesh.devices.flat[0]
    return {
        "backend": device.platform,
        "device_kind": device.device_kind,
        "num_devices": layout.num_devices,
        "process_count": jax.process_count(),
        "size": layout.size,
        "per_device": layout.per_device,
    }


def population_states(
    config: ml_collections.ConfigDict,
    workdir: str,
    model: ResNetTrunk,
    layout: pop.PopulationLayout,
    inputs: TrainInputs,
    tx: optax.GradientTransformation,
    total_steps: int,
) -> ChunkedStates:
    """The run's :class:`ChunkedStates`, not yet initialised, with the chunk size that
    ``population.strategy`` names, or for ``auto`` the recorded or measured one (module docstring).
    ``layout``: from :func:`~cka_jax.train.run_checks.check_run`."""
    train_step = inputs.make_train_step(model, tx)

    def states(c: int) -> ChunkedStates:
        return ChunkedStates(config, model, layout.with_models_per_call(c), train_step, tx)

    if pop.parse_strategy(config.population.strategy) != "auto":
        return states(layout.models_per_call)
    path = Workdir(workdir).population_strategy
    recorded = int(_agreed([_recorded_choice(path, layout) if jax.process_index() == 0 else 0])[0])
    if recorded:
        logger.info("population.strategy=auto: %s, as measured before (%s)", _describe(layout, recorded), path)
        return states(recorded)
    per_model = memory_per_model(config, model, model_state_shape(config, model))
    sizes = [c for c in candidate_sizes(layout.per_device, layout.models_per_call) if _fits(layout, c, *per_model)]
    by_size: dict[int, ChunkedStates] = {}
    shared = _tuning_inputs(config, inputs)

    def measure(c: int) -> tuple[float, float, list[float]]:
        by_size[c] = states(c)
        setup_s, compile_s, steps = _measure(by_size[c], shared)
        agreed = _agreed([setup_s, compile_s, *steps])
        return float(agreed[0]), float(agreed[1]), [float(t) for t in agreed[2:]]

    tuning = tune(sizes, measure, total_steps)
    _record(path, layout, tuning, total_steps)
    logger.info(
        "population.strategy=auto: %s, %s (%s)", _describe(layout, tuning.models_per_call), _summary(tuning), path
    )
    return by_size.get(tuning.models_per_call) or states(tuning.models_per_call)


def _measure(states: ChunkedStates, shared: tuple) -> tuple[float, float, list[float]]:
    """(setup_s, compile_s, step_times_s) of ``states``' chunk size on throwaway states, which
    are dropped afterwards (``states`` is left without chunks)."""
    start = time.perf_counter()
    states.fill_with_zeros()
    jax.block_until_ready(states.chunks)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    states.step_fn.lower(states.chunks[0], *shared).compile()  # the jit reuses it on its first call
    compile_s = time.perf_counter() - start
    steps = []
    for _ in range(1 + TIMED_STEPS):
        start = time.perf_counter()
        states.train_step(*shared)
        jax.block_until_ready(states.chunks)
        steps.append(time.perf_counter() - start)
    states.chunks = []
    return setup_s, compile_s, steps


def _tuning_inputs(config: ml_collections.ConfigDict, inputs: TrainInputs) -> tuple:
    """``(images, labels, mean, std)`` for the measured steps, taken from no data stream: the
    in-memory training set (which every step is given whole), or zeros shaped like a streamed
    batch (uint8 images, int32 labels) so that the host pipeline is not advanced."""
    if not data.dataset(config.data.name).streamed:
        images, labels = next(iter(inputs.batches(0, 1)))
    else:
        shape = (inputs.batch_size,) + data.image_shape(config)
        images = pop.host_to_sharded(np.zeros(shape, np.uint8), inputs.replicated)
        labels = pop.host_to_sharded(np.zeros(shape[:1], np.int32), inputs.replicated)
    return images, labels, inputs.mean, inputs.std


def _fits(layout: pop.PopulationLayout, c: int, state_bytes: int, activation_bytes: int) -> bool:
    """Whether chunk size c fits in memory on every process, given one model's state and step
    activations (one model per call always does: :func:`~cka_jax.train.run_checks.check_run`
    checked it)."""
    if c == 1:
        return True
    try:
        pop.check_memory(layout.with_models_per_call(c), state_bytes, activation_bytes * c)
        fits = 1
    except ValueError:
        fits = 0
    if jax.process_count() == 1:
        return bool(fits)
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(fits))))


def _agreed(values: list[float]) -> np.ndarray:
    """Process 0's ``values`` on every process (float64)."""
    array = np.asarray(values, np.float64)
    if jax.process_count() == 1:
        return array
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(array))


def _recorded_choice(path: str, layout: pop.PopulationLayout) -> int:
    """The chunk size recorded in ``path`` for this layout; 0 (and a log line saying why) where
    there is none to reuse."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        key, chosen = record["layout"], int(record["models_per_call"])
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("population.strategy=auto: %s is unreadable (%s): measuring again", path, error)
        return 0
    now = layout_key(layout)
    if key != now or chosen not in pop.chunk_sizes(layout.per_device):
        changed = ", ".join(f"{k} {key.get(k)!r} -> {v!r}" for k, v in now.items() if key.get(k) != v)
        logger.info("population.strategy=auto: %s was measured for another layout (%s): measuring again", path, changed)
        return 0
    return chosen


def _record(path: str, layout: pop.PopulationLayout, tuning: Tuning, total_steps: int) -> None:
    """Write the choice and every candidate's timings to ``path`` (process 0, atomically)."""
    if jax.process_index() != 0:
        return
    record = {
        "layout": layout_key(layout),
        "models_per_call": tuning.models_per_call,
        "strategy": layout.with_models_per_call(tuning.models_per_call).strategy,
        "total_steps": total_steps,
        "budget_s": tuning.budget_s,
        "added_s": tuning.added_s,
        "rule": {
            "min_tuning_s": MIN_TUNING_SECONDS,
            "tuning_fraction": TUNING_FRACTION,
            "timed_steps": TIMED_STEPS,
            "stop_ratio": STOP_RATIO,
        },
        "candidates": [
            {
                "models_per_call": c.models_per_call,
                "status": c.status,
                "setup_s": c.setup_s,
                "compile_s": c.compile_s,
                "step_s": c.step_s if c.step_times_s else None,
                "step_times_s": c.step_times_s,
            }
            for c in tuning.candidates
        ],
    }
    atomic_file.write(path, json.dumps(record, indent=2) + "\n")


def _describe(layout: pop.PopulationLayout, c: int) -> str:
    name = layout.with_models_per_call(c).strategy
    return f"{c} model{'s' if c > 1 else ''} per call" + (f" ({name})" if not name.isdigit() else "")


def _summary(tuning: Tuning) -> str:
    """``fastest step of 1: 0.105 s (compile 3.1 s), 2: ...; 4 over the budget; measuring added 7.9 s of 10.0 s``."""
    measured = [c for c in tuning.candidates if c.status == "measured"]
    if not measured:
        return "the only chunk size"
    parts = [f"{c.models_per_call}: {c.step_s:.3g} s (compile {c.compile_s:.1f} s)" for c in measured]
    skipped = [f"{c.models_per_call} {c.status}" for c in tuning.candidates if c.status != "measured"]
    return (
        "population step of "
        + ", ".join(parts)
        + ("; " + ", ".join(skipped) if skipped else "")
        + f"; measuring added {tuning.added_s:.1f} s of a {tuning.budget_s:.1f} s budget"
    )
