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
   initialisation is compiled), its step is compiled (timed on its own) and stepped once to warm
   up. The first is then stepped :data:`TIMED_STEPS` times alone; every later one is compared
   with the best so far in one time window: the best's throwaway states are kept and
   TIMED_STEPS rounds step both (best then candidate, then candidate then best, ...), so that
   load on a shared machine hits both alike. Its ratio, its fastest step over the best's fastest
   step in that window (load only ever slows a step down), below 1 makes it the best. Where two
   throwaway copies of the state and the larger chunk's activations do not fit in memory (the
   run's own rule; the real states are made after measuring), each candidate is stepped alone
   after the best's states are dropped, and the json's ``timing`` says so.
4. Budget: measuring may add ``max(MIN_TUNING_SECONDS, TUNING_FRACTION x run)`` to the run, the run
   estimated as the best's fastest step x the run's total steps, and the time added counted as
   everything measured except the first compilation (training compiles one chunk size anyway),
   the best's steps in the interleaved windows included. The first candidate is always measured;
   before each later one its cost is predicted from the previous candidate (its zeros,
   compilation, 1 + TIMED_STEPS steps, TIMED_STEPS steps of the best) and the walk stops if that
   would pass the budget. It also stops after a candidate :data:`STOP_RATIO` times slower than
   the best: walking away from the best only got slower in every measurement of benchmarks/.
5. The last candidate to beat the best wins, and training steps with the program compiled for it;
   every candidate's timings, ratio and the choice are written to the json.

What remains: load that changes from one step to the next still reaches the ratio, so on a
loaded machine two chunk sizes within about 10% of each other can be chosen either way, at a
cost of at most that difference (benchmarks/README.md).

On several processes every process measures (the steps are collective), process 0's timings
decide for all, and process 0 reads and writes the json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
import optax

from cka_jax import _atomic_file as atomic_file
from cka_jax.data import datasets as data
from cka_jax.models import ResNetTrunk
from cka_jax.train import population as pop
from cka_jax.train.chunked_states import ChunkedStates
from cka_jax.train.device_batches import TrainInputs
from cka_jax.train.run_checks import memory_per_model, model_state_shape
from cka_jax.workdir import Workdir

logger = logging.getLogger(__name__)

MIN_TUNING_SECONDS = 5.0  # what measuring may always add to a run
TUNING_FRACTION = 0.01  # ... or this fraction of the run's estimated length, if larger
TIMED_STEPS = 3  # timed steps per candidate after one warm-up step (rounds of a window)
STOP_RATIO = 1.2  # stop the walk after a candidate this much slower than the best


class Bench(Protocol):
    """Throwaway states per chunk size: ``prepare(c)`` makes c's and compiles its step, giving
    ``(setup_s, compile_s)``; ``steps(order)`` steps the states of each chunk size in ``order`` in
    turn, giving each step's time; ``drop(c)`` frees c's (if any). Seconds: process 0's."""

    def prepare(self, c: int) -> tuple[float, float]: ...
    def steps(self, order: list[int]) -> list[float]: ...
    def drop(self, c: int) -> None: ...


@dataclasses.dataclass
class Candidate:
    """One chunk size and what measuring it gave (seconds; None where not measured)."""

    models_per_call: int
    status: str = "not measured"  # measured | does not fit in memory | over the budget | stopped early | only one
    setup_s: float | None = None  # making its throwaway states
    compile_s: float | None = None  # compiling its population step
    step_times_s: list[float] = dataclasses.field(default_factory=list)  # warm-up step first
    timing: str | None = None  # alone (the first) | interleaved | sequential
    compared_with: int | None = None  # the best chunk size when it was measured
    best_times_s: list[float] = dataclasses.field(default_factory=list)  # the best's steps in its window
    ratio: float | None = None  # its fastest step / the best's (same window where interleaved)
    relative: float | None = None  # its step time in units of the first candidate's

    @property
    def step_s(self) -> float:
        """The fastest timed population step (inf where not measured)."""
        return min(self.step_times_s[1:], default=float("inf"))

    @property
    def cost_s(self) -> float:
        """Everything measuring it took, the best's steps in its window included."""
        return (self.setup_s or 0.0) + (self.compile_s or 0.0) + sum(self.step_times_s) + sum(self.best_times_s)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The outcome: the chosen chunk size, every candidate in walk order, the budget, the time
    measuring added (seconds, as the rule of the module docstring counts them) and how later
    candidates were timed (interleaved | sequential | none)."""

    models_per_call: int
    candidates: list[Candidate]
    budget_s: float
    added_s: float
    timing: str = "interleaved"


def candidate_sizes(per_device: int, fallback: int) -> list[int]:
    """Divisors of ``per_device`` spaced at least 2x apart, from 1 to ``per_device``, in walk
    order: from ``fallback`` (1 or ``per_device``) outward."""
    sizes = [1]
    for c in pop.chunk_sizes(per_device):
        if c >= 2 * sizes[-1] or c == per_device and c != sizes[-1]:
            sizes.append(c)
    return sizes if fallback == 1 else sizes[::-1]


def tune(sizes: list[int], bench: Bench, total_steps: int, interleave: bool = True) -> Tuning:
    """Walk ``sizes`` (in order) by the rule of the module docstring, with ``bench``'s throwaway
    states, timed interleaved with the best (or, ``interleave=False``, one after the other). At
    most two chunk sizes' states are alive at once (one where not interleaved), none at the end.
    A single size is taken without measuring."""
    candidates = [Candidate(c) for c in sizes]
    if len(candidates) == 1:
        candidates[0].status = "only one"
        return Tuning(sizes[0], candidates, 0.0, 0.0, "none")
    measured: list[Candidate] = []
    best: Candidate | None = None
    for candidate in candidates:
        if best is not None:
            skip = _skip(measured, best, total_steps, interleave)
            if skip:
                candidate.status = skip
                continue
        _measure_candidate(candidate, best, bench, interleave)
        measured.append(candidate)
        wins = best is None or candidate.ratio is not None and candidate.ratio < 1.0
        if best is not None:
            bench.drop((best if wins else candidate).models_per_call)  # the loser's states
        best = candidate if wins else best
    assert best is not None  # the first candidate is always measured
    bench.drop(best.models_per_call)
    timing = "interleaved" if interleave else "sequential: two throwaway copies do not fit in memory"
    return Tuning(best.models_per_call, candidates, *_budget_and_added(measured, best, total_steps), timing)


def _skip(measured: list[Candidate], best: Candidate, total_steps: int, interleave: bool) -> str | None:
    """Why the next candidate is not measured (stopping early, budget), or None."""
    previous = measured[-1]
    assert previous.relative is not None and best.relative is not None
    if previous.relative >= STOP_RATIO * best.relative:
        return "stopped early"
    budget, added = _budget_and_added(measured, best, total_steps)
    predicted = (previous.setup_s or 0.0) + (previous.compile_s or 0.0) + (1 + TIMED_STEPS) * previous.step_s
    if interleave:
        predicted += TIMED_STEPS * _fastest_step(measured, best)
    return "over the budget" if added + predicted > budget else None


def _measure_candidate(candidate: Candidate, best: Candidate | None, bench: Bench, interleave: bool) -> None:
    """Measure ``candidate`` alone (the first, or not ``interleave``) or interleaved with ``best``."""
    c, together = candidate.models_per_call, best is not None and interleave
    if best is not None and not interleave:
        bench.drop(best.models_per_call)  # one throwaway copy at a time
    candidate.status, (candidate.setup_s, candidate.compile_s) = "measured", bench.prepare(c)
    rounds = [[best.models_per_call, c][:: (-1) ** r] if best and together else [c] for r in range(TIMED_STEPS)]
    order = [c] + [x for one_round in rounds for x in one_round]  # a warm-up step of c first
    times = bench.steps(order)
    candidate.step_times_s = [t for x, t in zip(order, times, strict=True) if x == c]
    candidate.best_times_s = [t for x, t in zip(order, times, strict=True) if x != c]
    if best is None:
        candidate.timing, candidate.relative = "alone", 1.0
        return
    candidate.timing = "interleaved" if together else "sequential"
    candidate.ratio = candidate.step_s / (min(candidate.best_times_s) if together else best.step_s)
    assert best.relative is not None
    candidate.compared_with, candidate.relative = best.models_per_call, best.relative * candidate.ratio


def _fastest_step(measured: list[Candidate], best: Candidate) -> float:
    """The best's fastest step: timed alone, as a candidate, or in later candidates' windows."""
    windows = [min(m.best_times_s) for m in measured if m.compared_with == best.models_per_call and m.best_times_s]
    return min([best.step_s, *windows])


def _budget_and_added(measured: list[Candidate], best: Candidate, total_steps: int) -> tuple[float, float]:
    """(budget, time added) after the ``measured`` candidates: the budget from the best's fastest
    step, the time added without the first compilation (module docstring, 4.)."""
    added = sum(m.cost_s for m in measured) - (measured[0].compile_s or 0.0)
    return max(MIN_TUNING_SECONDS, TUNING_FRACTION * _fastest_step(measured, best) * total_steps), added


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

    if not layout.measured:
        return states(layout.models_per_call)
    path = Workdir(workdir).population_strategy
    recorded = int(_agreed([_recorded_choice(path, layout) if jax.process_index() == 0 else 0])[0])
    if recorded:
        logger.info("population.strategy=auto: %s, as measured before (%s)", _describe(layout, recorded), path)
        return states(recorded)
    per_model = memory_per_model(config, model, model_state_shape(config, model))
    sizes = [c for c in candidate_sizes(layout.per_device, layout.models_per_call) if _fits(layout, c, *per_model)]
    interleave = _fits(layout, max(sizes), *per_model, state_copies=2)  # the best's and a candidate's
    bench = _ThrowawayStates(states, _tuning_inputs(config, inputs))
    tuning = tune(sizes, bench, total_steps, interleave)
    _record(path, layout, tuning, total_steps)
    logger.info(
        "population.strategy=auto: %s, %s (%s)", _describe(layout, tuning.models_per_call), _summary(tuning), path
    )
    return bench.by_size.get(tuning.models_per_call) or states(tuning.models_per_call)


class _ThrowawayStates:
    """The :class:`Bench` of a run: each chunk size's :class:`ChunkedStates` (kept, so that the
    winner trains with the program compiled for it) filled with zeros while measured."""

    def __init__(self, make_states: Callable[[int], ChunkedStates], shared: tuple):
        self.make_states, self.shared = make_states, shared
        self.by_size: dict[int, ChunkedStates] = {}

    def prepare(self, c: int) -> tuple[float, float]:
        states = self.by_size[c] = self.make_states(c)
        start = time.perf_counter()
        states.fill_with_zeros()
        jax.block_until_ready(states.chunks)
        setup_s = time.perf_counter() - start
        start = time.perf_counter()
        states.step_fn.lower(states.chunks[0], *self.shared).compile()  # the jit reuses it on its first call
        compile_s = time.perf_counter() - start
        setup_s, compile_s = _agreed([setup_s, compile_s])
        return float(setup_s), float(compile_s)

    def steps(self, order: list[int]) -> list[float]:
        times = []
        for c in order:
            start = time.perf_counter()
            self.by_size[c].train_step(*self.shared)
            jax.block_until_ready(self.by_size[c].chunks)
            times.append(time.perf_counter() - start)
        return [float(t) for t in _agreed(times)]

    def drop(self, c: int) -> None:
        if c in self.by_size:
            self.by_size[c].chunks = []


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


def _fits(layout: pop.PopulationLayout, c: int, state_bytes: int, activation_bytes: int, state_copies: int = 1) -> bool:
    """Whether chunk size c fits in memory on every process, given one model's state and step
    activations, with ``state_copies`` copies of the population's state alive (two while a
    candidate is interleaved with the best; the real states are made after measuring):
    :func:`~cka_jax.train.population.check_memory` counting at least that many. One model per
    call, one copy, always fits: :func:`~cka_jax.train.run_checks.check_run` checked it."""
    if c == 1 and state_copies == 1:
        return True
    scale = max(1.0, state_copies / pop.DEVICE_COPIES)
    try:
        pop.check_memory(layout.with_models_per_call(c), int(np.ceil(state_bytes * scale)), activation_bytes * c)
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
        "timing": tuning.timing,
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
            {**dataclasses.asdict(c), "step_s": c.step_s if c.step_times_s else None} for c in tuning.candidates
        ],
    }
    atomic_file.write(path, json.dumps(record, indent=2) + "\n")


def _describe(layout: pop.PopulationLayout, c: int) -> str:
    name = layout.with_models_per_call(c).strategy
    return f"{c} model{'s' if c > 1 else ''} per call" + (f" ({name})" if not name.isdigit() else "")


def _summary(tuning: Tuning) -> str:
    """``population step of 1: 0.105 s (compile 3.1 s), 2: 1.12x 1's (interleaved, compile 3.4 s),
    4 stopped early; measuring added 7.9 s of a 10.0 s budget``, candidates in walk order."""
    if tuning.timing == "none":
        return "the only chunk size"
    parts = [
        f"{c.models_per_call}: "
        + (f"{c.step_s:.3g} s (" if c.ratio is None else f"{c.ratio:.3g}x {c.compared_with}'s ({c.timing}, ")
        + f"compile {c.compile_s:.1f} s)"
        if c.status == "measured"
        else f"{c.models_per_call} {c.status}"
        for c in tuning.candidates
    ]
    added = f"measuring added {tuning.added_s:.1f} s of a {tuning.budget_s:.1f} s budget"
    return f"population step of {', '.join(parts)}; {added}" + (
        "" if tuning.timing == "interleaved" else "; " + tuning.timing
    )
