"""cka_jax: representation similarity (CKA, SVCCA, PWCCA, unit matching) for populations of networks."""
from cka_jax.cka import cka, linear_cka, rbf_cka
from cka_jax.hsic import center_gram, gram_linear, gram_rbf, hsic
from cka_jax.minibatch import MinibatchCKA, minibatch_grams

__all__ = [
    "MinibatchCKA",
    "center_gram",
    "cka",
    "gram_linear",
    "gram_rbf",
    "hsic",
    "linear_cka",
    "minibatch_grams",
    "rbf_cka",
]
