"""Layer identification (Kornblith et al. 2019, Table 2): for every layer of every model and every
other model, is the most similar layer of the other model the same layer? Every measure of the
paper's table, on the population's training examples (CCA needs many examples).

Representations: every captured layer but the logits (Tiny-10: conv1..conv8 and pool, the paper's
9; ResNets: the stem, every block output and the pool), of every model, on the first n training
examples, n = --probe_examples rounded down to a whole number of --batch_size minibatches.
- CKA (linear, RBF at 0.2, 0.4, 0.8 of the median distance) and linear HSIC: the minibatch
  estimator (`MinibatchCKA`, unbiased HSIC₁, population mode: every model pair in one pass) on all
  features; linear HSIC is Σ_b HSIC₁ / batches (scale-dependent, as in the paper).
- CCA ρ̄ and R²_CCA, SVCCA ρ̄ and R²_CCA (0.99 of the variance), PWCCA and linear regression R²
  (`cka_jax.analysis.identification_measures`): CCA needs n ≫ p, so each layer keeps a random subset
  of at most n // 20 (and at most 128) of its flattened features, the same subset in every model;
  the subset sizes are in the output. PWCCA and regression are asymmetric: S + Sᵀ.
Scoring: `cka_jax.layer_identification` (ties count as wrong); a trial whose similarity is undefined
(a constant or non-finite layer) counts as wrong and is counted in `undefined`.

Report section (`section`, entry `ANALYSIS`): layer_identification.json
({"measures": {name: accuracy}, "num_models", "num_examples", "layers", ...}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np

from cka_jax import MinibatchCKA, layer_identification
from cka_jax.analysis.entry import Analysis, check_models, main_population
from cka_jax.analysis.identification_measures import basis, similarity_matrices
from cka_jax.analysis.notes import status_why
from cka_jax.analysis.outputs import Section, Table, write_json
from cka_jax.analysis.representations import jitted_apply_fn
from cka_jax.analysis.undefined import left_out, number
from cka_jax.models import representation_names

if TYPE_CHECKING:
    from cka_jax.analysis.context import AnalysisContext
    from cka_jax.analysis.inputs import TrainedPopulation

# The paper's Table 2 (CIFAR-10, Tiny-10, 10 models), accuracy in [0, 1], in its column order.
PAPER = {
    "cca_rho": 0.014,
    "cca_r2": 0.106,
    "svcca_rho": 0.099,
    "svcca_r2": 0.151,
    "pwcca": 0.111,
    "linear_regression": 0.454,
    "linear_hsic": 0.222,
    "cka_linear": 0.993,
    "cka_rbf_0.2": 0.806,
    "cka_rbf_0.4": 0.991,
    "cka_rbf_0.8": 0.993,
}
LABELS = {
    "cca_rho": "CCA ρ̄",
    "cca_r2": "CCA R²_CCA",
    "svcca_rho": "SVCCA ρ̄",
    "svcca_r2": "SVCCA R²_CCA",
    "pwcca": "PWCCA",
    "linear_regression": "linear regression",
    "linear_hsic": "linear HSIC",
    "cka_linear": "CKA linear",
    "cka_rbf_0.2": "CKA RBF 0.2",
    "cka_rbf_0.4": "CKA RBF 0.4",
    "cka_rbf_0.8": "CKA RBF 0.8",
}
RBF_THRESHOLDS = (0.2, 0.4, 0.8)
CCA_EXAMPLES_PER_FEATURE = 20  # n >= 10 (p + q) for a pair of p = q features
MAX_CCA_FEATURES = 128


def layers_of(population: TrainedPopulation) -> tuple[str, ...]:
    """The layers identified: every captured layer but the logits (ResNets: stem, block outputs, pool)."""
    model = population.model
    if model.block_names():
        return representation_names(model, ("blocks", "pool"))
    return tuple(n for n in representation_names(model, "all") if n != "logits")


def _accumulators(num_layers: int, num_models: int) -> dict[str, MinibatchCKA]:
    out = {"linear": MinibatchCKA.create(num_layers, num_models_a=num_models)}
    for t in RBF_THRESHOLDS:
        out[f"rbf_{t}"] = MinibatchCKA.create(num_layers, num_models_a=num_models, kernel="rbf", threshold=t)
    return out


def _linear_hsic(acc: MinibatchCKA) -> np.ndarray:
    """Σ_b HSIC₁ / batches of every (model, layer) pair, (M, M, L, L), in the activations' units (a layer
    never seen varying keeps its sums at 0 under a hugely negative scale: HSIC 0, as for any constant)."""
    sa = np.asarray(acc.log2_scale_a, np.float64)
    xy = np.asarray(acc.xy, np.float64) * 4.0 ** (sa[:, None, :, None] + sa[None, :, None, :])
    return xy / int(acc.count)


def collect(ctx: AnalysisContext, population: TrainedPopulation, layers: tuple[str, ...]) -> dict:
    """One pass over the first n training examples: the CKA accumulators, and each layer's CCA
    feature subset (M, n, p_l) with the subset sizes."""
    images, _ = ctx.train_set(population)
    batch = min(ctx.options.batch_size, len(images))
    n = min(ctx.options.probe_examples, len(images)) // batch * batch
    fn = jitted_apply_fn(population, layers)
    rng = np.random.default_rng(ctx.options.seed)
    accs = _accumulators(len(layers), population.size)
    cap = max(1, min(MAX_CCA_FEATURES, n // CCA_EXAMPLES_PER_FEATURE))
    subsets: dict[str, np.ndarray] = {}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    for start in ctx.progress(range(0, n, batch), desc="layer identification", leave=False):
        reps = fn(population.variables, images[start : start + batch], ctx.test.mean, ctx.test.std)[1]
        acts = [reps[name] for name in layers]
        accs = {key: acc.update(acts) for key, acc in accs.items()}
        for name, value in jax.device_get(reps).items():
            flat = np.asarray(value, np.float32).reshape(value.shape[0], value.shape[1], -1)
            if name not in subsets:
                p = flat.shape[-1]
                subsets[name] = np.sort(rng.choice(p, min(p, cap), replace=False))
            parts[name].append(flat[..., subsets[name]])
    features = {name: np.concatenate(v, axis=1) for name, v in parts.items()}
    return {"accs": accs, "features": features, "num_examples": n, "subsets": subsets}


def identification(collected: dict, layers: tuple[str, ...]) -> dict:
    """Accuracy and undefined trials of every measure over the models whose layers are all defined
    (`defined`: a model with a constant or non-finite layer is left out, not scored), and the
    similarity matrices. Fewer than 2 defined models: every accuracy is None (undefined)."""
    accs, features = collected["accs"], collected["features"]
    sims = {"linear_hsic": _linear_hsic(accs["linear"]), "cka_linear": np.asarray(accs["linear"].result())}
    for t in RBF_THRESHOLDS:
        sims[f"cka_rbf_{t}"] = np.asarray(accs[f"rbf_{t}"].result())
    num_models = next(iter(features.values())).shape[0]
    bases = [[basis(features[name][m]) for name in layers] for m in range(num_models)]
    # CKA of a model's layers with themselves is defined unless a layer is constant or non-finite.
    defined = np.array([all(np.isfinite(np.diagonal(s[m, m])).all() for s in sims.values()) for m in range(num_models)])
    sims.update(similarity_matrices(bases))  # (these leave the pairs a == b NaN)
    kept = np.flatnonzero(defined)
    if len(kept) < 2:
        return {"measures": dict.fromkeys(PAPER), "undefined": dict.fromkeys(PAPER, 0), "num_trials": 0,
                "similarities": sims, "defined": defined}  # fmt: skip
    scored = {name: layer_identification(sims[name][np.ix_(kept, kept)], undefined="wrong") for name in PAPER}
    return {
        "measures": {name: r.accuracy for name, r in scored.items()},
        "undefined": {name: r.num_undefined for name, r in scored.items()},
        "num_trials": next(iter(scored.values())).num_trials,
        "similarities": sims,
        "defined": defined,
    }


def _percent(accuracy: float | None) -> str:
    return number(None if accuracy is None else 100 * accuracy, 1)


def _table(measures: dict[str, float], name: str, num_models: int) -> Table:
    header = ["", *(LABELS[k] for k in PAPER)]
    rows = [
        ["paper: CIFAR-10, Tiny-10, 10 models", *(f"{100 * PAPER[k]:.1f}" for k in PAPER)],
        [
            f"here: {name}, {num_models} models",
            *(number(None if measures[k] is None else 100 * measures[k], 1) for k in PAPER),
        ],
    ]
    return Table(header, rows, "Layer identification accuracy (%): Kornblith et al. 2019, Table 2, and this population")


def section(ctx: AnalysisContext) -> Section:
    """Kornblith et al. 2019, Table 2: layer identification accuracy of every measure."""
    population = ctx.main
    layers = layers_of(population)
    collected = collect(ctx, population, layers)
    result = identification(collected, layers)
    features = {name: int(len(s)) for name, s in collected["subsets"].items()}
    out = {
        "measures": result["measures"],
        "num_models": population.size,
        "num_examples": collected["num_examples"],
        "layers": list(layers),
        "undefined": result["undefined"],
        "num_trials": result["num_trials"],
        "models_scored": np.flatnonzero(result["defined"]).tolist(),
        "cca_features": features,
        "paper": PAPER,
        "examples": "training set",
    }
    write_json(ctx.path("layer_identification.json"), out)
    undefined = {k: v for k, v in result["undefined"].items() if v}
    kept = int(result["defined"].sum())
    models_note = (
        ""  # every model scored: the layers' status (a within-CKA pass) is not needed
        if result["defined"].all()
        else left_out(result["defined"], status_why(ctx.status(population), "a constant or non-finite layer"))
    )
    text = (
        f"For each of the {population.size} models, each of its {len(layers)} layers ({', '.join(layers)}) and each "
        "other model: is the other model's most similar layer the same layer (unique maximum; ties count as wrong)? "
        f"{result['num_trials']} trials per measure, on the first {collected['num_examples']} training examples. "
        "CKA and HSIC use every feature (minibatch HSIC₁ in minibatches of "
        f"{min(ctx.options.batch_size, collected['num_examples'])}); the CCA family and linear regression use a "
        "random subset of each layer's flattened features, the same in every model, because CCA needs many more "
        f"examples than features: {', '.join(f'{k} {v}' for k, v in features.items())} features. "
        "PWCCA and regression are asymmetric and use S + Sᵀ. "
        + (f"Accuracies: {models_note}. " if models_note else "")
        + (f"Undefined trials (counted as wrong): {undefined}. " if undefined else "")
        + "layer_identification.json holds the accuracies (in [0, 1])."
    )
    table = _table(result["measures"], population.name, kept)
    return Section(
        "layer_identification",
        "Layer identification (Kornblith et al. 2019, Table 2)",
        text,
        [],
        [table],
        ["layer_identification.json"],
    )


ANALYSIS = Analysis(
    "layer_identification",
    section,
    description="layer identification by CCA, SVCCA, PWCCA, regression, HSIC and CKA (Kornblith 2019, Table 2)",
    check=check_models(main_population, "layer identification", use_max_models=False),
)
