"""Permutation null of minibatch CKA: null replicates, p-values and the null's mean.

Replicate r permutes the examples of model b (the second representation) within every minibatch
by its own random permutation π_r, the same for every layer and model, so the null of the whole
heatmap is joint (a row's maximum, every model pair). HSIC₁ is permutation-equivariant — the
U-centred gram of the permuted examples is the U-centred gram with rows and columns permuted,
U(P L Pᵀ) = P U(L) Pᵀ — so a replicate costs a gather of the grams already built and one matmul,
never new activations. Grams travel as their strict upper triangles (`upper`): entry (i, j), i < j,
of the permuted gram is entry (min, max) of (π(i), π(j)) of the original (zero diagonal,
symmetric), so one index map per replicate serves the host-built and the compiled grams alike.
Only the xy sums change under a permutation (xx, yy do not); the null's xy sums are kept in the
units of the observed ones and combined, merged, sharded and rescaled with them.

p-value of an entry: (1 + #{r: null_r ≥ observed}) / (P + 1), valid at any P (the observed
statistic counts as one draw of the null; Phipson & Smyth 2010). Ties count as ≥ (conservative).
Under exchangeability of examples within minibatches (independent representations) it is uniform
on {1, ..., P + 1} / (P + 1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from cka_jax._hsic_sums import HsicSums, cka_ratio
from cka_jax._scaling import HIGHEST


def replicate_keys(key_data: jax.Array, indices: jax.Array, num_permutations: int) -> jax.Array | None:
    """Raw PRNG keys (k, P, ...) of the null replicates of minibatches `indices` (k,), fixed by the
    accumulator's key and each minibatch's index (a stream apart from the bootstrap weights');
    None where no replicates are kept."""
    if not num_permutations:
        return None
    key = jax.random.wrap_key_data(key_data)

    def draw(i: jax.Array) -> jax.Array:
        stream = jax.random.fold_in(jax.random.fold_in(key, i), 1)
        return jax.random.key_data(jax.random.split(stream, num_permutations))

    return jax.vmap(draw)(indices)


def permuted_upper_index(perm: jax.Array) -> jax.Array:
    """Index (D,) into a strict upper triangle (`upper`, D = n(n - 1)/2) that gives the triangle of
    the gram with rows and columns permuted by perm: (n,) (G'[i, j] = G[perm[i], perm[j]])."""
    n = perm.shape[0]
    rows, cols = np.triu_indices(n, 1)
    i, j = perm[rows], perm[cols]
    lo, hi = jnp.minimum(i, j), jnp.maximum(i, j)
    return lo * (2 * n - lo - 1) // 2 + hi - lo - 1


def null_sums(ga: jax.Array, gb: jax.Array | None, keys: jax.Array | None) -> jax.Array | None:
    """HSIC₁ xy of one minibatch under each null replicate: ga: (Ma, La, D), gb: (Mb, Lb, D) upper
    triangles of U-centred grams (gb None: model a against itself), keys: (P, ...) raw keys ->
    (P, Ma, Mb, La, Lb), the observed `batch_hsic` xy with model b's examples permuted; keys None
    (no replicates kept) -> None."""
    second = ga if gb is None else gb
    (ma, la, d), (mb, lb) = ga.shape, second.shape[:2]
    if keys is None:
        return None
    n = (1 + math.isqrt(1 + 8 * d)) // 2
    fa, fb = ga.reshape(ma * la, d), second.reshape(mb * lb, d)

    def one(key: jax.Array) -> jax.Array:
        index = permuted_upper_index(jax.random.permutation(jax.random.wrap_key_data(key), n))
        xy = jnp.matmul(fa, fb[:, index].T, precision=HIGHEST) * (2.0 / (n * (n - 3)))
        return xy.reshape(ma, la, mb, lb).transpose(0, 2, 1, 3)

    return jax.lax.map(one, keys)


def _valid(p: jax.Array, observed: jax.Array, null: jax.Array) -> jax.Array:
    """p where the observed value and every null replicate are defined; NaN elsewhere."""
    return jnp.where(jnp.isnan(observed) | jnp.any(jnp.isnan(null), axis=0), jnp.nan, p)


def _fraction(null: jax.Array, observed: jax.Array) -> jax.Array:
    return (1 + jnp.sum(null >= observed, axis=0)) / (null.shape[0] + 1)


@jax.jit
def entry_p_values(sums: HsicSums, null_xy: jax.Array) -> jax.Array:
    """(1 + #{null ≥ observed}) / (P + 1) per entry, (Ma, Mb, La, Lb); NaN where CKA is undefined.
    The xy sums are compared (the denominators are the same for the null and the observed)."""
    observed = cka_ratio(sums, True)
    null = cka_ratio(HsicSums(null_xy, sums.xx, sums.yy), True)
    return _valid(_fraction(null_xy, sums.xy), observed, null)


@jax.jit
def row_max_p_values(sums: HsicSums, null_xy: jax.Array) -> jax.Array:
    """Family-wise p-value of each row's largest CKA (max over model b's layers), (Ma, Mb, La):
    the observed maximum against each replicate's maximum over the same row; NaN where any entry
    of the row is undefined."""
    observed = jnp.max(cka_ratio(sums, True), axis=-1)
    null = jnp.max(cka_ratio(HsicSums(null_xy, sums.xx, sums.yy), True), axis=-1)
    return _valid(_fraction(null, observed), observed, null)


@jax.jit
def null_mean(sums: HsicSums, null_xy: jax.Array) -> jax.Array:
    """Mean CKA of the null replicates, (Ma, Mb, La, Lb); NaN where undefined."""
    return jnp.mean(cka_ratio(HsicSums(null_xy, sums.xx, sums.yy), True), axis=0)


class PermutationTests:
    """The permutation-test views of `MinibatchCKA` (its fields null_xy, xy, xx, yy, population)."""

    null_xy: jax.Array | None
    xy: jax.Array
    xx: jax.Array
    yy: jax.Array
    population: bool

    @property
    def num_permutations(self) -> int:
        return 0 if self.null_xy is None else self.null_xy.shape[0]

    def _null_parts(self) -> tuple[HsicSums, jax.Array]:
        if self.null_xy is None:
            raise ValueError("this accumulator keeps no null replicates: create it with num_permutations > 0")
        return HsicSums(self.xy, self.xx, self.yy), self.null_xy

    def _view(self, out: jax.Array) -> jax.Array:
        return out if self.population else out[0, 0]

    def p_values(self) -> jax.Array:
        """Permutation p-value of every heatmap entry, like result(): (1 + #{null ≥ observed}) / (P + 1).

        The null permutes model b's examples within each minibatch (one permutation per replicate,
        shared by all layers and models). Values lie in [1/(P + 1), 1]; NaN where CKA is undefined
        (a constant layer, NaN or inf activations): never a p-value for an undefined entry.
        """
        return self._view(entry_p_values(*self._null_parts()))

    def row_max_p_values(self) -> jax.Array:
        """Family-wise p-value of each row's best-matching layer: (La,), or (Ma, Mb, La) in population
        mode. Compares max_j CKA[i, j] with each replicate's max_j, so it controls the chance that
        any layer of model b looks that similar to layer i under the null; NaN where any entry of
        the row is undefined."""
        return self._view(row_max_p_values(*self._null_parts()))

    def null_mean(self) -> jax.Array:
        """Mean CKA over the null replicates, like result(): near 0 for the unbiased HSIC₁ at any
        width; NaN where undefined."""
        return self._view(null_mean(*self._null_parts()))
