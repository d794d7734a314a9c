"""Checkpoints under attack: damaged files, reading beside a training, a full disk, a population
that cannot fit in memory. Each is refused or fallen back from with one line, never restored
silently, and nothing already written is lost."""

import errno
import json
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny
from fresh_interpreter import run_fresh

from cka_jax.analysis import inputs as analysis_workdir
from cka_jax.train import checkpoints, loop
from cka_jax.train import population as pop
from cka_jax.train import run_checks as checks
from cka_jax.workdir import checkpoint_manifest
from cka_jax.workdir.trained import load_trained_population

jax.config.update("jax_compilation_cache_dir", tiny.CACHE_DIR)
ONE_DEVICE = jax.devices()[:1]
NOISE = ("Traceback", "Event loop is closed", "TensorStore", "Exception ignored")
ITEM, MANIFEST = "default", "cka_jax_manifest.json"  # on-disk format: <step>/default/<manifest>


def tiny_config(size=2, epochs=2):
    return tiny.tiny_config(size, epochs, milestones=(0.0, 0.5, 1.0))  # steps 0, 4, 8 kept for good


# ----------------------------------------------------------------------------- damage


def _item(directory, step):
    return os.path.join(directory, str(step), ITEM)


def _largest_file(directory, step):
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(_item(directory, step))
        for name in names
        if name != MANIFEST
    ]
    return max(files, key=os.path.getsize)


def flip_42_bytes(directory, step):
    path = _largest_file(directory, step)
    data = bytearray(open(path, "rb").read())
    for i in np.linspace(len(data) // 4, 3 * len(data) // 4, 42).astype(int):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def truncate(directory, step):
    path = _largest_file(directory, step)
    os.truncate(path, os.path.getsize(path) // 2)


def delete_data_file(directory, step):
    os.remove(_largest_file(directory, step))


def delete_manifest(directory, step):
    os.remove(os.path.join(_item(directory, step), MANIFEST))


def garble_manifest(directory, step):
    open(os.path.join(_item(directory, step), MANIFEST), "w").write("{not json")


def copied_from_an_earlier_step(directory, step):
    """`cp -r <earlier> <step>` (or a `mv`): a whole, verified checkpoint under another step's name."""
    earlier = max(s for s in map(int, filter(str.isdigit, os.listdir(directory))) if s < step)
    shutil.rmtree(os.path.join(directory, str(step)))
    shutil.copytree(os.path.join(directory, str(earlier)), os.path.join(directory, str(step)))


def delete_data_file_and_its_checksum(directory, step):
    """Damage the manifest cannot see: orbax itself fails (and used to print 4,700 lines)."""
    path = _largest_file(directory, step)
    manifest_path = os.path.join(_item(directory, step), MANIFEST)
    manifest = json.load(open(manifest_path))
    del manifest["files"][os.path.relpath(path, _item(directory, step))]
    json.dump(manifest, open(manifest_path, "w"))
    os.remove(path)


DAMAGES = [
    pytest.param(flip_42_bytes, "differs from its recorded checksum", id="flipped-bytes"),
    pytest.param(truncate, "bytes, ", id="truncated"),
    pytest.param(delete_data_file, "is missing", id="deleted-file"),
    pytest.param(delete_manifest, "no checksum manifest", id="no-manifest"),
    pytest.param(garble_manifest, "manifest", id="garbled-manifest"),
    pytest.param(delete_data_file_and_its_checksum, "orbax failed", id="orbax-fails"),
    pytest.param(copied_from_an_earlier_step, "its state is at step 1, not 2", id="another-steps-state"),
]


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _fallback_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == checkpoints.logger.name]


@pytest.fixture
def saved(tmp_path):
    """A checkpoint directory with steps 1 and 2 of a small state; yields (manager, state)."""
    manager = checkpoints.PopulationCheckpoints(str(tmp_path / "ck"), max_to_keep=3)
    state = {"w": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64), "b": jnp.ones(8), "step": jnp.ones(4, int)}
    manager.save(1, state)
    manager.save(2, jax.tree.map(lambda x: x + 1, state))
    manager.wait()
    yield manager, state
    manager.close()


@pytest.mark.parametrize("damage, reason", DAMAGES)
def test_damaged_latest_checkpoint_is_set_aside_in_one_line(saved, damage, reason, caplog, capfd):
    manager, state = saved
    damage(manager.directory, 2)
    capfd.readouterr()
    step, restored = manager.restore_latest(_abstract(state))
    assert step == 1 and np.array_equal(restored["w"], state["w"])
    (line,) = _fallback_lines(caplog)
    assert f"step 2 in {manager.directory}" in line and reason in line
    assert f"moved it to {manager.directory}.corrupt/2" in line
    assert "falling back to the checkpoint at step 1" in line
    assert os.path.isdir(manager.directory + ".corrupt/2") and manager.all_steps() == [1]
    err = capfd.readouterr().err
    assert not any(noise in err for noise in NOISE), err[:2000]


def test_when_every_checkpoint_is_damaged_training_restarts_from_scratch(saved, caplog):
    manager, state = saved
    flip_42_bytes(manager.directory, 2)
    delete_manifest(manager.directory, 1)
    assert manager.restore_latest(_abstract(state)) is None
    first, last = _fallback_lines(caplog)
    assert "falling back to the checkpoint at step 1" in first
    assert "no earlier checkpoint is left: training restarts from scratch (step 0)" in last


def test_a_damaged_checkpoint_set_aside_twice_keeps_both_copies(saved):
    manager, state = saved
    for expected in ("2", "2-2"):
        flip_42_bytes(manager.directory, 2)
        manager.restore_latest(_abstract(state))
        assert os.path.isdir(os.path.join(manager.directory + ".corrupt", expected))
        manager.save(2, jax.tree.map(lambda x: x + 1, state))
        manager.wait()


def test_every_checkpoint_carries_its_manifest(saved):
    manager, _ = saved
    assert (checkpoint_manifest.ITEM, checkpoint_manifest.MANIFEST) == (ITEM, MANIFEST)
    for step in (1, 2):
        assert checkpoint_manifest.manifest_problem(_item(manager.directory, step)) is None


def test_checkpoints_ignore_other_files_in_their_directory(saved):
    manager, state = saved
    open(os.path.join(manager.directory, "config.json"), "w").write("{}")
    assert manager.all_steps() == [1, 2]
    assert manager.restore_latest(_abstract(state))[0] == 2


# ----------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (checkpoints at steps 0, 4, 8) and its final parameters."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    loop.train_and_evaluate(tiny_config(), workdir, devices=ONE_DEVICE)
    return workdir, _params(workdir)


def _params(workdir, step=None):
    return jax.tree.leaves(load_trained_population(workdir, step)[2])


def _copy(workdir, tmp_path):
    target = str(tmp_path / "run")
    shutil.copytree(workdir, target)
    return target


@pytest.mark.slow
def test_resume_after_flipped_bytes_retrains_from_the_previous_checkpoint(trained, tmp_path, caplog):
    workdir = _copy(trained[0], tmp_path)
    flip_42_bytes(os.path.join(workdir, "checkpoints"), 8)
    result = loop.train_and_evaluate(tiny_config(), workdir, devices=ONE_DEVICE)
    assert result.step == 8 and os.path.isdir(os.path.join(workdir, "checkpoints.corrupt", "8"))
    (line,) = _fallback_lines(caplog)
    assert "step 8" in line and "falling back to the checkpoint at step 4" in line
    for a, b in zip(_params(workdir), trained[1], strict=True):  # the same run, not a damaged one
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_resume_after_a_renamed_checkpoint_retrains_from_the_previous_one(trained, tmp_path, caplog):
    """`mv checkpoints/4 checkpoints/8` used to resume as step 8 with step 4's state (and so end
    with other parameters): its state's own step says it is not step 8's, so it is set aside."""
    workdir = _copy(trained[0], tmp_path)
    directory = os.path.join(workdir, "checkpoints")
    shutil.rmtree(os.path.join(directory, "8"))
    os.rename(os.path.join(directory, "4"), os.path.join(directory, "8"))
    with pytest.raises(analysis_workdir.AnalysisInputError, match="step 8 .*its state is at step 4, not 8"):
        analysis_workdir.load_population(workdir)  # a reader refuses it, and moves nothing
    result = loop.train_and_evaluate(tiny_config(), workdir, devices=ONE_DEVICE)
    assert result.step == 8 and os.path.isdir(os.path.join(workdir, "checkpoints.corrupt", "8"))
    (line,) = _fallback_lines(caplog)
    assert "step 8" in line and "its state is at step 4, not 8" in line
    assert "moved it to" in line and "falling back to the checkpoint at step 0" in line
    for a, b in zip(_params(workdir), trained[1], strict=True):  # the same run, retrained from step 0
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("damage, reason", DAMAGES[:4])
def test_analysis_of_a_damaged_checkpoint_is_refused_naming_step_and_file(trained, tmp_path, damage, reason):
    workdir = _copy(trained[0], tmp_path)
    damage(os.path.join(workdir, "checkpoints"), 8)
    with pytest.raises(
        analysis_workdir.AnalysisInputError, match=f"step 8 .*{reason}.*python train.py --workdir {workdir}"
    ):
        analysis_workdir.load_population(workdir)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "8"))  # a reader moves nothing
    for a, b in zip(_params(workdir, 4), _params(trained[0], 4), strict=True):  # others still read
        np.testing.assert_array_equal(a, b)


def _saved_as_a_later_step(workdir, step, later):
    """The checkpoint at `step` of `workdir` saved again at step `later` (its state's step moved
    on to `later`) in a directory beside the workdir: what a training writes at step `later`.
    Returns that checkpoint's directory."""
    from cka_jax.train.run_checks import model_state_shape
    from cka_jax.workdir.config import build_model
    from cka_jax.workdir.trained import load_config

    config = load_config(workdir)
    one = model_state_shape(config, build_model(config))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def abstract_for(padded):
        size = padded or config.population.size
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct((size,) + a.shape, a.dtype, sharding=device), one)

    reader = checkpoints.PopulationCheckpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    _, state = reader.read(abstract_for, step)
    reader.close()
    writer = checkpoints.PopulationCheckpoints(workdir + ".later")
    writer.save(later, state.replace(step=state.step + (later - step)))
    writer.close()
    return os.path.join(workdir + ".later", str(later))


def _training_replaces_step_8_by_12(workdir, step_12):
    """What a running training does between two reads: write a newer checkpoint (`step_12`,
    from :func:`_saved_as_a_later_step`), delete one."""
    directory = os.path.join(workdir, "checkpoints")
    shutil.move(step_12, os.path.join(directory, "12"))
    shutil.rmtree(os.path.join(directory, "8"))


def _delete_during(monkeypatch, workdir, where):
    """Delete step 8 the first time the reader reaches ``where`` (verifying or restoring)."""
    step_12 = _saved_as_a_later_step(workdir, 8, 12)
    calls = []
    if where == "verifying":
        original, owner, name = checkpoint_manifest._digest, checkpoint_manifest, "_digest"
    else:
        original, owner, name = ocp.CheckpointManager.restore, ocp.CheckpointManager, "restore"

    def deleting(*args, **kwargs):
        if not calls and os.path.isdir(os.path.join(workdir, "checkpoints", "8")):
            calls.append(1)
            _training_replaces_step_8_by_12(workdir, step_12)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, deleting)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["verifying", "restoring"])
def test_reading_the_newest_checkpoint_while_training_deletes_it(trained, tmp_path, monkeypatch, where):
    workdir = _copy(trained[0], tmp_path)
    _delete_during(monkeypatch, workdir, where)
    _, _, variables, step = load_trained_population(workdir)
    assert step == 12  # the newest one when the read was retried
    for a, b in zip(jax.tree.leaves(variables), trained[1], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["verifying", "restoring"])
def test_a_requested_step_deleted_while_read_is_reported(trained, tmp_path, monkeypatch, where):
    workdir = _copy(trained[0], tmp_path)
    _delete_during(monkeypatch, workdir, where)
    with pytest.raises(
        analysis_workdir.AnalysisInputError, match="checkpoint at step 8 .* was deleted while it was read"
    ):
        analysis_workdir.load_population(workdir, step=8)


@pytest.mark.slow
def test_reads_that_keep_losing_the_race_say_training_is_still_writing(trained, tmp_path, monkeypatch):
    workdir = _copy(trained[0], tmp_path)

    def always_gone(self, step):
        raise self._gone(step)

    monkeypatch.setattr(checkpoints.VerifiedCheckpoints, "verify", always_gone)
    with pytest.raises(checkpoints.CheckpointGoneError, match="training is still writing"):
        load_trained_population(workdir)


def test_reading_restores_exactly_the_variables_training_resumes_from(trained, tmp_path):
    """Analyses restore only params and batch_stats (no optimizer state): the same arrays, dtypes
    and tree as the whole TrainState that training restores, padding dropped."""
    workdir = _copy(trained[0], tmp_path)
    config, model, variables, step = load_trained_population(workdir)
    one = checks.model_state_shape(config, model)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def abstract_for(padded):
        size = padded or config.population.size
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct((size,) + a.shape, a.dtype, sharding=device), one)

    manager = checkpoints.PopulationCheckpoints(os.path.join(workdir, "checkpoints"))
    resumed_step, state = manager.restore_latest(abstract_for)
    manager.close()
    whole = jax.tree.map(lambda x: x[: config.population.size], state.variables())
    assert resumed_step == step == 8
    assert jax.tree.structure(variables) == jax.tree.structure(whole)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(whole), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_reading_a_damaged_file_is_refused_naming_it(trained, tmp_path):
    workdir = _copy(trained[0], tmp_path)
    directory = os.path.join(workdir, "checkpoints")
    damaged = os.path.relpath(_largest_file(directory, 8), os.path.join(directory, "8"))
    flip_42_bytes(directory, 8)
    with pytest.raises(checkpoints.DamagedCheckpointError, match=f"step 8 .*file {damaged} differs"):
        load_trained_population(workdir)


def test_reading_a_population_loads_no_training_module(trained):
    """Restoring a population for analysis needs neither optax nor cka_jax.train (fresh interpreter)."""
    code = (
        "import sys\nfrom cka_jax.analysis import inputs\n"
        f"inputs.load_population({trained[0]!r})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'optax' or m.startswith('cka_jax.train')))\n"
    )
    result = run_fresh(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_reading_beside_a_running_training(tmp_path):
    """A real training that checkpoints every step and keeps one: reads return a whole, verified
    checkpoint (or say that training is still writing), never crash (2 in 3 did)."""
    workdir = str(tmp_path / "run")
    flags = _tiny_flags(workdir) + [
        "--config.train.epochs=6",
        "--config.checkpoint.every_steps=1",
        "--config.checkpoint.max_to_keep=1",
    ]
    training = tiny.start_train(*flags)
    steps, still_writing = [], 0
    try:
        while training.poll() is None:
            if not analysis_workdir.checkpoint_steps(workdir):
                continue
            try:
                steps.append(load_trained_population(workdir)[3])
            except checkpoints.CheckpointGoneError as error:
                assert "training is still writing" in str(error)
                still_writing += 1
    finally:
        stderr = training.communicate(timeout=300)[1]
    assert training.returncode == 0, stderr[-3000:]
    assert len(steps) > still_writing and steps == sorted(steps), (steps, still_writing)


# ----------------------------------------------------------------------------- disk full


def _fail_saves_from(monkeypatch, nth):
    """The nth and later checkpoint saves fail with ENOSPC in orbax's background finalize."""
    calls = []
    original = checkpoint_manifest.write_manifest

    def full(item_dir):
        calls.append(item_dir)
        if len(calls) >= nth:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), item_dir)
        original(item_dir)

    monkeypatch.setattr(checkpoint_manifest, "write_manifest", full)


@pytest.mark.slow
def test_disk_full_stops_in_one_line_and_a_rerun_resumes(trained, tmp_path, monkeypatch, capfd):
    workdir = str(tmp_path / "run")
    _fail_saves_from(monkeypatch, 2)  # step 0 is saved, step 4 is not
    capfd.readouterr()
    with pytest.raises(
        checkpoints.CheckpointWriteError,
        match=r"disk full writing the checkpoint at step 4 in .*checkpoints; earlier "
        r"checkpoints are kept \(latest: step 0\); free space and rerun",
    ):
        loop.train_and_evaluate(tiny_config(), workdir, devices=ONE_DEVICE)
    err = capfd.readouterr().err
    assert not any(noise in err for noise in NOISE), err[:2000]
    assert [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n != "config.json"] == ["0"]
    monkeypatch.undo()
    result = loop.train_and_evaluate(tiny_config(), workdir, devices=ONE_DEVICE)
    assert result.step == 8
    for a, b in zip(_params(workdir), trained[1], strict=True):
        np.testing.assert_array_equal(a, b)


def _mount_tmpfs(path, size):
    os.makedirs(path)
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True).returncode
        != 0
    ):
        pytest.skip("mounting a small tmpfs needs root")


@pytest.mark.slow
def test_disk_full_on_a_real_filesystem(tmp_path, capfd):
    """TensorStore's own ENOSPC (not an OSError) on a 300 kB tmpfs: step 0 fits (170 kB), step 4 does
    not (another 220 kB)."""
    mount = str(tmp_path / "small")
    _mount_tmpfs(mount, "300k")
    try:
        capfd.readouterr()
        with pytest.raises(checkpoints.CheckpointWriteError, match="disk full .* at step 4 .*step 0"):
            loop.train_and_evaluate(tiny_config(), os.path.join(mount, "run"), devices=ONE_DEVICE)
        err = capfd.readouterr().err
        assert not any(noise in err for noise in NOISE), err[:2000]
        manager = checkpoints.PopulationCheckpoints(os.path.join(mount, "run", "checkpoints"), read_only=True)
        assert manager.all_steps() == [0]
        manager.verify(0)
        manager.close()
    finally:
        subprocess.run(["umount", mount], check=False)


CLI_DISK_FULL = """
import errno, os, runpy, sys
from cka_jax.workdir import checkpoint_manifest
calls = []
def full(item_dir):
    calls.append(item_dir)
    if len(calls) >= 2:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), item_dir)
    original(item_dir)
original, checkpoint_manifest.write_manifest = checkpoint_manifest.write_manifest, full
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


CLI_METRICS_DISK_FULL = """
import errno, os, runpy, sys
from cka_jax.workdir import metrics_log
def full(path, rows):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
metrics_log.append = full
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
def test_cli_disk_full_writing_metrics_is_one_line_exit_1(tmp_path):
    workdir = str(tmp_path / "run")
    line = _disk_full_cli_line(CLI_METRICS_DISK_FULL, workdir)
    assert line.startswith(f"train.py: error: disk full writing into {workdir}/metrics.jsonl") and "resume" in line


def _disk_full_cli_line(script, workdir):
    """The one error line of train.py run by `script` (which makes a write fail), after exit 1."""
    code, err = tiny.run_train(*_tiny_flags(workdir), script=script)
    assert code == 1, err[-3000:]
    (line,) = _errors(err)
    return line


def _tiny_flags(workdir):
    """train.py's flags of a tiny 2-epoch run (8 steps) into `workdir`."""
    return [*tiny.TINY_FLAGS, "--config.train.epochs=2", f"--workdir={workdir}"]


def _errors(stderr):
    """stderr without the progress bar and the run's info lines."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if "error" in line.lower() or "Traceback" in line]


@pytest.mark.slow
def test_cli_disk_full_is_one_line_exit_1(tmp_path):
    workdir = str(tmp_path / "run")
    line = _disk_full_cli_line(CLI_DISK_FULL, workdir)
    # milestones of configs/digits.py: 0, 35% (step 3), 75%, 100% of 8 steps
    assert line == (
        f"train.py: error: disk full writing the checkpoint at step 3 in {workdir}/"
        "checkpoints; earlier checkpoints are kept (latest: step 0); free space and "
        "rerun the same command to resume"
    )


# ----------------------------------------------------------------------------- memory

GB = 10**9


@pytest.mark.parametrize(
    "size, host_available, device_free, message",
    [
        pytest.param(
            10**6,
            None,
            None,
            "population.size=1000000 needs about .* GB of memory",
            id="a million models on this machine",
        ),
        pytest.param(
            2000,
            0.1 * GB,
            None,
            r"needs about .* of memory .* but 100 MB are available",
            id="2000 models, 100 MB of RAM",
        ),
        pytest.param(
            200,
            None,
            0.01 * GB,
            r"needs about .* on each device .* has 10 MB free",
            id="200 models, accelerator with 10 MB free",
        ),
    ],
)
def test_a_population_that_cannot_fit_is_refused_before_any_work(
    monkeypatch, size, host_available, device_free, message
):
    """check_run, which train_and_evaluate and train.py call before touching the workdir."""
    if host_available is not None:
        monkeypatch.setattr(pop, "host_available_bytes", lambda: int(host_available))
    if device_free is not None:
        monkeypatch.setattr(pop, "_device_free_bytes", lambda device: int(device_free))
    with pytest.raises(checks.RunConfigError, match=message):
        checks.check_run(tiny_config(size), ONE_DEVICE)


def test_a_population_that_fits_is_accepted(monkeypatch):
    monkeypatch.setattr(pop, "host_available_bytes", lambda: int(0.1 * GB))
    checks.check_run(tiny_config(2), ONE_DEVICE)


@pytest.mark.slow
def test_cli_refuses_a_population_that_cannot_fit_in_one_line(tmp_path):
    workdir = str(tmp_path / "run")
    code, err = tiny.run_train("--config.population.size=100000", f"--workdir={workdir}", timeout=120)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("train.py: error: population.size=100000 needs about")
    assert not os.path.exists(workdir)
