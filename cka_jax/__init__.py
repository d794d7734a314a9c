"""cka_jax: representation similarity (CKA, SVCCA, PWCCA, unit matching) for populations of networks.

Every public name is exported here, once (`__all__`); the implementations live in private modules
(importing the package loads jax, numpy, scipy):
    _owned        host arrays as compiled code reads them: private copies, values unchanged
    _checks       the input checks every measure runs on the host: one-line ValueErrors
    _scaling      exact power-of-two rescaling and feature centring (so no scale under/overflows)
    _hsic, _cka   grams, centering, HSIC; CKA of grams and of representations
    _cca, _pca    CCA, SVCCA, PWCCA; first principal components
    _identification  layer identification accuracy from a population's similarity matrices
    _matching     unit matching and sparse prediction (scikit-learn imported on first use)
    _minibatch    MinibatchCKA, built from _layer_grams (one minibatch's grams), _host_grams (the
                  grams the host builds on CPU), _hsic_sums (the running sums and their units) and
                  _sharded_sums (update_sharded)
    _compare      compare(model_a, model_b, batches): one call, any model -> CKAComparison;
                  load_comparison(path) reads a saved one back
    _permutations the permutation null of MinibatchCKA (p-values, the null's mean)
    _atomic_file  the atomic file writer CKAComparison.save and the workdir use
The public subpackages are separate layers: `cka_jax.models` (Flax ResNets), `cka_jax.workdir`,
`cka_jax.train` and `cka_jax.analysis`.
Every public function checks its arguments, then runs one compiled program per input shape (no
jax.jit needed; it also works inside the caller's jit, vmap and shard_map).
"""

# The one version number: the package metadata (setup.cfg) reads it, CHANGELOG.md starts with it.
__version__ = "0.1.0"

from cka_jax._cca import CCAResult, cca, mean_cca, pwcca, svcca
from cka_jax._cka import cka, linear_cka, rbf_cka
from cka_jax._compare import CKAComparison, compare, load_comparison
from cka_jax._hsic import center_gram, gram_linear, gram_rbf, hsic
from cka_jax._identification import LayerIdentification, layer_identification
from cka_jax._matching import UnitMatching, match_units, sparse_prediction_loss, unit_correlations
from cka_jax._minibatch import MinibatchCKA, minibatch_grams
from cka_jax._pca import (
    first_pc_cosine_similarity,
    first_pc_direction,
    first_pc_scores,
    first_pc_variance_fraction,
    remove_first_pc,
)

__all__ = [
    "CCAResult",
    "CKAComparison",
    "LayerIdentification",
    "MinibatchCKA",
    "UnitMatching",
    "cca",
    "center_gram",
    "cka",
    "compare",
    "first_pc_cosine_similarity",
    "first_pc_direction",
    "first_pc_scores",
    "first_pc_variance_fraction",
    "gram_linear",
    "gram_rbf",
    "hsic",
    "layer_identification",
    "linear_cka",
    "load_comparison",
    "match_units",
    "mean_cca",
    "minibatch_grams",
    "pwcca",
    "rbf_cka",
    "remove_first_pc",
    "sparse_prediction_loss",
    "svcca",
    "unit_correlations",
]
