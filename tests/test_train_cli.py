"""train.py end to end: errors before work, SIGTERM checkpoint + resume, outputs; configs load."""

import importlib.util
import json
import os
import signal
import time

import numpy as np
import pytest
from in_process import run_train_here
from tiny import ROOT, run_train, start_train
from tiny import TINY_FLAGS as TINY

from cka_jax.train import launch, population
from cka_jax.train import run_checks as checks
from cka_jax.workdir.config import validate_config


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.model.depht=8"], "unknown config field 'depht'; did you mean 'depth'?"),
        (["--config.model.depth=15"], "depth must be 6n"),
        (["--config.data.name=mnist"], "unknown data set 'mnist'"),
    ],
)
def test_bad_runs_fail_with_one_clear_line(tmp_path, args, message):
    code, err = run_train_here(*TINY, "--workdir", str(tmp_path / "run"), *args)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sigterm_checkpoints_and_rerun_resumes_to_the_outputs(tmp_path):
    workdir = str(tmp_path / "run")
    args = [*TINY, "--config.train.epochs=20", "--workdir", workdir]
    proc = start_train(*args)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 120
    while not (os.path.exists(metrics) and os.path.getsize(metrics)) and proc.poll() is None:
        assert time.time() < deadline, "no epoch finished in time"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "run the same command to resume" in err
    stopped_at = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert 0 < stopped_at < 20 * 4

    proc = start_train(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    predictions = np.load(os.path.join(workdir, "predictions", "test.npz"))
    assert predictions["logits"].shape == (2, 360, 10) and predictions["labels"].shape == (360,)
    rows = [json.loads(line) for line in open(metrics)]
    assert [(r["epoch"], r["model"]) for r in rows] == [(e, m) for e in range(1, 21) for m in (0, 1)]
    assert np.mean([r["test_accuracy"] for r in rows[-2:]]) > 0.3  # it learns (chance: 0.1)


@pytest.mark.parametrize(
    "config_file, arg",
    [
        ("digits.py", None),
        ("digits.py", "depth=56,warmup=5"),
        ("cifar10.py", None),
        ("cifar10.py", "depth=62,width=1,residual=false,fraction=0.125,size=8"),
        ("cifar100.py", "depth=26,width=2"),
        ("paper_pairs.py", "deep"),
        ("paper_pairs.py", "wide,size=4"),
        # ResNet-50 and its variants are traced (not run): about a second each
        pytest.param("imagenet_resnet50.py", "base", marks=pytest.mark.slow),
        pytest.param("imagenet_resnet50.py", "deeper", marks=pytest.mark.slow),
        pytest.param("imagenet_resnet50.py", "wider,size=2", marks=pytest.mark.slow),
    ],
)
def test_shipped_configs_are_valid(config_file, arg, monkeypatch):
    monkeypatch.setattr(population, "host_available_bytes", lambda: None)  # not this machine's RAM
    spec = importlib.util.spec_from_file_location(config_file[:-3], os.path.join(ROOT, "configs", config_file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    validate_config(config)
    checks.check_run(config)


def test_paper_pairs_are_the_papers_architectures():
    spec = importlib.util.spec_from_file_location("paper_pairs", os.path.join(ROOT, "configs", "paper_pairs.py"))
    paper_pairs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper_pairs)
    deep, wide = paper_pairs.get_config("deep"), paper_pairs.get_config("wide")
    assert (deep.model.depth, deep.model.width, deep.population.size) == (62, 1.0, 100)
    assert (wide.model.depth, wide.model.width, wide.data.name) == (14, 2.0, "cifar10")


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(process_id=2, num_processes=2, coordinator_address="10.0.0.1:7777"), "--process_id=2 must be from 0"),
        (dict(process_id=-1, num_processes=2, coordinator_address="10.0.0.1:7777"), "--process_id=-1 must be from 0"),
        (dict(process_id=0, num_processes=0, coordinator_address="10.0.0.1:7777"), "--num_processes=0 must be"),
        (dict(num_processes=2), "--coordinator_address and --process_id missing"),
        (dict(process_id=0, coordinator_address="h:1"), "--num_processes missing"),
        (dict(process_id=0, num_processes=2, coordinator_address="10.0.0.1"), "is not host:port"),
        (dict(process_id=0, num_processes=2, coordinator_address=":7777"), "is not host:port"),
        (dict(process_id=0, num_processes=2, coordinator_address="h:http"), "port 'http'"),
        (dict(process_id=0, num_processes=2, coordinator_address="h:0"), "port '0'"),
        (dict(process_id=0, num_processes=2, coordinator_address="::1:7777"), "IPv6 host in brackets"),
        (dict(distributed=True, initialization_timeout=0), "--initialization_timeout=0 must be at least 1"),
        (dict(distributed=True, heartbeat_timeout_seconds=-5), "--heartbeat_timeout_seconds=-5 must be at least 1"),
    ],
)
def test_bad_process_flags_are_refused_naming_the_flag(flags, message):
    args = {"distributed": False, "coordinator_address": None, "num_processes": None, "process_id": None, **flags}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        launch.distributed_options(**args)


def test_process_flags_select_distributed_initialization():
    options = launch.distributed_options
    assert options(False, None, None, None) is None  # one process: nothing to initialize
    assert options(True, None, None, None, 60, 20) == {"initialization_timeout": 60, "heartbeat_timeout_seconds": 20}
    explicit = options(False, "[::1]:7777", 4, 3)  # the three flags imply --distributed
    assert explicit == dict(
        coordinator_address="[::1]:7777",
        num_processes=4,
        process_id=3,
        initialization_timeout=300,
        heartbeat_timeout_seconds=100,
    )


@pytest.mark.slow
def test_bad_process_flags_exit_2_with_one_line_before_any_work(tmp_path):
    code, err = run_train(
        *TINY, "--workdir", str(tmp_path / "run"), "--num_processes=2", "--process_id=2", "--coordinator_address=h:1"
    )
    assert code == 2 and err.count("\n") == 1 and "--process_id=2 must be from 0 to" in err, err
    assert not (tmp_path / "run").exists()
