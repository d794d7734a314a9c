"""Float64 NumPy references written from the formulas (Gretton et al. 2005; Song et al. 2012;
Kornblith et al. 2019; Nguyen et al. 2021), independent of the library's code paths."""

import numpy as np


def flat(x):
    x = np.asarray(x, np.float64)
    return x.reshape(x.shape[0], -1)


def gram_linear(x):
    x = flat(x)
    return x @ x.T


def gram_rbf(x, threshold=1.0):
    x = flat(x)
    sq = np.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1)
    return np.exp(-sq / (2 * threshold**2 * np.median(sq)))


def hsic0(k, l):
    """vec(HKH)·vec(HLH)/(n-1)² with the explicit centering matrix H."""
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return np.sum((h @ k @ h) * (h @ l @ h)) / (n - 1) ** 2


def hsic1(k, l):
    """Song et al. 2012, as printed: [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n-1)(n-2)) - 2/(n-2)·1ᵀK̃L̃1] / (n(n-3))."""
    n = k.shape[0]
    kt = k - np.diag(np.diag(k))
    lt = l - np.diag(np.diag(l))
    one = np.ones(n)
    return (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * one @ kt @ lt @ one
    ) / (n * (n - 3))


def cka(k, l, debiased=False):
    f = hsic1 if debiased else hsic0
    return f(k, l) / np.sqrt(f(k, k) * f(l, l))


def minibatch_cka(batches_a, batches_b, gram=gram_linear):
    """Nguyen et al. 2021: Σ_b HSIC₁(K_b, L_b) / sqrt(Σ_b HSIC₁(K_b, K_b) · Σ_b HSIC₁(L_b, L_b)).

    batches_*: list over minibatches of lists over layers of (n, ...) arrays -> (La, Lb)."""
    la, lb = len(batches_a[0]), len(batches_b[0])
    xy, xx, yy = np.zeros((la, lb)), np.zeros(la), np.zeros(lb)
    for acts_a, acts_b in zip(batches_a, batches_b, strict=True):
        ks = [gram(a) for a in acts_a]
        ls = [gram(b) for b in acts_b]
        for i, k in enumerate(ks):
            xx[i] += hsic1(k, k)
            for j, l in enumerate(ls):
                xy[i, j] += hsic1(k, l)
        for j, l in enumerate(ls):
            yy[j] += hsic1(l, l)
    return xy / np.sqrt(xx[:, None] * yy[None, :])
