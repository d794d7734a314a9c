"""Canonical correlation analysis: CCA, SVCCA (Raghu et al. 2017), PWCCA (Morcos et al. 2018).

Representations are `x: (n, ...)`, `y: (n, ...)` with the same `n` examples first; trailing
dims are flattened to `p` and `q` features, features are centred over the examples, and the
maths runs in each input's float dtype. CCA is computed as the singular values of `U_xᵀ U_y`,
with `U_x`, `U_y` orthonormal bases (thin SVD) of the centred representations; directions
with singular value `s ≤ max(epsilon, max(n, p)·eps_dtype)·s_max` are masked out, so
rank-deficient inputs work and shapes stay static (jit-compatible). Each input is first rescaled
by an exact power of two, so the results do not depend on its scale (1e-30 or 1e30 in float32).

CCA needs many more examples than features. After centring the data live in `n − 1`
dimensions: a representation with `n − 1` or more directions spans all of it and makes every
canonical correlation 1, whatever the data. `cca`, `mean_cca`, `pwcca` and `svcca` (any
`keep`) therefore raise `ValueError` when either side has `≥ n − 1` features (kept directions;
with a variance-fraction `keep`, the features it could keep), and warn when the two together
have `≥ n` (then `p + q − (n − 1)` correlations are 1 by construction). A common rule of thumb
is `n ≥ 10·(p + q)`. For wide layers use `svcca` with an integer `keep`.

Non-finite inputs give NaN results.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from cka_jax._checks import Array, all_finite, check_number, check_pair, float_matrix, nan_unless
from cka_jax._scaling import HIGHEST, scaled_centred, times_pow2


class CCAResult(NamedTuple):
    """Canonical correlations and variates; `k = min(n, p, q)`, valid entries first.

    Attributes:
        rho: (k,) canonical correlations in [0, 1], descending, zero from `num_valid` on.
        num_valid: () int, `r = min(rank_x, rank_y)`, the number of valid correlations.
        x_variates: (n, k) unit-norm canonical variates of x (columns), zero from `num_valid` on.
        y_variates: (n, k) the same for y; `x_variates[:, i] · y_variates[:, i] = rho[i]`.
        x_weights: (k,) PWCCA projection weights of x, `α̃ᵢ = Σⱼ abs(⟨x_variates[:, i], zⱼ⟩)` over
            the centred units `zⱼ` of x (unnormalised, in x's units), zero from `num_valid` on.
    """

    rho: jax.Array
    num_valid: jax.Array
    x_variates: jax.Array
    y_variates: jax.Array
    x_weights: jax.Array


def _checked(x: ArrayLike, y: ArrayLike, epsilon: float) -> tuple[Array, Array]:
    """`x: (n, ...)`, `y: (n, ...)` checked (see `cka_jax._checks.check_pair`) and epsilon >= 0."""
    xc, yc = check_pair(x, y)
    check_number(epsilon, "epsilon", lambda e: 0 <= e < math.inf, "must be a finite number >= 0", traced=True)
    return xc, yc


def _features(a: Array) -> int:
    """p of a checked (n, ...) array."""
    return math.prod(a.shape[1:])


def _check_directions(x: jax.Array, y: jax.Array, dx: int, dy: int, what: str, could: bool = False) -> None:
    """Raise if either side spans (could span) the centred example space (all ρ = 1); warn if the
    two must (could) overlap. could=True: dx, dy bound directions chosen from the data."""
    n = jnp.shape(x)[0]
    if max(dx, dy) >= n - 1:
        raise ValueError(
            f"CCA of x {jnp.shape(x)} and y {jnp.shape(y)} with {dx} and {dy} {what} is degenerate: "
            f"{max(dx, dy)} >= n - 1 = {n - 1} {'can make' if could else 'makes'} every canonical correlation 1; "
            "use more examples or svcca with an integer keep < n - 1"
        )
    if dx + dy >= n:
        warnings.warn(
            f"CCA of x {jnp.shape(x)} and y {jnp.shape(y)} with {dx} + {dy} {what}: "
            f"{'if all are kept, ' if could else ''}at least {dx + dy - n + 1} canonical correlations are 1 by "
            "construction; use n well above the feature count",
            stacklevel=3,
        )


def _basis(
    xc: jax.Array, epsilon: ArrayLike, keep_count: ArrayLike, keep_fraction: ArrayLike
) -> tuple[jax.Array, jax.Array]:
    """Orthonormal basis `u: (n, k)` of centred `xc: (n, p)` and the mask `(k,)` of kept directions.

    Kept: above the rank cut-off, among the top `keep_count`, and among the fewest directions
    explaining a `keep_fraction` of the variance.
    """
    u, s, _ = jnp.linalg.svd(xc, full_matrices=False)
    tol = jnp.maximum(epsilon, max(xc.shape) * float(jnp.finfo(xc.dtype).eps)) * s[0]
    var = s**2
    before = jnp.cumsum(var) - var
    top = (jnp.arange(s.shape[0]) < keep_count) & (before < keep_fraction * jnp.sum(var))
    return u, (s > tol) & top


def _cca(
    x: jax.Array, y: jax.Array, epsilon: ArrayLike, keep_count: ArrayLike, keep_fraction: ArrayLike
) -> tuple[CCAResult, jax.Array]:
    """CCA between the spans of the kept directions of centred x: (n, ...) and y: (n, ...) (see
    `_basis`), traced.

    The inputs are rescaled by exact powers of two first; x_weights stay in the rescaled units
    2^-kx of x (PWCCA's ratio of them cannot overflow there), and kx is returned with them.
    """
    (xc, kx), (yc, _) = scaled_centred(float_matrix(x)), scaled_centred(float_matrix(y))
    ux, mx = _basis(xc, epsilon, keep_count, keep_fraction)
    uy, my = _basis(yc, epsilon, keep_count, keep_fraction)
    a, b = ux * mx, uy * my
    wa, rho, wbt = jnp.linalg.svd(jnp.matmul(a.T, b, precision=HIGHEST), full_matrices=False)
    num_valid = jnp.minimum(mx.sum(), my.sum())
    valid = jnp.arange(rho.shape[0]) < num_valid
    rho = jnp.where(valid, jnp.clip(rho, 0.0, 1.0), 0.0)
    hx = jnp.where(valid, jnp.matmul(a, wa, precision=HIGHEST), 0.0)
    hy = jnp.where(valid, jnp.matmul(b, wbt.T, precision=HIGHEST), 0.0)
    weights = jnp.abs(jnp.matmul(hx.T, xc, precision=HIGHEST)).sum(axis=1)
    finite = all_finite(xc, yc)
    result = CCAResult(
        rho=nan_unless(finite, rho),
        num_valid=num_valid,
        x_variates=nan_unless(finite, hx),
        y_variates=nan_unless(finite, hy),
        x_weights=nan_unless(finite, weights),
    )
    return result, kx[0, 0]


# One compiled program per input shape: epsilon and keep are traced, new values do not recompile.
@jax.jit
def _cca_in_x_units(
    x: jax.Array, y: jax.Array, epsilon: jax.Array, keep_count: jax.Array, keep_fraction: jax.Array
) -> CCAResult:
    result, kx = _cca(x, y, epsilon, keep_count, keep_fraction)
    return result._replace(x_weights=times_pow2(result.x_weights, kx))


@jax.jit
def _mean_cca(
    x: jax.Array, y: jax.Array, epsilon: jax.Array, keep_count: jax.Array, keep_fraction: jax.Array
) -> jax.Array:
    """Mean of the valid canonical correlations."""
    result, _ = _cca(x, y, epsilon, keep_count, keep_fraction)
    return jnp.sum(result.rho) / result.num_valid


def cca(x: jax.Array, y: jax.Array, epsilon: float = 1e-6) -> CCAResult:
    """Canonical correlations between `x: (n, ...)` and `y: (n, ...)`.

    Computed as the singular values of `U_xᵀ U_y`, with `U_x`, `U_y` orthonormal bases of the centred
    representations; directions below the `epsilon` cut-off are masked out, so rank-deficient
    inputs work and shapes stay static. Warns when p + q ≥ n (then p + q − (n − 1) correlations are
    1 by construction); a common rule of thumb is n ≥ 10·(p + q).

    Args:
        x: representation of n examples, (n, ...); trailing axes are flattened to p features.
        y: representation of the same n examples, (n, ...), q features.
        epsilon: relative singular-value cut-off below which a direction of x or y is treated as
            absent (floored at `max(n, p)·eps_dtype`).

    Returns:
        A `CCAResult`: correlations, canonical variates and PWCCA weights; NaN for NaN or inf input.

    Raises:
        ValueError: x or y is not a valid representation (at least 2 axes, numeric, the same
            n), epsilon is not a finite number ≥ 0, or a side has ≥ n − 1 features (CCA of so many
            directions makes every correlation 1).
    """
    xc, yc = _checked(x, y, epsilon)
    _check_directions(x, y, _features(xc), _features(yc), "features")
    return _cca_in_x_units(xc, yc, epsilon, xc.shape[0], math.inf)


def mean_cca(x: jax.Array, y: jax.Array, epsilon: float = 1e-6) -> jax.Array:
    """Mean canonical correlation ρ̄ = (1/r) Σᵢ ρᵢ over the r valid pairs, x: (n, ...), y: (n, ...) -> scalar.

    Args:
        x: representation of n examples, (n, ...).
        y: representation of the same n examples, (n, ...).
        epsilon: relative singular-value cut-off, as in `cca`.

    Returns:
        A scalar in [0, 1]; NaN if no pair is valid (r = 0) or for NaN or inf input.

    Raises:
        ValueError: x or y is not a valid representation (at least 2 axes, numeric, the same
            n), epsilon is not a finite number ≥ 0, or a side has ≥ n − 1 features (CCA of so many
            directions makes every correlation 1).
    """
    xc, yc = _checked(x, y, epsilon)
    _check_directions(x, y, _features(xc), _features(yc), "features")
    return _mean_cca(xc, yc, epsilon, xc.shape[0], math.inf)


def svcca(x: jax.Array, y: jax.Array, keep: float | int = 0.99, epsilon: float = 1e-6) -> jax.Array:
    """SVCCA similarity of `x: (n, ...)` and `y: (n, ...)`: scalar mean canonical correlation.

    Each centred representation is reduced by SVD to its top directions, then CCA runs on the
    reduced pair. Directions below the `epsilon` rank cut-off are never kept.

    What n the estimate needs: CCA of d kept directions on n examples is meaningful only for
    d well below n (every correlation is 1 once a side keeps n − 1). An integer `keep` must be
    < n − 1 and warns if 2·keep ≥ n. A fraction keeps a number of directions known only after
    the SVD, up to min(p, n − 1); so that the answer never depends on the data reaching that
    bound (nor differs between eager and jitted calls), a fraction requires p, q < n − 1 like
    `cca`, and warns if p + q ≥ n. Rule of thumb: n ≥ 10 × kept directions.

    Args:
        x: representation of n examples, (n, ...); trailing axes are flattened to p features.
        y: representation of the same n examples, (n, ...), q features.
        keep: a float in (0, 1] (the fewest directions explaining that fraction of the variance;
            1.0 keeps every direction) or an int ≥ 1 (exactly that many directions, at most the
            feature count).
        epsilon: relative singular-value cut-off, as in `cca`.

    Returns:
        A scalar in [0, 1]; NaN for NaN or inf input.

    Raises:
        ValueError: as `cca` (for a fraction `keep`: a side with ≥ n − 1 features, e.g. a wide
            layer; pass an integer keep there), or keep is not a fraction in (0, 1] or an integer in
            [1, min(p, q)] below n − 1.

    References:
        Raghu, Gilmer, Yosinski & Sohl-Dickstein, *SVCCA: Singular Vector Canonical Correlation
        Analysis for Deep Learning Dynamics and Interpretability*, NeurIPS 2017.

    Example:
        >>> import numpy as np
        >>> from cka_jax import svcca
        >>> x = np.random.default_rng(0).normal(size=(200, 10))
        >>> rotation, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(10, 10)))
        >>> round(float(svcca(x, 3 * x @ rotation, keep=5)), 4)
        1.0
    """
    xc, yc = _checked(x, y, epsilon)
    n, p, q = xc.shape[0], _features(xc), _features(yc)
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ValueError(f"keep must be a float in (0, 1] or an int >= 1; got {keep!r}")
    if isinstance(keep, numbers.Integral):
        keep = int(keep)
        if not 1 <= keep <= min(p, q):
            raise ValueError(
                f"keep={keep} directions must be in [1, min(p, q)] for x {jnp.shape(x)} and y {jnp.shape(y)}"
            )
        _check_directions(x, y, keep, keep, "kept directions")
        return _mean_cca(xc, yc, epsilon, keep, math.inf)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep} must be a variance fraction in (0, 1] or an int >= 1")
    _check_directions(x, y, p, q, f"features (keep={keep} may keep all of them)", could=True)
    return _mean_cca(xc, yc, epsilon, n, math.inf if keep == 1.0 else float(keep))


def pwcca(x: jax.Array, y: jax.Array, epsilon: float = 1e-6) -> jax.Array:
    """Projection-weighted CCA of `x: (n, ...)` and `y: (n, ...)`: scalar.

    Uses the side with fewer features (x if p ≤ q; so symmetric unless p = q): with its
    canonical variates `hᵢ` (unit-norm n-vectors) and centred units `z_j`,
    `α̃ᵢ = Σⱼ abs(⟨hᵢ, zⱼ⟩)` over the valid pairs, `αᵢ = α̃ᵢ / Σα̃`, and the result is `Σᵢ αᵢ ρᵢ`.

    Deliberate differences from other implementations:

    - google/svcca `compute_pwcca` builds its directions as `coef_x · (acts − means) + means`:
      the CCA rotation applied to the *unwhitened* units (it leaves out Σxx^(-1/2), so they are
      not the canonical variates whose ρᵢ it weights), with the means added back; it
      orthonormalises them by QR and projects the *uncentred* units on them, so its weights
      change when a unit is shifted by a constant. It picks the side with fewer units left after
      its epsilon cut, and its y branch projects acts1 with y's coefficients. Here the weights
      use the true canonical variates and centred units, Morcos et al.'s definition, and are
      invariant to shifts, scaling and permutation of the units.
    - anatome `pwcca_distance` always weights x, and its α̃ᵢ = Σ over *examples* of abs((x a)ᵢ) for
      the uncentred x (the L1 norm of a canonical variate, not its projection on the units); it
      returns the distance 1 − PWCCA.

    Args:
        x: representation of n examples, (n, ...); trailing axes are flattened to p features.
        y: representation of the same n examples, (n, ...), q features.
        epsilon: relative singular-value cut-off, as in `cca`.

    Returns:
        A scalar in [0, 1]; NaN for NaN or inf input.

    Raises:
        ValueError: x or y is not a valid representation (at least 2 axes, numeric, the same
            n), epsilon is not a finite number ≥ 0, or a side has ≥ n − 1 features (CCA of so many
            directions makes every correlation 1).

    References:
        Morcos, Raghu & Bengio, *Insights on representational similarity in neural networks with
        canonical correlation*, NeurIPS 2018.
    """
    xc, yc = _checked(x, y, epsilon)
    if _features(xc) > _features(yc):
        xc, yc, x, y = yc, xc, y, x
    _check_directions(x, y, _features(xc), _features(yc), "features")
    return _pwcca(xc, yc, epsilon)


@jax.jit
def _pwcca(x: jax.Array, y: jax.Array, epsilon: jax.Array) -> jax.Array:
    """PWCCA weighting the canonical variates of x (the side with fewer features)."""
    result, _ = _cca(x, y, epsilon, x.shape[0], math.inf)
    return jnp.sum(result.x_weights * result.rho) / jnp.sum(result.x_weights)
