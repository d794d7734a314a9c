"""The run directory: Workdir names every file, the two config copies are read and written there,
every file gets the umask's mode, and a run that trained nothing leaves nothing behind."""

import json
import os
import stat

import pytest

from cka_jax import _atomic_file as atomic_file
from cka_jax.train import workdir_checks
from cka_jax.workdir import CONFIG_COPIES, Workdir, config_copies, metrics_log
from cka_jax.workdir import config as run_config
from cka_jax.workdir import lock as workdir_lock


def test_every_file_is_named_by_workdir(tmp_path):
    files = Workdir(str(tmp_path))
    assert files.config_copies == tuple(str(tmp_path / name) for name in CONFIG_COPIES)
    assert files.metrics == str(tmp_path / "metrics.jsonl")
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


# --- file modes: 0o666 less the umask, like any file created with open() -----------------------


@pytest.fixture(params=[0o022, 0o027, 0o002], ids=["umask022", "umask027", "umask002"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _modes(root):
    """{path relative to root: permission bits} of every file and directory under root."""
    out = {}
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(here, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


def test_every_writer_respects_the_umask(tmp_path, umask):
    """atomic_file (config copies, metrics rewrites, predictions, analysis outputs, manifests) used
    tempfile.mkstemp's 0o600; the lock file had a fixed 0o644."""
    import matplotlib.figure

    from cka_jax.analysis import outputs

    workdir = str(tmp_path / "run")
    atomic_file.write(str(tmp_path / "text.json"), "{}")
    atomic_file.write(str(tmp_path / "bytes.npz"), lambda f: f.write(b"x"))
    analysis = str(tmp_path / "analysis")  # analyze.py's outputs: report.html, json, npz, figures
    outputs.write_text(os.path.join(analysis, "report.html"), "<html></html>")
    outputs.write_json(os.path.join(analysis, "within.json"), {"a": 1})
    outputs.write_npz(os.path.join(analysis, "within.npz"), x=[1, 2])
    outputs.save_figure(matplotlib.figure.Figure(figsize=(1, 1)), os.path.join(analysis, "figure"))
    held = workdir_lock.acquire(workdir)
    try:
        config_copies.write(workdir, {"train.epochs": 2})
        metrics_log.append(Workdir(workdir).metrics, [{"step": 1}, {"step": 2}])
        metrics_log.truncate(Workdir(workdir).metrics, 1)
    finally:
        held.release()
    modes = _modes(str(tmp_path))
    expected = {path: (0o777 if os.path.isdir(tmp_path / path) else 0o666) & ~umask for path in modes}
    assert {p: oct(m) for p, m in modes.items()} == {p: oct(m) for p, m in expected.items()}
    assert {"text.json", "bytes.npz", "run/.lock", "run/config.json", "run/checkpoints/config.json"} <= set(modes)
    assert {"report.html", "within.json", "within.npz", "figure.png", "figure.pdf"} <= set(os.listdir(analysis))


# --- the lock file removed by a run that trained nothing --------------------------------------


def test_a_lock_file_removed_by_its_holder_is_never_shared(tmp_path, monkeypatch):
    """A run that trained nothing removes its lock file while it holds it. Another run that
    opened that file just before then gets a lock on a file no one else will open: it must see
    that and lock the file now at <workdir>/.lock instead."""
    workdir = str(tmp_path / "run")
    first = workdir_lock.acquire(workdir)
    real_flock, calls = workdir_lock.fcntl.flock, []

    def flock_after_the_holder_left(fd, operation):
        if not calls:  # the second run opened the old file; the first one removes it and leaves
            calls.append(fd)
            first.release(remove=True)
        return real_flock(fd, operation)

    monkeypatch.setattr(workdir_lock.fcntl, "flock", flock_after_the_holder_left)
    second = workdir_lock.acquire(workdir)
    monkeypatch.undo()
    try:
        assert os.fstat(second.fd).st_ino == os.stat(Workdir(workdir).lock).st_ino
        with pytest.raises(workdir_lock.WorkdirBusyError):  # a third run sees the second one's lock
            workdir_lock.acquire(workdir)
    finally:
        second.release()


# --- a run that trained nothing leaves nothing behind ------------------------------------------


class Failed(Exception):
    pass


def _fail_after_claiming(workdir, config, then=None):
    """Lock and check `workdir` as a run does, do `then`, and fail (as a run refused for its data)."""
    with pytest.raises(Failed):
        with workdir_checks.lock_workdir(workdir):
            workdir_checks.check_workdir(workdir, config)
            if then is not None:
                then()
            raise Failed


def _tree(root):
    """{path under root: its bytes, or None for a directory}, the lock file left out."""
    out = {}
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(here, name)
            if name != ".lock":
                out[os.path.relpath(path, root)] = None if os.path.isdir(path) else open(path, "rb").read()
    return out


def test_a_run_that_trained_nothing_removes_what_it_created(tmp_path):
    workdir = str(tmp_path / "run")
    _fail_after_claiming(workdir, run_config.base_config())
    assert not os.path.exists(workdir)  # not even the lock file or the directory
    os.makedirs(workdir)
    _fail_after_claiming(workdir, run_config.base_config())
    assert os.listdir(workdir) == []  # the directory was there before: it stays
    other = run_config.base_config()
    other.train.epochs = 3
    _fail_after_claiming(workdir, other)  # the corrected command is not "a different config"


def test_a_run_that_trained_nothing_keeps_what_was_there_before(tmp_path):
    workdir = str(tmp_path / "run")
    config_copies.write(workdir, run_config.flat_config(run_config.base_config()))  # an earlier run's
    os.remove(Workdir(workdir).config)
    open(Workdir(workdir).lock, "w").close()
    before = _tree(workdir)
    _fail_after_claiming(workdir, run_config.base_config())  # restores config.json, then fails
    assert _tree(workdir) == before and os.path.exists(Workdir(workdir).lock)
    os.makedirs(os.path.join(Workdir(workdir).checkpoints, "0"))  # a run: nothing of it is touched
    before = _tree(workdir)
    _fail_after_claiming(workdir, run_config.base_config())
    assert _tree(workdir) == {**before, "config.json": open(Workdir(workdir).checkpoint_config, "rb").read()}


def test_a_run_that_wrote_a_checkpoint_keeps_its_config(tmp_path):
    workdir = str(tmp_path / "run")
    _fail_after_claiming(
        workdir, run_config.base_config(), then=lambda: os.makedirs(os.path.join(Workdir(workdir).checkpoints, "0"))
    )
    assert set(_tree(workdir)) == {"config.json", "checkpoints", "checkpoints/config.json", "checkpoints/0"}
