"""population.strategy as a chunk size: the same numbers at every size, bad values refused, and
`auto` measuring (choice, interleaved timing, budget, record, reuse on resume, agreement with an
explicit size)."""

import json
import logging
import os
import re

import jax
import numpy as np
import pytest
import tiny
from absl import flags
from in_process import run_train_here
from ml_collections import config_flags

from cka_jax.train import loop, run_checks, strategy_tuning
from cka_jax.train import population as pop
from cka_jax.train import step as training
from cka_jax.train.chunked_states import ChunkedStates
from cka_jax.train.device_batches import open_inputs
from cka_jax.workdir import Workdir
from cka_jax.workdir import config as run_config

jax.config.update("jax_compilation_cache_dir", tiny.CACHE_DIR)

THREE = jax.devices()[:3]  # 10 models on 3 devices: 4 per device (2 padding slots), c in 1, 2, 4


# --- the chunk size --------------------------------------------------------------------------


def test_chunk_sizes_name_their_layouts_and_cover_every_model_once():
    for strategy, c, name in [("loop", 1, "loop"), ("2", 2, "2"), ("vmap", 4, "vmap"), ("4", 4, "vmap")]:
        layout = pop.make_layout(10, strategy, THREE)
        assert (layout.per_device, layout.models_per_call, layout.num_chunks, layout.strategy) == (4, c, 4 // c, name)
        models = np.concatenate([layout.chunk_models(k) for k in range(layout.num_chunks)])
        assert sorted(models) == list(range(12))
    with pytest.raises(ValueError, match="must divide per_device=4"):
        pop.make_layout(10, "loop", THREE).with_models_per_call(3)


@pytest.mark.parametrize("value", ["fast", "0", "-2", "2.5", " 4", "", "vmap4"])
def test_a_value_that_is_no_strategy_is_refused_in_one_line(value):
    config = tiny.tiny_config(10, strategy=value)
    with pytest.raises(
        ValueError, match=r"population.strategy must be auto, vmap, loop or a number of models per call"
    ):
        run_config.validate_config(config)
    with pytest.raises(run_checks.RunConfigError, match=re.escape(f"got {value!r}")):
        run_checks.check_run(config, THREE)


def test_a_chunk_size_that_does_not_divide_the_models_per_device_names_the_valid_ones():
    with pytest.raises(run_checks.RunConfigError) as refused:
        run_checks.check_run(tiny.tiny_config(10, strategy="3"), THREE)
    assert str(refused.value) == (
        "population.strategy='3' does not divide the 4 models each device holds: use one of auto, vmap, loop, 1, 2, 4"
    )
    for value in ("auto", "vmap", "loop", "1", "2", "4"):
        run_checks.check_run(tiny.tiny_config(10, strategy=value), THREE)


def test_the_command_line_gives_a_chunk_size_as_a_string_that_validates():
    """--config.population.strategy=2 reaches the (str) field as "2", which the checks accept."""
    argv, flag_values = ["train.py", "--config.population.strategy=2"], flags.FlagValues()
    config = config_flags.DEFINE_config_file(
        "config", tiny.TINY_FLAGS[1], flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flag_values(argv)
    assert config.value.population.strategy == "2"
    _, layout = run_checks.check_run(config.value, jax.devices()[:1])  # size=2 on one device
    assert layout.models_per_call == 2


@pytest.mark.parametrize(
    "value, message",
    [
        (
            "3",
            "population.strategy='3' does not divide the 2 models each device holds: use one of auto, vmap, loop, 1, 2",
        ),
        ("fast", "population.strategy must be auto, vmap, loop or a number of models per call"),
    ],
)
def test_train_py_refuses_a_bad_strategy_in_one_line_with_exit_2(tmp_path, value, message):
    code, err = run_train_here(
        *tiny.TINY_FLAGS, "--workdir", str(tmp_path / "run"), f"--config.population.strategy={value}"
    )
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def params_by_chunk_size():
    """Host params of 10 ResNet-8s on 3 devices after 3 steps, per chunk size; every layout
    starts from the same initial state (initialised once, at one model per call)."""
    config = tiny.tiny_config(10, strategy="loop")
    model, layout = run_checks.check_run(config, THREE)
    inputs = open_inputs(config, layout.replicated)
    tx = training.make_optimizer(config, inputs.steps_per_epoch)
    step = inputs.make_train_step(model, tx)
    first = ChunkedStates(config, model, layout, step, tx)
    first.initialize()
    out = {}
    for c in (1, 2, 4):
        states = ChunkedStates(config, model, layout.with_models_per_call(c), step, tx)
        states.load(first.stacked())
        for images, labels in inputs.batches(0, 3):
            states.train_step(images, labels, inputs.mean, inputs.std)
        out[c] = pop.to_host(states.stacked().params)
    return out


@pytest.mark.parametrize("c", [2, 4])
def test_every_chunk_size_computes_the_same_numbers(params_by_chunk_size, c):
    one = params_by_chunk_size[1]
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(params_by_chunk_size[c]), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    kernel = jax.tree.leaves(one)[-1]
    assert np.abs(kernel[0] - kernel[1]).max() > 1e-2  # the models differ, so the check means something


# --- the measuring rule ----------------------------------------------------------------------


def test_candidates_are_spaced_divisors_walked_from_the_fallback():
    sizes = strategy_tuning.candidate_sizes
    assert sizes(1, 1) == [1]
    assert sizes(4, 1) == [1, 2, 4] and sizes(4, 4) == [4, 2, 1]
    assert sizes(6, 1) == [1, 2, 6]
    assert sizes(100, 1) == [1, 2, 4, 10, 20, 50, 100]
    for per_device in range(1, 300):
        assert len(sizes(per_device, 1)) <= np.log2(per_device) + 1


class FakeBench:
    """The tuning's throwaway states on a fake clock: chunk size c's step takes step_s[c] (10x
    for its warm-up step), setup and compilation their seconds, each times ``load(t)`` at the
    fake time t. Records the sizes prepared and the most of them alive at once."""

    def __init__(self, step_s, compile_s=1.0, setup_s=0.1, load=lambda t: 1.0):
        self.step_s, self.compile_s, self.setup_s, self.load = step_s, compile_s, setup_s, load
        self.now, self.calls, self.alive, self.stepped, self.most_alive = 0.0, [], set(), set(), 0

    def _take(self, seconds):
        seconds *= self.load(self.now)
        self.now += seconds
        return seconds

    def prepare(self, c):
        self.calls.append(c)
        self.alive.add(c)
        self.most_alive = max(self.most_alive, len(self.alive))
        return self._take(self.setup_s), self._take(self.compile_s)

    def steps(self, order):
        assert set(order) <= self.alive, (order, self.alive)
        times = []
        for c in order:
            times.append(self._take(self.step_s[c] * (1 if c in self.stepped else 10)))
            self.stepped.add(c)
        return times

    def drop(self, c):
        self.alive.discard(c)


def test_tuning_takes_the_fastest_and_stops_after_a_much_slower_one():
    bench = FakeBench({1: 1.0, 2: 0.5, 4: 0.55, 8: 0.7, 16: 0.3})
    tuning = strategy_tuning.tune([1, 2, 4, 8, 16], bench, total_steps=10**6)
    assert bench.calls == [1, 2, 4, 8] and tuning.models_per_call == 2  # 8 is 1.4x the best: 16 is not tried
    assert [c.status for c in tuning.candidates] == ["measured"] * 4 + ["stopped early"]
    assert tuning.candidates[1].step_s == 0.5 and tuning.timing == "interleaved"
    assert [c.compared_with for c in tuning.candidates[:4]] == [None, 1, 2, 2]
    assert [c.ratio for c in tuning.candidates[:4]] == pytest.approx([None, 0.5, 1.1, 1.4])
    assert bench.most_alive == 2 and not bench.alive  # the best's and the candidate's; none at the end


def test_a_change_of_load_between_candidates_does_not_decide():
    """c = 2 is 11% slower than c = 1, but the machine runs 1.5x slower until fake time 10 s,
    while c = 1 is measured: timed one after the other, c = 2 looks faster (0.40 s against
    0.54 s per step); stepped in turn with c = 1 in one window it is not."""
    step_s = {1: 0.36, 2: 0.40}

    def load(t):
        return 1.5 if t < 10 else 1.0

    bench = FakeBench(step_s, load=load)
    sequential = strategy_tuning.tune([1, 2], bench, total_steps=10**6, interleave=False)
    assert sequential.models_per_call == 2 and sequential.timing.startswith("sequential")  # misled
    assert sequential.candidates[1].timing == "sequential" and bench.most_alive == 1
    bench = FakeBench(step_s, load=load)
    tuning = strategy_tuning.tune([1, 2], bench, total_steps=10**6)
    assert tuning.models_per_call == 1 and bench.calls == [1, 2] and bench.now > 10
    two = tuning.candidates[1]
    assert two.timing == "interleaved" and two.compared_with == 1 and two.ratio == pytest.approx(0.40 / 0.36)
    assert two.best_times_s == pytest.approx([0.36] * 3) and two.step_times_s[1:] == pytest.approx([0.40] * 3)
    assert tuning.candidates[0].step_s == pytest.approx(0.54)  # c = 1 alone, under the load


def test_tuning_stays_within_its_budget():
    # a 10 s run (1000 steps of 10 ms) gets the minimum budget: another 8 s compile does not fit
    bench = FakeBench({1: 0.01, 2: 0.005}, compile_s=8.0)
    tuning = strategy_tuning.tune([1, 2], bench, total_steps=1000)
    assert bench.calls == [1] and tuning.models_per_call == 1
    assert tuning.budget_s == strategy_tuning.MIN_TUNING_SECONDS and tuning.candidates[1].status == "over the budget"
    # a run of 10^4 s (10^6 steps of 10 ms) may add 100 s, less as faster sizes shorten the run:
    # 1 (its compile is not counted), 2 (budget 50 s), 4 (25 s), and 8 would pass 25 s
    bench = FakeBench({c: 0.01 / c for c in (1, 2, 4, 8, 16)}, compile_s=10.0)
    tuning = strategy_tuning.tune([1, 2, 4, 8, 16], bench, total_steps=10**6)
    assert bench.calls == [1, 2, 4] and tuning.models_per_call == 4
    assert tuning.budget_s == pytest.approx(0.01 * 0.0025 * 10**6) and 20 < tuning.added_s <= tuning.budget_s
    assert [c.status for c in tuning.candidates[3:]] == ["over the budget"] * 2
    # the best's steps in each window count: everything the fake clock ran, but the first compile
    assert tuning.added_s == pytest.approx(bench.now - 10.0)


def test_a_single_candidate_is_taken_without_measuring():
    bench = FakeBench({1: 1.0})
    tuning = strategy_tuning.tune([1], bench, total_steps=100)
    assert bench.calls == [] and tuning.models_per_call == 1 and tuning.candidates[0].status == "only one"


def test_interleaving_needs_room_for_two_copies_of_the_state(monkeypatch):
    """12 model slots on 3 CPU devices, 1 MB of state each, counted DEVICE_COPIES (set to 1 here)
    + HOST_COPIES = 3 times: 36 MB for one copy, 72 MB for two; 50 MB are available."""
    layout = pop.make_layout(10, "loop", THREE)
    monkeypatch.setattr(pop, "DEVICE_COPIES", 1)
    monkeypatch.setattr(pop, "host_available_bytes", lambda: 50 * 10**6)
    assert strategy_tuning._fits(layout, 2, 10**6, 0)
    assert not strategy_tuning._fits(layout, 2, 10**6, 0, state_copies=2)


# --- auto in training runs -------------------------------------------------------------------


def auto_run(workdir, devices=THREE, stop=True, **config):
    """A run of 10 models with population.strategy=auto, stopped once set up (tuning done)."""
    c = tiny.tiny_config(10, strategy="auto", **config)
    return loop.train_and_evaluate(c, str(workdir), devices=devices, should_stop=(lambda: True) if stop else None)


@pytest.fixture
def measure_everything(monkeypatch):
    """Every candidate is measured: no budget, no stopping early."""
    monkeypatch.setattr(strategy_tuning, "MIN_TUNING_SECONDS", 1e9)
    monkeypatch.setattr(strategy_tuning, "STOP_RATIO", float("inf"))


@pytest.mark.slow
def test_auto_records_the_fastest_and_reuses_it_on_resume(tmp_path, caplog, measure_everything):
    caplog.set_level(logging.INFO, logger="cka_jax.train.strategy_tuning")
    auto_run(tmp_path)
    path = Workdir(str(tmp_path)).population_strategy
    with open(path) as f:
        record = json.load(f)
    measured = {c["models_per_call"]: c for c in record["candidates"]}
    assert sorted(measured) == [1, 2, 4] and all(c["status"] == "measured" for c in measured.values())
    assert all(
        c["compile_s"] > 0 and len(c["step_times_s"]) == 1 + strategy_tuning.TIMED_STEPS for c in measured.values()
    )
    assert record["models_per_call"] == min(measured, key=lambda c: measured[c]["relative"])
    assert record["timing"] == "interleaved" and measured[1]["timing"] == "alone"
    for c in (2, 4):  # each against the best before it, in one window
        window = measured[c]["best_times_s"]
        assert measured[c]["timing"] == "interleaved" and measured[c]["compared_with"] in (1, 2)
        assert len(window) == strategy_tuning.TIMED_STEPS
        assert measured[c]["ratio"] == pytest.approx(measured[c]["step_s"] / min(window))
    assert record["layout"] == {**record["layout"], "num_devices": 3, "per_device": 4, "size": 10}
    assert "population step of 1: " in caplog.text
    caplog.clear()
    with open(path, "rb") as f:
        before = f.read()
    auto_run(tmp_path)  # resumes: same layout, so nothing is measured
    assert "as measured before" in caplog.text and "population step of" not in caplog.text
    with open(path, "rb") as f:
        assert f.read() == before
    caplog.clear()
    auto_run(tmp_path, devices=jax.devices()[:2])  # 5 per device: measured again
    assert "measured for another layout (num_devices 3 -> 2, per_device 4 -> 5)" in caplog.text
    with open(path) as f:
        assert json.load(f)["layout"]["num_devices"] == 2


@pytest.mark.slow
def test_auto_times_one_after_the_other_where_two_copies_do_not_fit(tmp_path, monkeypatch, measure_everything):
    fits = strategy_tuning._fits
    monkeypatch.setattr(strategy_tuning, "_fits", lambda *args, state_copies=1: state_copies == 1 and fits(*args))
    auto_run(tmp_path)
    with open(Workdir(str(tmp_path)).population_strategy) as f:
        record = json.load(f)
    assert record["timing"] == "sequential: two throwaway copies do not fit in memory"
    assert [c["timing"] for c in record["candidates"]] == ["alone", "sequential", "sequential"]
    assert all(c["best_times_s"] == [] for c in record["candidates"])


@pytest.mark.slow
def test_a_fixed_strategy_measures_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cka_jax.train.strategy_tuning")
    loop.train_and_evaluate(tiny.tiny_config(10, strategy="2"), str(tmp_path), devices=THREE, should_stop=lambda: True)
    assert not os.path.exists(Workdir(str(tmp_path)).population_strategy)
    assert "population.strategy=auto" not in caplog.text


@pytest.mark.slow
def test_auto_trains_exactly_like_its_choice_given_explicitly(tmp_path, measure_everything):
    result = auto_run(tmp_path / "auto", stop=False)
    with open(Workdir(str(tmp_path / "auto")).population_strategy) as f:
        chosen = json.load(f)["models_per_call"]
    config = tiny.tiny_config(10, strategy=str(chosen))
    explicit = loop.train_and_evaluate(config, str(tmp_path / "explicit"), devices=THREE)
    np.testing.assert_array_equal(result.test_accuracy, explicit.test_accuracy)
    logits = [np.load(Workdir(str(tmp_path / name)).predictions)["logits"] for name in ("auto", "explicit")]
    np.testing.assert_array_equal(logits[0], logits[1])
