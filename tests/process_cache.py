"""XLA's persistent compilation cache for every process of a several-process test run, not process 0
alone: test_multihost.py's train.py (and other) processes on 127.0.0.1 run `PROLOGUE` first.

Why: JAX writes cache entries from process 0 only (several hosts writing one shared cache could
contend), expecting the others to read them; but on CPU its cache key includes a fingerprint of the
process's own devices, so process 1's keys differ from process 0's and it never finds an entry: it
compiled every program of every run afresh (the network's initialisation and training step: 20-30 s
of a loaded 2-core machine per run) while process 0, which read them, waited for it at the first
exchange. Here every process writes its own entries (distinct keys: no two processes write one
file), which the next run's process 1 reads. The programs and what they compute are unchanged; if
JAX's internals change, `install` does nothing (the tests get slower, not different).
"""

from pathlib import Path

# Python code a worker runs before anything else (`python -c PROLOGUE + script`).
PROLOGUE = f"import sys\nsys.path.append({str(Path(__file__).parent)!r})\n"
PROLOGUE += "import process_cache\nprocess_cache.install()\n"


class _StateOfProcessZero:
    """``jax.distributed``'s global state, read as process 0's: ``process_id`` is 0, every other
    attribute the real one."""

    def __init__(self, state):
        self._state = state

    def __getattr__(self, name):
        return 0 if name == "process_id" else getattr(self._state, name)


class _DistributedOfProcessZero:
    """The module ``jax._src.distributed`` with its ``global_state`` read as process 0's."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        value = getattr(self._module, name)
        return _StateOfProcessZero(value) if name == "global_state" else value


def install() -> None:
    """Let this process write its own compilation-cache entries (see the module docstring): the
    compiler asks ``distributed.global_state.process_id`` whether to write one, and on CPU nothing
    else (sharing compiled programs between processes is off), so it is shown process 0's state."""
    try:
        from jax._src import compiler, distributed
    except ImportError:
        return
    if getattr(compiler, "distributed", None) is distributed and hasattr(compiler, "_cache_write"):
        compiler.distributed = _DistributedOfProcessZero(distributed)
