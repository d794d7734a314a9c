"""population.strategy as a chunk size: the same numbers at every size, bad values refused, and
`auto` measuring (choice, budget, record, reuse on resume, agreement with an explicit size)."""

import importlib.util
import json
import logging
import os
import re

import jax
import numpy as np
import pytest
import tiny
from absl import flags

from cka_jax.train import config as run_config
from cka_jax.train import loop, run_checks, strategy_tuning
from cka_jax.train import population as pop
from cka_jax.train import step as training
from cka_jax.train.chunked_states import ChunkedStates
from cka_jax.train.device_batches import open_inputs
from cka_jax.workdir import Workdir

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


def _train_py():
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(tiny.ROOT, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_command_line_gives_a_chunk_size_as_a_string_that_validates():
    train_py = _train_py()
    command = train_py.TrainCommand(flags.FlagValues())
    command.parse_flags(["train.py", *tiny.TINY_FLAGS, "--config.population.strategy=2"])
    config = command.config.value
    assert config.population.strategy == "2"
    _, layout = run_checks.check_run(config, jax.devices()[:1])  # size=2 on one device
    assert layout.models_per_call == 2


@pytest.mark.slow
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
    code, err = tiny.run_train(
        *tiny.TINY_FLAGS, "--workdir", str(tmp_path / "run"), f"--config.population.strategy={value}", timeout=120
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


def fake_measure(step_s, compile_s=1.0, setup_s=0.1):
    """measure(c) of the tuning rule from a table of step times; records the sizes measured."""
    calls = []

    def measure(c):
        calls.append(c)
        return setup_s, compile_s, [10 * step_s[c]] + [step_s[c]] * strategy_tuning.TIMED_STEPS

    return measure, calls


def test_tuning_takes_the_fastest_and_stops_after_a_much_slower_one():
    measure, calls = fake_measure({1: 1.0, 2: 0.5, 4: 0.55, 8: 0.7, 16: 0.3})
    tuning = strategy_tuning.tune([1, 2, 4, 8, 16], measure, total_steps=10**6)
    assert calls == [1, 2, 4, 8] and tuning.models_per_call == 2  # 8 is 1.4x the best: 16 is not tried
    assert [c.status for c in tuning.candidates] == ["measured"] * 4 + ["stopped early"]
    assert tuning.candidates[1].step_s == 0.5


def test_tuning_stays_within_its_budget():
    # a 10 s run (1000 steps of 10 ms) gets the minimum budget: another 8 s compile does not fit
    measure, calls = fake_measure({1: 0.01, 2: 0.005}, compile_s=8.0)
    tuning = strategy_tuning.tune([1, 2], measure, total_steps=1000)
    assert calls == [1] and tuning.models_per_call == 1 and tuning.budget_s == strategy_tuning.MIN_TUNING_SECONDS
    assert tuning.candidates[1].status == "over the budget"
    # a run of 10^4 s (10^6 steps of 10 ms) may add 100 s, less as faster sizes shorten the run:
    # 1 (its compile is not counted), 2 (budget 50 s), 4 (25 s), and 8 would pass 25 s
    measure, calls = fake_measure({c: 0.01 / c for c in (1, 2, 4, 8, 16)}, compile_s=10.0)
    tuning = strategy_tuning.tune([1, 2, 4, 8, 16], measure, total_steps=10**6)
    assert calls == [1, 2, 4] and tuning.models_per_call == 4
    assert tuning.budget_s == pytest.approx(0.01 * 0.0025 * 10**6) and 20 < tuning.added_s <= tuning.budget_s
    assert [c.status for c in tuning.candidates[3:]] == ["over the budget"] * 2


def test_a_single_candidate_is_taken_without_measuring():
    measure, calls = fake_measure({1: 1.0})
    tuning = strategy_tuning.tune([1], measure, total_steps=100)
    assert calls == [] and tuning.models_per_call == 1 and tuning.candidates[0].status == "only one"


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
    assert record["models_per_call"] == min(measured, key=lambda c: measured[c]["step_s"])
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
