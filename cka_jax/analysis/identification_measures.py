"""The CCA-family and regression similarities of the layer-identification table, for every pair of
(model, layer) representations, from one SVD per representation.

Each representation x: (n, p) (features centred over the examples) has a thin SVD x = U S Vᵀ;
directions with s <= max(1e-6, max(n, p)·eps)·s_max are dropped, as in `cka_jax.cca`. For two
representations with kept bases U_x, U_y, everything below comes from M = U_xᵀ U_y:
  CCA: canonical correlations ρ = singular values of M; ρ̄ = mean ρ, R²_CCA = mean ρ².
  SVCCA: the same on the fewest top directions explaining 0.99 of each side's variance (the
      direction that crosses 0.99 kept, as `cka_jax.svcca`), i.e. a corner of M.
  PWCCA of x (Morcos et al. 2018): canonical variates h = U_x W (W from M's SVD), weights
      α̃ᵢ = Σⱼ |⟨hᵢ, zⱼ⟩| over x's centred units zⱼ, i.e. the row sums of |Wᵀ S_x V_xᵀ|; Σ αᵢ ρᵢ.
  linear regression of y on x: R² = ‖U_xᵀ y‖² / ‖y‖² = ‖M S_y‖² / ‖S_y‖² (least squares, all
      of y's features at once).
These equal `cka_jax.cca` / `svcca(keep=0.99)` / `pwcca` on the same pair (tests/test_layer_identification.py)
but cost one SVD per representation instead of two per pair.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

SVCCA_KEEP = 0.99
EPSILON = 1e-6
MEASURES = ("cca_rho", "cca_r2", "svcca_rho", "svcca_r2", "pwcca", "linear_regression")


class Basis(NamedTuple):
    """A representation's kept SVD: u (n, k) orthonormal columns, s (k,) singular values,
    units (k, p) = S Vᵀ (the units' coordinates in u), svcca (k,) bool: directions SVCCA keeps."""

    u: np.ndarray
    s: np.ndarray
    units: np.ndarray
    svcca: np.ndarray


def basis(x: np.ndarray) -> Basis | None:
    """The kept SVD of x: (n, p) (centred here, float64); None when x is constant or not finite."""
    x = np.asarray(x, np.float64)
    x = x - x.mean(axis=0)
    if not np.isfinite(x).all():
        return None
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    if not s.size or s[0] == 0:
        return None
    keep = s > max(EPSILON, max(x.shape) * np.finfo(np.float64).eps) * s[0]
    u, s, vt = u[:, keep], s[keep], vt[keep]
    var = s**2
    before = np.cumsum(var) - var
    return Basis(u, s, s[:, None] * vt, before < SVCCA_KEEP * var.sum())


def _pwcca(w: np.ndarray, rho: np.ndarray, units: np.ndarray) -> float:
    weights = np.abs(w.T @ units).sum(axis=1)
    return float(np.sum(weights * rho) / np.sum(weights))


def pair_measures(a: Basis, b: Basis, m: np.ndarray | None = None) -> dict[str, tuple[float, float]]:
    """Every measure of MEASURES for the pair (a, b): name -> (value weighting or predicting from a,
    the same from b); symmetric measures give the same value twice. m: a.uᵀ b.u if already known."""
    m = a.u.T @ b.u if m is None else m
    wa, rho, wbt = np.linalg.svd(m, full_matrices=False)
    rho = np.clip(rho, 0.0, 1.0)
    sv = m[np.ix_(a.svcca, b.svcca)]
    rho_sv = np.clip(np.linalg.svd(sv, compute_uv=False), 0.0, 1.0)
    reg_ab = float(np.sum((m * b.s[None, :]) ** 2) / np.sum(b.s**2))  # y = b predicted from a
    reg_ba = float(np.sum((m.T * a.s[None, :]) ** 2) / np.sum(a.s**2))
    return {
        "cca_rho": (float(rho.mean()),) * 2,
        "cca_r2": (float(np.mean(rho**2)),) * 2,
        "svcca_rho": (float(rho_sv.mean()),) * 2,
        "svcca_r2": (float(np.mean(rho_sv**2)),) * 2,
        "pwcca": (_pwcca(wa, rho, a.units), _pwcca(wbt.T, rho, b.units)),
        "linear_regression": (reg_ab, reg_ba),
    }


def similarity_matrices(bases: list[list[Basis | None]]) -> dict[str, np.ndarray]:
    """bases[model][layer] -> name -> (M, M, L, L) similarities S[a, b, i, j] of layer i of model a
    and layer j of model b (a != b; NaN on a == b and where a side is undefined). Asymmetric measures
    are returned as S + Sᵀ (PWCCA weighting each side, regression predicting each way), the
    paper's symmetrisation."""
    num_models, num_layers = len(bases), len(bases[0])
    out = {name: np.full((num_models, num_models, num_layers, num_layers), np.nan) for name in MEASURES}
    for a in range(num_models):
        for b in range(a + 1, num_models):
            for i in range(num_layers):
                for j in range(num_layers):
                    x, y = bases[a][i], bases[b][j]
                    if x is None or y is None:
                        continue
                    for name, (forward, backward) in pair_measures(x, y).items():
                        value = forward + backward if name in ("pwcca", "linear_regression") else forward
                        out[name][a, b, i, j] = out[name][b, a, j, i] = value
    return out
