"""cka_jax: representation similarity (CKA, SVCCA, PWCCA, unit matching) for populations of networks.

The similarity library, this package's top-level modules (importing it loads jax, numpy, scipy):
    owned         host arrays as compiled code reads them: private copies, values unchanged
    checks        the input checks every measure runs on the host: one-line ValueErrors
    scaling       exact power-of-two rescaling and feature centring (so no scale under/overflows)
    hsic, cka     grams, centering, HSIC; CKA of grams and of representations
    cca, pca      CCA, SVCCA, PWCCA; first principal components
    matching      unit matching and sparse prediction (scikit-learn imported on first use)
    minibatch     MinibatchCKA, built from layer_grams (one minibatch's grams), host_grams (the
                  grams the host builds on CPU), hsic_sums (the running sums and their units) and
                  sharded_sums (update_sharded)
    compare       compare(model_a, model_b, batches): one call, any model -> CKAComparison
Every public function checks its arguments, then runs one compiled program per input shape (no
jax.jit needed; it also works inside the caller's jit, vmap and shard_map).
"""

from cka_jax.cca import CCAResult, cca, mean_cca, pwcca, svcca
from cka_jax.cka import cka, linear_cka, rbf_cka
from cka_jax.compare import CKAComparison, compare
from cka_jax.hsic import center_gram, gram_linear, gram_rbf, hsic
from cka_jax.matching import UnitMatching, match_units, sparse_prediction_loss, unit_correlations
from cka_jax.minibatch import MinibatchCKA, minibatch_grams
from cka_jax.pca import (
    first_pc_cosine_similarity,
    first_pc_direction,
    first_pc_scores,
    first_pc_variance_fraction,
    remove_first_pc,
)

__all__ = [
    "CCAResult",
    "CKAComparison",
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
    "linear_cka",
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
