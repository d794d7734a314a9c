"""Training runs: config errors, outputs, interrupt/resume equality, corrupt-checkpoint fallback."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import tiny

from cka_jax.train import checkpoints, loop
from cka_jax.train import run_checks as checks
from cka_jax.workdir.config import base_config, validate_config
from cka_jax.workdir.trained import load_trained_population

jax.config.update("jax_compilation_cache_dir", tiny.CACHE_DIR)
ONE_DEVICE = jax.devices()[:1]


def tiny_config(size=3, epochs=2):
    return tiny.tiny_config(size, epochs, warmup_epochs=0.5, milestones=(0.0, 0.5, 1.0))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.data.__setattr__("name", "mnist"), "unknown data set 'mnist'"),
        (lambda c: c.model.__setattr__("name", "vgg"), "unknown model 'vgg'"),
        (lambda c: c.model.__setattr__("depth", 15), "depth must be 6n"),
        (lambda c: c.population.__setattr__("size", 0), "population.size must be >= 1"),
        (lambda c: c.data.__setattr__("fraction", 0.0), "data.fraction"),
    ],
)
def test_invalid_configs_fail_before_any_work(tmp_path, change, message):
    config = tiny_config()
    change(config)
    with pytest.raises(checks.RunConfigError, match=message):
        loop.train_and_evaluate(config, str(tmp_path / "run"), devices=ONE_DEVICE)
    assert not (tmp_path / "run").exists()


def test_unknown_config_field_is_named():
    config = tiny_config()
    config.unlock()
    config.train.learning_rat = 0.1
    with pytest.raises(ValueError, match="unknown config field 'train.learning_rat'"):
        validate_config(config)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    return workdir, loop.train_and_evaluate(tiny_config(), workdir, devices=ONE_DEVICE)


@pytest.mark.slow
def test_outputs(uninterrupted):
    workdir, result = uninterrupted
    assert not result.interrupted and result.step == result.total_steps == 8
    predictions = np.load(os.path.join(workdir, "predictions", "test.npz"))
    assert predictions["logits"].shape == (3, 360, 10) and predictions["labels"].shape == (360,)
    np.testing.assert_allclose(
        (predictions["logits"].argmax(-1) == predictions["labels"]).mean(-1), result.test_accuracy
    )
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [(r["epoch"], r["model"]) for r in rows] == [(e, m) for e in (1, 2) for m in range(3)]
    assert {"train_loss", "train_accuracy", "test_accuracy", "step", "learning_rate", "images_per_second"} <= set(
        rows[0]
    )
    assert rows[-1]["test_accuracy"] == pytest.approx(result.test_accuracy[2])
    assert json.load(open(os.path.join(workdir, "config.json")))["model.depth"] == 8
    # milestones 0, 50%, 100% of 8 steps are kept
    assert {0, 4, 8} <= set(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    config, model, variables, step = load_trained_population(workdir)
    assert step == 8 and jax.tree.leaves(variables["params"])[0].shape[0] == 3


@pytest.mark.slow
def test_workdir_with_a_different_config_is_refused(uninterrupted):
    workdir, _ = uninterrupted
    config = tiny_config()
    config.model.width = 0.5
    with pytest.raises(checks.RunConfigError, match="different config.*model.width"):
        loop.train_and_evaluate(config, workdir, devices=ONE_DEVICE)


def _params(workdir, step=None):
    return jax.tree.leaves(load_trained_population(workdir, step)[2])


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    workdir = str(tmp_path / "run")
    calls = iter(range(100))
    stopped = loop.train_and_evaluate(
        tiny_config(), workdir, devices=ONE_DEVICE, should_stop=lambda: next(calls) == 3
    )  # polled after setup, then per step: stops at step 3
    assert stopped.interrupted and stopped.step == 3
    resumed = loop.train_and_evaluate(tiny_config(), workdir, devices=ONE_DEVICE)
    assert not resumed.interrupted and resumed.step == 8
    for a, b in zip(_params(workdir), _params(reference), strict=True):
        np.testing.assert_array_equal(a, b)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    reference_rows = [json.loads(line) for line in open(os.path.join(reference, "metrics.jsonl"))]
    for row, ref in zip(rows, reference_rows, strict=True):  # same epochs, same numbers
        assert row["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
        assert row["test_accuracy"] == ref["test_accuracy"]

    # Corrupt the latest checkpoint: it is reported, set aside, and the previous one resumes.
    ckpt_dir = os.path.join(workdir, "checkpoints")
    for root, _, files in os.walk(os.path.join(ckpt_dir, "8")):
        for name in files:
            if not name.startswith("_CHECKPOINT_METADATA"):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"\0garbage")
    again = loop.train_and_evaluate(tiny_config(), workdir, devices=ONE_DEVICE)
    assert again.step == 8 and os.path.isdir(ckpt_dir + ".corrupt/8")
    for a, b in zip(_params(workdir), _params(reference), strict=True):
        np.testing.assert_array_equal(a, b)


def test_corrupt_latest_checkpoint_is_reported(tmp_path, caplog):
    manager = checkpoints.PopulationCheckpoints(str(tmp_path / "ck"), max_to_keep=3)
    state = {"w": jax.numpy.arange(4.0)}
    manager.save(1, state)
    manager.save(2, jax.tree.map(lambda x: x + 1, state))
    manager.wait()
    shutil.rmtree(os.path.join(tmp_path, "ck", "2", "default"))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    step, restored = manager.restore_latest(abstract)
    manager.close()
    assert step == 1 and np.array_equal(restored["w"], np.arange(4.0))
    assert "step 2" in caplog.text and "cannot be restored" in caplog.text


@pytest.mark.slow
def test_streamed_imagenet_path_trains_and_predicts(tmp_path):
    import tensorflow_datasets as tfds

    c = base_config()
    c.data.name, c.data.image_size, c.data.num_workers = "imagenet2012", 32, 2
    c.model.name, c.model.stage_sizes, c.model.stage_widths = "imagenet_resnet", (1, 1, 1, 1), (0.125,) * 4
    c.population.size, c.population.shared_data_order = 2, True
    c.train.epochs, c.train.batch_size, c.train.eval_batch_size = 2, 8, 8
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        result = loop.train_and_evaluate(c, str(tmp_path), devices=ONE_DEVICE)
    predictions = np.load(tmp_path / "predictions" / "test.npz")
    assert result.step == 4 and predictions["logits"].shape == (2, 20, 1000)
    assert np.isfinite(predictions["logits"]).all() and predictions["labels"].shape == (20,)


def test_step_plan_says_which_steps_end_epochs_save_and_evaluate():
    config = tiny_config(epochs=4)  # 4 steps per epoch, 16 in all; milestones at 0, 8, 16
    config.checkpoint.every_steps, config.train.eval_every_epochs = 6, 3
    plan = loop.StepPlan.of(config, steps_per_epoch=4)
    assert plan.total_steps == 16 and plan.milestones == {0, 8, 16}
    assert [s for s in range(1, 17) if plan.saves_at(s)] == [6, 8, 12, 16]
    assert [s for s in range(1, 17) if plan.ends_epoch(s)] == [4, 8, 12, 16]
    assert [s for s in (4, 8, 12, 16) if plan.evaluates_at(s)] == [12, 16]
    assert [plan.epoch_end_after(s) for s in (0, 3, 4)] == [4, 4, 8] and plan.epoch_of(5) == 2
