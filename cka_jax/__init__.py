"""cka_jax: representation similarity (CKA, SVCCA, PWCCA, unit matching) for populations of networks."""
from cka_jax.cca import CCAResult, cca, mean_cca, pwcca, svcca
from cka_jax.cka import cka, linear_cka, rbf_cka
from cka_jax.hsic import center_gram, gram_linear, gram_rbf, hsic
from cka_jax.matching import UnitMatching, match_units, sparse_prediction_loss, unit_correlations
from cka_jax.minibatch import MinibatchCKA, minibatch_grams
from cka_jax.pca import (first_pc_cosine_similarity, first_pc_direction, first_pc_scores,
                         first_pc_variance_fraction, remove_first_pc)

__all__ = [
    "CCAResult",
    "MinibatchCKA",
    "UnitMatching",
    "cca",
    "center_gram",
    "cka",
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
