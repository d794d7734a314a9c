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
import math
import numbers
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cka_jax.hsic import HIGHEST, check_pair, scaled_centred, times_pow2


class CCAResult(NamedTuple):
    """Canonical correlations and variates; `k = min(n, p, q)`, valid entries first.

    rho: (k,) canonical correlations in [0, 1], descending, zero from `num_valid` on.
    num_valid: () int, `r = min(rank_x, rank_y)`, the number of valid correlations.
    x_variates: (n, k) unit-norm canonical variates of x (columns), zero from `num_valid` on.
    y_variates: (n, k) the same for y; `x_variates[:, i] · y_variates[:, i] = rho[i]`.
    x_weights: (k,) PWCCA projection weights of x, `α̃ᵢ = Σⱼ |⟨x_variates[:, i], zⱼ⟩|` over
        the centred units `zⱼ` of x (unnormalised, in x's units), zero from `num_valid` on.
    """

    rho: jax.Array
    num_valid: jax.Array
    x_variates: jax.Array
    y_variates: jax.Array
    x_weights: jax.Array


def _matrices(x: jax.Array, y: jax.Array, epsilon) -> tuple[jax.Array, jax.Array]:
    """`x: (n, ...)`, `y: (n, ...)` -> checked float `(n, p)`, `(n, q)`; ValueError unless both are
    real arrays with at least one example and feature and the same n, and epsilon is >= 0."""
    xm, ym = check_pair(x, y)
    if not isinstance(epsilon, jax.core.Tracer) and (
            isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not 0 <= epsilon < math.inf):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    return xm, ym


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
    xc: jax.Array, epsilon: jax.Array, keep_count: jax.Array, keep_fraction: jax.Array
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


@jax.jit
def _cca(
    x: jax.Array, y: jax.Array, epsilon: jax.Array, keep_count: jax.Array, keep_fraction: jax.Array
) -> tuple[CCAResult, jax.Array]:
    """CCA between the spans of the kept directions of centred x: (n, p) and y: (n, q) (see `_basis`).

    The inputs are rescaled by exact powers of two first; x_weights stay in the rescaled units
    2^-kx of x, and kx is returned with them.
    """
    (xc, kx), (yc, _) = scaled_centred(x), scaled_centred(y)
    ux, mx = _basis(xc, epsilon, keep_count, keep_fraction)
    uy, my = _basis(yc, epsilon, keep_count, keep_fraction)
    a, b = ux * mx, uy * my
    wa, rho, wbt = jnp.linalg.svd(jnp.matmul(a.T, b, precision=HIGHEST), full_matrices=False)
    num_valid = jnp.minimum(mx.sum(), my.sum())
    valid = jnp.arange(rho.shape[0]) < num_valid
    rho = jnp.where(valid, jnp.clip(rho, 0.0, 1.0), 0.0)
    hx = jnp.where(valid, jnp.matmul(a, wa, precision=HIGHEST), 0.0)
    hy = jnp.where(valid, jnp.matmul(b, wbt.T, precision=HIGHEST), 0.0)
    finite = jnp.all(jnp.isfinite(xc)) & jnp.all(jnp.isfinite(yc))
    result = CCAResult(
        rho=jnp.where(finite, rho, jnp.nan),
        num_valid=num_valid,
        x_variates=jnp.where(finite, hx, jnp.nan),
        y_variates=jnp.where(finite, hy, jnp.nan),
        x_weights=jnp.where(finite, jnp.abs(jnp.matmul(hx.T, xc, precision=HIGHEST)).sum(axis=1), jnp.nan),
    )
    return result, kx[0, 0]


def cca(x: jax.Array, y: jax.Array, epsilon: float = 1e-6) -> CCAResult:
    """Canonical correlations between `x: (n, ...)` and `y: (n, ...)`.

    `epsilon` is the relative singular-value cut-off below which a direction of x or y is
    treated as absent (floored at `max(n, p)·eps_dtype`). Raises `ValueError` unless
    `p, q < n − 1` (see the module docstring).
    """
    xm, ym = _matrices(x, y, epsilon)
    _check_directions(x, y, xm.shape[1], ym.shape[1], "features")
    result, kx = _cca(xm, ym, epsilon, xm.shape[0], math.inf)
    return result._replace(x_weights=times_pow2(result.x_weights, kx))


def _mean_rho(result: CCAResult) -> jax.Array:
    return jnp.sum(result.rho) / result.num_valid


def mean_cca(x: jax.Array, y: jax.Array, epsilon: float = 1e-6) -> jax.Array:
    """Mean canonical correlation ρ̄ = (1/r) Σᵢ ρᵢ over the r valid pairs: scalar (NaN if r = 0)."""
    return _mean_rho(cca(x, y, epsilon))


def svcca(x: jax.Array, y: jax.Array, keep: float | int = 0.99, epsilon: float = 1e-6) -> jax.Array:
    """SVCCA similarity of `x: (n, ...)` and `y: (n, ...)`: scalar mean canonical correlation.

    Each centred representation is reduced by SVD to its top directions, then CCA runs on the
    reduced pair. `keep` is a float in (0, 1] (the fewest directions explaining that fraction
    of the variance; 1.0 keeps every direction) or an int ≥ 1 (exactly that many directions,
    at most the feature count). Directions below the `epsilon` rank cut-off are never kept.

    What n the estimate needs: CCA of d kept directions on n examples is meaningful only for
    d well below n (every correlation is 1 once a side keeps n − 1). An integer `keep` must be
    < n − 1 and warns if 2·keep ≥ n. A fraction keeps a number of directions known only after
    the SVD, up to min(p, n − 1); so that the answer never depends on the data reaching that
    bound (nor differs between eager and jitted calls), a fraction requires p, q < n − 1 like
    `cca`, raising `ValueError` otherwise (e.g. for wide layers with more features than examples;
    pass an integer keep there), and warns if p + q ≥ n. Rule of thumb: n ≥ 10 × kept directions.
    """
    xm, ym = _matrices(x, y, epsilon)
    n, p, q = xm.shape[0], xm.shape[1], ym.shape[1]
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ValueError(f"keep must be a float in (0, 1] or an int >= 1; got {keep!r}")
    if isinstance(keep, numbers.Integral):
        keep = int(keep)
        if not 1 <= keep <= min(p, q):
            raise ValueError(
                f"keep={keep} directions must be in [1, min(p, q)] for x {jnp.shape(x)} and y {jnp.shape(y)}"
            )
        _check_directions(x, y, keep, keep, "kept directions")
        return _mean_rho(_cca(xm, ym, epsilon, keep, math.inf)[0])
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep} must be a variance fraction in (0, 1] or an int >= 1")
    _check_directions(x, y, p, q, f"features (keep={keep} may keep all of them)", could=True)
    return _mean_rho(_cca(xm, ym, epsilon, n, math.inf if keep == 1.0 else float(keep))[0])


def pwcca(x: jax.Array, y: jax.Array, epsilon: float = 1e-6) -> jax.Array:
    """Projection-weighted CCA (Morcos et al. 2018) of `x: (n, ...)` and `y: (n, ...)`: scalar.

    Uses the side with fewer features (x if p ≤ q; so symmetric unless p = q): with its
    canonical variates `hᵢ` (unit-norm n-vectors) and centred units `z_j`,
    `α̃ᵢ = Σⱼ |⟨hᵢ, zⱼ⟩|` over the valid pairs, `αᵢ = α̃ᵢ / Σα̃`, and the result is `Σᵢ αᵢ ρᵢ`.
    Needs p, q < n − 1 (see the module docstring).

    Deliberate differences from other implementations:
    - google/svcca `compute_pwcca` builds its directions as `coef_x · (acts − means) + means`:
      the CCA rotation applied to the *unwhitened* units (it leaves out Σxx^{-1/2}, so they are
      not the canonical variates whose ρᵢ it weights), with the means added back; it
      orthonormalises them by QR and projects the *uncentred* units on them, so its weights
      change when a unit is shifted by a constant. It picks the side with fewer units left after
      its epsilon cut, and its y branch projects acts1 with y's coefficients. Here the weights
      use the true canonical variates and centred units, Morcos et al.'s definition, and are
      invariant to shifts, scaling and permutation of the units.
    - anatome `pwcca_distance` always weights x, and its α̃ᵢ = Σ over *examples* of |(x a)ᵢ| for
      the uncentred x (the L1 norm of a canonical variate, not its projection on the units); it
      returns the distance 1 − PWCCA.
    """
    xm, ym = _matrices(x, y, epsilon)
    if xm.shape[1] > ym.shape[1]:
        xm, ym, x, y = ym, xm, y, x
    _check_directions(x, y, xm.shape[1], ym.shape[1], "features")
    result, _ = _cca(xm, ym, epsilon, xm.shape[0], math.inf)
    return jnp.sum(result.x_weights * result.rho) / jnp.sum(result.x_weights)
