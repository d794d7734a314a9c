r"""Turn trained populations into the paper's figures, numbers and one HTML report.

  python analyze.py                                      # the default run, workdir/default → analysis/
  python analyze.py --workdir workdir/c10_r62 --compare workdir/c10_r14_w2
  python analyze.py --workdir workdir/c10_r14 --analyses=within,blocks --passes=10
  python analyze.py --workdir workdir/in_deeper --compare workdir/in_wider --fdr   # ImageNet

Outputs go to <workdir>/analysis/ (analysis/ for the default run; or --outdir): one .npz/.json of numbers and one
PNG+PDF figure per analysis, and report.html to read top to bottom. `cka_within.npz` holds `cka`
(M, L, L) over the stem and block outputs and `layer_names` (L,). Analyses that compare
populations (architectures, disagreement, convergence) run when --compare is given.
The report opens with the training curves from metrics.jsonl (diverged and under-trained seeds
named); they always run. Streamed data sets (ImageNet) are analysed from predictions/test.npz
alone: training curves and disagreement. Analyses the populations do not allow (one model, no
residual connections, a single checkpoint) are skipped with a note unless named in --analyses.
Runs in one process: a workdir that train.py wrote with several processes (hosts) is analysed
the same way, on any one host that sees it; the checkpoints are read onto its devices.
Exit status: 0 on success, 1 if an analysis failed (the others' outputs are written),
2 for bad input: flags, workdirs, config, predictions, --outdir (one line; nothing is written),
128 + signal when stopped by SIGTERM (143), SIGINT (130) or SIGHUP (129): one line; the outputs
written before it are kept, the file being written is not left half-written, no temporary file
is left; rerunning the same command runs every analysis again.
"""

import contextlib
import gc
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, NoReturn

from absl import app, flags

if TYPE_CHECKING:
    from cka_jax.analysis.context import AnalysisOptions

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_EARLY_SIGNALS: list[int] = []  # stop signals received before main took over their handling

_WORKDIR = flags.DEFINE_string("workdir", "workdir/default", "Trained workdir to analyse (train.py output).")
_COMPARE = flags.DEFINE_multi_string("compare", [], "Further workdirs to compare with (repeatable).")
_OUTDIR = flags.DEFINE_string(
    "outdir", None, "Output directory (default: <workdir>/analysis, or analysis/ when --workdir is not given)."
)
# The flags of AnalysisOptions' fields, which share their names, types and defaults: defined by
# parse_flags (see define_analysis_flags).
OPTION_FLAGS = {
    "batch_size": "CKA minibatch size (at most).",
    "passes": "Passes over the test set for CKA (paper: 10).",
    "max_examples": "Test examples for PCs, CCA, unit matching and sparse prediction.",
    "max_models": "Models per population for pairwise cross-seed analyses.",
    "block_threshold": "Pairwise CKA every pair of layers in a block structure reaches.",
    "probe_steps": "Optimizer steps per linear probe.",
    "alpha": "Significance level of the per-class tests.",
    "fdr": "Benjamini-Hochberg correct the per-class tests.",
    "num_bootstrap": "Bootstrap resamples.",
    "seed": "Seed of shuffles and bootstrap resamples.",
}


def fail(message: str) -> NoReturn:
    """One line on stderr, exit status 2 (bad input: nothing was written)."""
    print(f"analyze.py: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


class Stopped(BaseException):
    """A stop signal arrived: raised wherever the program is (not an ``Exception``, so that no
    analysis's error handling takes it for a failure), so that the file being written removes its
    temporary file on the way out (see ``cka_jax._atomic_file``)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_STOPPING: list[int] = []  # the stop signal being acted on


def _stop(signum: int, frame) -> None:
    """The stop signals' handler once main runs: raise ``Stopped`` at the first; a later one is
    only recorded, so that it cannot cut short the clean-up the first started."""
    if _STOPPING:
        return
    _STOPPING.append(signum)
    raise Stopped(signum)


def stopped(signum: int, what: str) -> NoReturn:
    """Exit with 128 + ``signum`` after one line saying what the signal stopped."""
    print(f"analyze.py: stopped by signal {signum} ({signal.Signals(signum).name}) {what}", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def define_analysis_flags() -> None:
    """--analyses and OPTION_FLAGS, whose help needs the analysis package (its registry names the
    analyses; AnalysisOptions holds the defaults --help shows): defined when the flags are
    parsed, so that importing the package's jax and friends waits until the stop signals are held."""
    from cka_jax.analysis import runner
    from cka_jax.analysis.context import AnalysisOptions

    flags.DEFINE_list("analyses", [], f"Analyses to run (default: all that apply): {', '.join(runner.ANALYSES)}.")
    defaults = AnalysisOptions()
    for name, help_text in OPTION_FLAGS.items():
        default = getattr(defaults, name)
        if isinstance(default, bool):
            flags.DEFINE_bool(name, default, help_text)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help_text)
        else:
            flags.DEFINE_float(name, default, help_text)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flags, this module's and define_analysis_flags'; a mistake: one line, exit 2."""
    define_analysis_flags()
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        fail(f"{error}; pass --help for usage")


def analysis_options() -> "AnalysisOptions":
    """The options from the flags (which share their names); exit 2 naming the first bad one."""
    from cka_jax.analysis.context import AnalysisOptions

    try:
        return AnalysisOptions(**{name: getattr(flags.FLAGS, name) for name in OPTION_FLAGS})
    except ValueError as error:
        fail(f"--{error}")


def main(argv: list[str]) -> None:
    from cka_jax.workdir import Workdir

    outdir = _OUTDIR.value or (Workdir(_WORKDIR.value).analysis if flags.FLAGS["workdir"].present else "analysis")
    created = not os.path.lexists(outdir)
    for signum in STOP_SIGNALS:  # from here on a stop signal raises Stopped
        signal.signal(signum, _stop)
    if _EARLY_SIGNALS:
        stopped(_EARLY_SIGNALS[0], "while starting; nothing was written")
    try:
        analyze(argv)
    except Stopped as stop:
        if created:
            with contextlib.suppress(OSError):  # created by this run and still empty: nothing to keep
                os.rmdir(outdir)
        written = (
            "nothing was written"
            if not os.path.lexists(outdir)
            else f"the analyses finished before it are in {outdir} (report.html) and nothing half-written or "
            "temporary is left; rerun the same command to run them all again"
        )
        stopped(stop.signum, f"while analysing; {written}")
    if _STOPPING:  # the signal's exception was swallowed somewhere, and the run went on to its end
        stopped(_STOPPING[0], "as the analyses finished; their outputs are written")


def analyze(argv: list[str]) -> None:
    import matplotlib
    from absl import logging as absl_logging
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from cka_jax.analysis import runner
    from cka_jax.analysis.inputs import AnalysisInputError, check_workdir, has_test_images

    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's per-restore INFO lines
    logger = logging.getLogger("cka_jax")
    logger.setLevel(logging.WARNING)  # data loading's INFO lines would precede a one-line input error
    logging.getLogger("cka_jax.analysis").setLevel(logging.INFO)
    logger.addHandler(logging.StreamHandler(sys.stderr))
    logger.propagate = False
    options = analysis_options()
    # Figures only go to files: never load a backend inherited from the environment (MPLBACKEND,
    # e.g. a notebook's inline one when this script runs from a notebook cell).
    matplotlib.use("Agg")
    try:
        has_images = has_test_images(check_workdir(_WORKDIR.value))
        names = runner.choose_analyses(flags.FLAGS.analyses, bool(_COMPARE.value), has_images)
        with logging_redirect_tqdm([logger]):
            outdir = _OUTDIR.value or (None if flags.FLAGS["workdir"].present else "analysis")
            ctx = runner.load_context(
                _WORKDIR.value, _COMPARE.value, outdir, options, tqdm, images=runner.needs_images(names)
            )
            runner.run_analyses(ctx, names, tqdm, skip_inapplicable=not flags.FLAGS.analyses)
    except AnalysisInputError as error:
        fail(str(error))
    except runner.AnalysesFailed as error:
        print(f"analyze.py: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {ctx.outdir}/report.html")


if __name__ == "__main__":
    for _signal in STOP_SIGNALS:  # until main handles them: the analysis package takes seconds to import
        signal.signal(_signal, lambda signum, frame: _EARLY_SIGNALS.append(signum))
    try:
        app.run(main, flags_parser=parse_flags)  # always ends with SystemExit
    finally:
        # The process ends now, its files written and closed: the exit handlers still run, but the
        # interpreter's last garbage collections skip the objects that jax, flax, matplotlib and
        # scipy left (about 1 s of CPU otherwise).
        gc.freeze()
