"""The run directory: Workdir names every file, the two config copies are read and written there."""

import json
import os

import pytest

from cka_jax.workdir import CONFIG_COPIES, Workdir, config_copies, metrics_log
from cka_jax.workdir import lock as workdir_lock


def test_every_file_is_named_by_workdir(tmp_path):
    files = Workdir(str(tmp_path))
    assert files.config_copies == tuple(str(tmp_path / name) for name in CONFIG_COPIES)
    assert metrics_log.path_in(str(tmp_path)) == files.metrics == str(tmp_path / "metrics.jsonl")
    assert files.predictions == os.path.join(files.predictions_dir, "test.npz")
    lock = workdir_lock.acquire(str(tmp_path / "run"))
    try:
        assert os.path.exists(Workdir(str(tmp_path / "run")).lock)
    finally:
        lock.release()


def test_config_copies_round_trip_and_a_damaged_copy_is_named(tmp_path):
    def parse(path):
        with open(path) as f:
            return json.load(f)

    workdir = str(tmp_path)
    assert config_copies.read(workdir, parse) == {} and not config_copies.holds_run(workdir)
    config_copies.write(workdir, {"train.epochs": 2})
    assert config_copies.read(workdir, parse) == {name: {"train.epochs": 2} for name in CONFIG_COPIES}
    with open(Workdir(workdir).checkpoint_config, "w") as f:
        f.write("{oops")
    with pytest.raises(config_copies.DamagedConfigError, match="checkpoints/config.json is damaged.*delete it"):
        config_copies.read(workdir, parse)
    os.makedirs(Workdir(workdir).predictions_dir)
    assert config_copies.holds_run(workdir)
