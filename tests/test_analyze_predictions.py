"""Analyses from predictions alone: streamed (ImageNet) workdirs, read without their models
(analyze.py run in this process: `run_analyze_here`)."""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from in_process import run_analyze_here

from cka_jax.analysis import runner
from cka_jax.analysis.inputs import AnalysisInputError, load_correct, load_labels
from cka_jax.train import loop as trainer
from cka_jax.workdir import Workdir
from cka_jax.workdir.config import base_config


def predictions_file(workdir) -> str:
    """Path of the predictions file of `workdir`, its directory created."""
    path = Workdir(str(workdir)).predictions
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_load_correct_equals_argmax_of_all_logits(tmp_path, dtype):
    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((3, 50, 7)).astype(dtype), rng.integers(0, 7, 50)
    np.savez(predictions_file(tmp_path), logits=logits, labels=labels)
    correct, read_labels = load_correct(str(tmp_path))
    np.testing.assert_array_equal(correct, logits.argmax(-1) == labels)
    np.testing.assert_array_equal(read_labels, labels)


def test_load_correct_refuses_logits_that_do_not_match_the_labels(tmp_path):
    np.savez(predictions_file(tmp_path), logits=np.zeros((2, 5, 3)), labels=np.zeros(4, int))
    with pytest.raises(AnalysisInputError, match=r"\(2, 5, 3\).*4 labels"):
        load_correct(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_predictions_are_a_clear_error(tmp_path, damage):
    path = pathlib.Path(predictions_file(tmp_path))
    np.savez(path, logits=np.zeros((2, 5, 3), np.float16), labels=np.zeros(5, int))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not an npz file" * 10)
    for load in (load_correct, load_labels):
        with pytest.raises(AnalysisInputError, match="test.npz cannot be read.*delete it and run `python train.py"):
            load(str(tmp_path))


def save_predictions(directory, logits, labels):
    np.savez(predictions_file(directory), logits=logits, labels=labels)


def good_predictions():
    rng = np.random.default_rng(0)
    return rng.standard_normal((3, 20, 10)).astype(np.float32), rng.integers(0, 10, 20)


def _nan_logits(logits, labels):
    logits[2, 7, 3] = np.nan
    return logits, labels


def _inf_logits(logits, labels):
    logits[0, 0, 0] = -np.inf
    return logits, labels


BAD_PREDICTIONS = {
    "nan-logits": (_nan_logits, "logits of model 2 are not all finite"),
    "inf-logits": (_inf_logits, "logits of model 0 are not all finite"),
    "5-classes": (lambda g, y: (g[..., :5], y % 5), "logits over 5 classes, but the data set has 10"),
    "2-models": (lambda g, y: (g[:2], y), "logits of 2 models, but the population has 3"),
    "int-logits": (lambda g, y: ((g * 10).astype(np.int32), y), "logits of dtype int32"),
    "complex-logits": (lambda g, y: (g.astype(np.complex64), y), "logits of dtype complex64"),
    "labels-too-large": (lambda g, y: (g, np.where(np.arange(20) == 4, 10, y)), r"labels lie in \[0, 10\]"),
    "negative-labels": (lambda g, y: (g, np.where(np.arange(20) == 4, -1, y)), r"labels lie in \[-1, "),
    "float-labels": (lambda g, y: (g, y.astype(np.float32)), "labels must be a non-empty \\(N,\\) integer array"),
    "2d-logits": (lambda g, y: (g[0], y), r"logits of shape \(20, 10\)"),
}


@pytest.mark.parametrize("damage", list(BAD_PREDICTIONS))
def test_load_correct_refuses_bad_predictions(tmp_path, damage):
    make, message = BAD_PREDICTIONS[damage]
    save_predictions(tmp_path, *make(*good_predictions()))
    with pytest.raises(AnalysisInputError, match=message):
        load_correct(str(tmp_path), num_classes=10, num_models=3)


def test_load_correct_accepts_good_predictions_with_class_and_model_counts(tmp_path):
    logits, labels = good_predictions()
    save_predictions(tmp_path, logits, labels)
    correct, _ = load_correct(str(tmp_path), num_classes=10, num_models=3)
    np.testing.assert_array_equal(correct, logits.argmax(-1) == labels)


def test_empty_predictions_file_is_a_clear_error(tmp_path):
    open(predictions_file(tmp_path), "wb").close()
    for load in (load_correct, load_labels):
        with pytest.raises(AnalysisInputError, match="test.npz cannot be read"):
            load(str(tmp_path))


def plant(workdir: str, labels: np.ndarray, wrong: np.ndarray, size: int) -> None:
    """predictions/test.npz (float16, as ImageNet runs write it): every model right except on `wrong`."""
    logits = np.zeros((size, len(labels), 1000), np.float16)
    logits[:, np.arange(len(labels)), labels] = 1
    logits[:, wrong, (labels[wrong] + 1) % 1000] = 2
    np.savez(Workdir(workdir).predictions, logits=logits, labels=labels)


@pytest.fixture(scope="module")
def imagenet_runs(tmp_path_factory):
    """Two ImageNet populations trained on tfds mock data; their predictions are replaced by planted
    ones: population B is wrong on every example of the classes of the first three examples."""
    import tensorflow_datasets as tfds

    c = base_config()
    c.data.name, c.data.image_size, c.data.num_workers = "imagenet2012", 32, 2
    c.model.name, c.model.stage_sizes, c.model.stage_widths = "imagenet_resnet", (1, 1, 1, 1), (0.125,) * 4
    c.population.size, c.population.shared_data_order = 2, True
    c.train.epochs, c.train.batch_size, c.train.eval_batch_size = 1, 8, 8
    root = tmp_path_factory.mktemp("imagenet")
    deeper, wider = str(root / "in_deeper"), str(root / "in_wider")
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        trainer.train_and_evaluate(c, deeper, devices=jax.devices()[:1])
    shutil.copytree(deeper, wider)
    labels = np.load(Workdir(deeper).predictions)["labels"]
    planted = np.unique(labels[:3])
    plant(deeper, labels, np.zeros(len(labels), bool), 2)
    plant(wider, labels, np.isin(labels, planted), 2)
    return deeper, wider, planted


@pytest.mark.slow
def test_streamed_populations_are_compared_from_predictions(imagenet_runs, tmp_path):
    deeper, wider, planted = imagenet_runs
    out = str(tmp_path / "analysis")
    result = run_analyze_here(f"--workdir={deeper}", f"--compare={wider}", f"--outdir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.load(open(os.path.join(out, "disagreement.json")))[0]
    assert record["classes_differing"] == planted.tolist()
    import tensorflow_datasets as tfds

    wnids = tfds.builder("imagenet2012").info.features["label"].names
    assert record["class_names_differing"] == [wnids[c] for c in planted]
    assert record["overall"]["mean_a"] == 1.0 and record["overall"]["mean_b"] < 1.0
    assert sorted(os.listdir(os.path.join(out, "sections"))) == ["disagreement.json", "training.json"]
    page = open(os.path.join(out, "report.html")).read()
    assert f"{len(planted)} of 1000 classes differ" in page and "predictions/test.npz" in page


@pytest.mark.slow
def test_streamed_populations_are_not_restored(imagenet_runs):
    ctx = runner.load_context(imagenet_runs[0], [imagenet_runs[1]], images=False)
    assert ctx.test.images is None and ctx.test.num_classes == 1000 and len(ctx.test.labels) == 20
    assert [p.variables for p in ctx.populations] == [None, None]
    assert [p.size for p in ctx.populations] == [2, 2] and ctx.main.step == 2


@pytest.mark.slow
def test_image_analyses_of_streamed_populations_are_refused(imagenet_runs, tmp_path):
    deeper, wider, _ = imagenet_runs
    out = str(tmp_path / "out")
    result = run_analyze_here(
        f"--workdir={deeper}", f"--compare={wider}", f"--outdir={out}", "--analyses=within,disagreement"
    )
    assert result.returncode == 2 and "['within'] need the test images in memory" in result.stderr
    assert not os.path.exists(out)
    with pytest.raises(AnalysisInputError, match="'imagenet2012' is streamed"):
        runner.load_context(deeper)


@pytest.mark.slow
def test_streamed_population_alone_gets_its_training_curves(imagenet_runs, tmp_path):
    out = str(tmp_path / "out")
    result = run_analyze_here(f"--workdir={imagenet_runs[0]}", f"--outdir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(out, "sections"))) == ["training.json"]
    assert os.path.exists(os.path.join(out, "training_curves.png"))
    assert json.load(open(os.path.join(out, "training.json")))[0]["num_models"] == 2


def test_choose_analyses_without_images():
    assert runner.choose_analyses([], has_compare=True, has_images=False) == ["training", "disagreement"]
    assert runner.choose_analyses(["disagreement"], has_compare=True, has_images=False) == ["training", "disagreement"]
    assert runner.choose_analyses([], has_compare=False, has_images=False) == ["training"]
    assert not runner.needs_images(["disagreement"]) and runner.needs_images(["disagreement", "seeds"])
