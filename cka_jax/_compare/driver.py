"""`compare`: one call from two models (or one) and a stream of inputs to a CKA heatmap."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable

import numpy as np

from cka_jax._checks import check_flag
from cka_jax._compare.adapters import as_model
from cka_jax._compare.engine import Engine, resolve_devices
from cka_jax._compare.full import WholeSetCKA
from cka_jax._compare.inputs import InputKey, numbered
from cka_jax._compare.layers import LayerSpec, patterns
from cka_jax._compare.result import CKAComparison
from cka_jax._compare.sources import ModelSource, StreamSource
from cka_jax._compare.undefined import warn_undefined
from cka_jax._minibatch import MinibatchCKA

MIN_EXAMPLES = 4  # HSIC₁ is defined from 4 examples per minibatch


def compare(
    model_a,
    model_b=None,
    batches: Iterable | None = None,
    layers_a: LayerSpec = None,
    layers_b: LayerSpec = None,
    *,
    kernel: str = "linear",
    threshold: float = 1.0,
    debiased: bool = True,
    num_bootstrap: int = 0,
    num_permutations: int = 0,
    level: float = 0.95,
    seed: int = 0,
    population: bool = False,
    all_pairs: bool = False,
    devices=None,
    input_key: InputKey = 0,
    drop_remainder: bool = False,
    max_batches: int | None = None,
    progress: bool = True,
    names: tuple[str, str] | None = None,
) -> CKAComparison:
    """CKA between every selected layer of model_a and of model_b over `batches`.

    Estimator: debiased=True (default) is minibatch CKA (Nguyen et al. 2021): the ratio of sums
    over minibatches of the unbiased HSIC₁, via `MinibatchCKA`, in constant memory. Every
    minibatch counts once: a smaller last batch weighs as much as a full one (still unbiased,
    noisier). debiased=False is the biased whole-set CKA of Kornblith et al. 2019 (all examples'
    grams at once). NaN/inf activations give NaN entries and a RuntimeWarning naming the layer and
    the batch; a layer constant on every minibatch has NaN (undefined) entries and a warning.

    Args:
        model_a: a ``(linen_module, variables)`` pair (optionally with a dict of `apply` keyword
            arguments as a third element, e.g. ``{"train": False}``), an NNX module, or a function
            ``x -> {name: activation}`` (compiled when JAX can trace it; otherwise, e.g. NumPy code
            or a PyTorch model, run eagerly on NumPy inputs). None: the activations are given by
            `batches` itself, each batch a mapping name -> activation (compared with itself) or a
            pair ``(acts_a, acts_b)`` of them (NumPy/torch/JAX arrays, e.g. from forward hooks).
        model_b: the same kinds; None compares model_a with itself.
        batches: any iterable of minibatches: arrays (batch, ...), or tuples/lists/mappings whose
            element `input_key` is the input; read once, in order. At least 4 examples each.
        layers_a: a name, a glob (``"block*/conv"``), or a list of them over model a's own layer
            names; selected layers keep network order. Default: every captured layer.
        layers_b: the same for model b.
        kernel: "linear" or "rbf" (bandwidth threshold × the median distance).
        threshold: the RBF bandwidth as a multiple of the median distance.
        debiased: minibatch CKA (True) or whole-set CKA (False).
        num_bootstrap: > 0 adds a percentile bootstrap interval over minibatches (`interval`).
        level: the interval's confidence level.
        seed: seed of the bootstrap weights and permutations.
        num_permutations: > 0 adds permutation p-values (`p_values`, like heatmap) from that many
            replicates with model b's examples permuted within each minibatch (see
            `MinibatchCKA.p_values`); minibatch CKA only.
        population: model_a/model_b carry a leading model axis (stacked variables or NNX state;
            activations (models, batch, ...) for callables and streams); the heatmap is one per
            model (model i of a vs model i of b, or vs itself).
        all_pairs: with population=True, every (a, b) model pair.
        devices: with more than one (default: every local device), each group of that many
            equal-shape minibatches runs sharded over them (`update_sharded`); 1 runs serially.
        input_key: which element of a tuple/list/mapping batch is the input (default 0: the x of
            (x, y)).
        drop_remainder: leave out batches smaller than the first.
        max_batches: stop after that many minibatches.
        progress: show a tqdm bar.
        names: labels of the two models for plots (default: their class or function names).

    Returns:
        A `CKAComparison`: the heatmap (La, Lb) as NumPy float64 with its layer names, counts,
        options and interval.

    Raises:
        ValueError: unknown layers (the message lists those that exist), mismatched batch sizes, a
            layer changing shape, no batches, fewer than 4 examples in a minibatch, an unsupported
            model, or an option out of range.

    References:
        Nguyen, Raghu & Kornblith, *Do Wide and Deep Networks Learn the Same Things?*, ICLR 2021;
        Kornblith, Norouzi, Lee & Hinton, *Similarity of Neural Network Representations
        Revisited*, ICML 2019.

    Example:
        >>> import numpy as np
        >>> import cka_jax
        >>> rng = np.random.default_rng(0)
        >>> stream = [{"pixels": x, "doubled": 2 * x} for x in np.split(rng.normal(size=(64, 5)), 4)]
        >>> result = cka_jax.compare(None, batches=stream, progress=False)
        >>> result.layers_a, np.round(result.heatmap, 3).tolist()
        (('pixels', 'doubled'), [[1.0, 1.0], [1.0, 1.0]])
    """
    options = Options(
        kernel, threshold, debiased, num_bootstrap, level, seed, population, all_pairs, names, num_permutations
    )
    options.check(drop_remainder, max_batches, progress)
    if batches is None:
        raise ValueError("batches is required: compare(model_a, model_b, batches, ...)")
    patterns(layers_a, "layers_a")
    patterns(layers_b, "layers_b")
    source = _source(model_a, model_b, layers_a, layers_b, input_key, options)
    engine, first_size, examples, used = None, 0, 0, 0
    for index, batch in numbered(batches, progress, max_batches):
        payload = source.payload(batch, index)
        if engine is None:
            source.prepare(payload)
        n = source.check(index, payload)
        if engine is None:
            engine, first_size = Engine(options.accumulator(source), source, resolve_devices(devices)), n
        if drop_remainder and n < first_size:
            continue
        if n < MIN_EXAMPLES and debiased:
            raise ValueError(
                f"batch {index} has {n} examples; minibatch CKA needs at least {MIN_EXAMPLES} per "
                "minibatch (use larger batches, or drop_remainder=True to leave out a short last one)"
            )
        engine.add(index, payload)
        examples, used = examples + n, used + 1
    assert engine is not None  # numbered() refuses an empty iterable
    return _result(engine, options, examples, used)


@dataclasses.dataclass(frozen=True)
class Options:
    """The estimator and layout options of one `compare` call."""

    kernel: str
    threshold: float
    debiased: bool
    num_bootstrap: int
    level: float
    seed: int
    population: bool
    all_pairs: bool
    names: tuple[str, str] | None
    num_permutations: int = 0

    def check(self, drop_remainder, max_batches, progress) -> None:
        """ValueError (one line) for any option out of range; MinibatchCKA checks its own."""
        MinibatchCKA.create(
            1,
            kernel=self.kernel,
            threshold=self.threshold,
            num_bootstrap=self.num_bootstrap,
            num_permutations=self.num_permutations,
            seed=self.seed,
        )
        flags = dict(debiased=self.debiased, population=self.population, all_pairs=self.all_pairs)
        for flag, value in {**flags, "drop_remainder": drop_remainder, "progress": progress}.items():
            check_flag(value, flag)
        if isinstance(self.level, bool) or not isinstance(self.level, (int, float)) or not 0 < self.level < 1:
            raise ValueError(f"level must lie in (0, 1), got {self.level!r}")
        if max_batches is not None and (type(max_batches) is not int or max_batches < 1):
            raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
        if self.all_pairs and not self.population:
            raise ValueError("all_pairs=True compares every model pair of two populations: it needs population=True")
        if not self.debiased and (self.num_bootstrap or self.population or self.num_permutations):
            raise ValueError(
                "debiased=False (whole-set CKA) gives one heatmap of two single models; bootstrap intervals, "
                "permutation p-values and populations need the minibatch estimator (debiased=True)"
            )
        names = self.names
        if names is not None and (
            not isinstance(names, (tuple, list)) or len(names) != 2 or not all(isinstance(n, str) for n in names)
        ):
            raise ValueError(f"names must be two strings (name_a, name_b), got {names!r}")

    def accumulator(self, source):
        """An empty MinibatchCKA (or WholeSetCKA for debiased=False) for the source's layers."""
        la = len(source.names[0])
        lb = None if source.self_compare else len(source.names[1])
        if not self.debiased:
            return WholeSetCKA(la, lb, self.kernel, self.threshold)
        ma, mb = source.num_models()
        return MinibatchCKA.create(
            la,
            lb,
            num_models_a=ma,
            num_models_b=None if source.self_compare else mb,
            kernel=self.kernel,
            threshold=self.threshold,
            num_bootstrap=self.num_bootstrap,
            num_permutations=self.num_permutations,
            seed=self.seed,
        )

    def per_model(self, array) -> np.ndarray:
        """(Ma, Mb, La, Lb) -> (M, La, Lb), model i against model i, unless all_pairs; float64 NumPy."""
        array = np.asarray(array, np.float64)
        if not self.population or self.all_pairs:
            return array
        models = np.arange(array.shape[0])
        return array[models, models]


def _source(model_a, model_b, layers_a, layers_b, input_key, options: Options):
    if model_a is None:
        if model_b is not None:
            raise ValueError(
                "model_a=None means batches yield activations; model_b must then be None too "
                "(yield (acts_a, acts_b) pairs to compare two models)"
            )
        return StreamSource(layers_a, layers_b, options.population, options.all_pairs)
    a = as_model(model_a, "model_a", options.population)
    b = None if model_b is None else as_model(model_b, "model_b", options.population)
    if b is None and layers_b is not None:
        raise ValueError("layers_b needs model_b; to compare model_a with itself on other layers, pass it twice")
    return ModelSource(a, b, layers_a, layers_b, input_key, options.all_pairs)


def _result(engine: Engine, options: Options, examples: int, used: int) -> CKAComparison:
    acc, source = engine.finish(), engine.source
    heat = options.per_model(acc.result())
    interval = None
    if options.num_bootstrap:
        low, high = acc.bootstrap_interval(options.level)
        interval = (options.per_model(low), options.per_model(high))
        if used < 2:
            warnings.warn(
                "the bootstrap interval needs at least 2 minibatches: it is NaN", RuntimeWarning, stacklevel=3
            )
    layers = (source.names[0], source.names[0 if source.self_compare else 1])
    sides = ("model_a", "model_b") if isinstance(source, ModelSource) else ("acts_a", "acts_b")
    if options.names is not None:
        labels = tuple(options.names)
    elif isinstance(source, ModelSource):
        labels = (source.models[0].name, source.models[-1].name)
    else:
        labels = sides if not source.self_compare else ("activations", "activations")
    warn_undefined(
        engine.nonfinite(),
        heat,
        sides[: 1 if source.self_compare else 2],
        layers,
        options.population,
        options.all_pairs,
    )
    return CKAComparison(
        heatmap=heat,
        layers_a=tuple(layers[0]),
        layers_b=tuple(layers[1]),
        num_examples=examples,
        num_minibatches=used,
        interval=interval,
        name_a=labels[0],
        name_b=labels[1],
        kernel=options.kernel,
        threshold=float(options.threshold),
        debiased=options.debiased,
        level=options.level if options.num_bootstrap else None,
        num_bootstrap=options.num_bootstrap,
        p_values=options.per_model(acc.p_values()) if options.num_permutations else None,
        num_permutations=options.num_permutations,
        population=options.population,
        all_pairs=options.all_pairs,
    )
