"""`run_fresh(code)`: Python code run as in a fresh interpreter, for the tests of what an import
loads. A fresh `python -c` costs seconds, most of them importing jax and numpy, which every
package module loads anyway; so one server process per test process imports just those two, and
each call runs in a fork of it: a child whose `sys.modules` holds nothing the code under test
could have loaded, at a fraction of the cost."""

import json
import os
import subprocess
import sys
import tempfile

# The server: imports jax and numpy (no backend: nothing that starts a thread), then forks one
# child per request line {"code", "env", "out"}; the child takes `env` as its environment, writes
# stdout and stderr into files beside `out` and its exit status into `out`.
_SERVER = r"""
import json, os, sys
import jax, jax.numpy, numpy
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[1:1] = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        with open(request["out"] + ".stdout", "w") as out, open(request["out"] + ".stderr", "w") as err:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout, sys.stderr = out, err
            status = 0
            try:
                exec(compile(request["code"], "<fresh>", "exec"), {"__name__": "__main__"})
            except SystemExit as exited:
                status = exited.code if isinstance(exited.code, int) else 1
            except BaseException:
                import traceback
                traceback.print_exc()
                status = 1
            out.flush()
            err.flush()
        os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    with open(request["out"], "w") as f:
        f.write(str(os.waitstatus_to_exitcode(wait_status)))
    print("done", flush=True)
"""

_server: subprocess.Popen | None = None
_PRELOADED = ("jax", "numpy")


def _start() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen(
            [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
    return _server


def run_fresh(code: str, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    """`code` run in a fork of a server that has imported only jax and numpy (and what they
    import), with environment `env` (default: this process's) and working directory `cwd`: a
    CompletedProcess with returncode, stdout and stderr, as `subprocess.run` would give for
    `python -c code`. The code must not test whether jax or numpy get imported, nor depend on
    jax settings read from the environment at import (the server's are this process's)."""
    server = _start()
    env = dict(os.environ if env is None else env)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "status")
        prologue = f"import os\nos.chdir({cwd!r})\n" if cwd else ""
        request = {"code": prologue + code, "env": env, "out": out}
        assert server.stdin is not None and server.stdout is not None
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        assert server.stdout.readline().strip() == "done", "the fresh-interpreter server died"
        with open(out) as f, open(out + ".stdout") as stdout, open(out + ".stderr") as stderr:
            return subprocess.CompletedProcess(["<fresh>"], int(f.read()), stdout.read(), stderr.read())
