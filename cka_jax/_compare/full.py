"""Whole-set CKA for ``debiased=False``: the biased estimator of Kornblith et al. 2019.

CKA(K, L) = <HKH, HLH> / (‖HKH‖ ‖HLH‖) with K, L the (n, n) grams of all n examples at once
(`cka_jax.cka` on `gram_linear` / `gram_rbf`). Unlike minibatch CKA it needs every example's
activations together: they are copied to the host as they come (the caller may reuse its arrays),
(n, features) per layer in their own dtype, and each layer's gram
takes n² floats (n = 10,000: 400 MB per layer in float32), so it suits a few thousand examples.
Its bias shrinks as 1/n; the minibatch estimator (`debiased=True`) has none at any batch size.
"""

from __future__ import annotations

import jax
import numpy as np

from cka_jax._cka import cka
from cka_jax._hsic import gram_linear, gram_rbf
from cka_jax._owned import owned_copy, unit_scale


@jax.jit
def _biased_cka(gram_x: jax.Array, gram_y: jax.Array) -> jax.Array:
    return cka(gram_x, gram_y, debiased=False)


def _unit_scale(x: np.ndarray) -> np.ndarray:
    """x: (n, p) times the power of two that brings its largest magnitude into [1, 2): exact, and
    CKA is unchanged by it (linear kernel; the RBF bandwidth follows the median distance), but the
    gram of activations near 1e-30 or 1e30 no longer under- or overflows float32."""
    if x.dtype.kind != "f":  # bool/int activations: scaled as floats (64-bit integers exactly), not truncated back
        x = x.astype(np.float64 if x.dtype.itemsize >= 8 else np.float32)
    # NaN/inf stay and make the layer's CKA NaN; a constant-zero layer stays undefined
    return unit_scale(x).astype(x.dtype, copy=False) if x.size else x


class WholeSetCKA:
    """Collects activations (n_b, ...) per layer over minibatches; `result` -> (La, Lb).

    Same calls as `MinibatchCKA` (update, count, result), single models only.
    """

    def __init__(self, num_layers_a: int, num_layers_b: int | None, kernel: str, threshold: float):
        self.kernel, self.threshold = kernel, threshold
        self.parts: list[list[list[np.ndarray]]] = [[[] for _ in range(num_layers_a)]]
        if num_layers_b is not None:
            self.parts.append([[] for _ in range(num_layers_b)])
        self.count = 0
        self.finite = [np.ones((1, len(side)), bool) for side in self.parts]

    def update(self, acts_a: list, acts_b: list | None = None) -> WholeSetCKA:
        for side, acts in enumerate([acts_a, acts_b][: len(self.parts)]):
            for layer, a in enumerate(acts or ()):
                a = owned_copy(np.asarray(a))
                a = a.reshape(a.shape[0], -1)
                self.finite[side][0, layer] &= bool(np.isfinite(a).all()) if a.dtype.kind == "f" else True
                self.parts[side][layer].append(a)
        self.count += 1
        return self

    def _grams(self, side: int) -> list[jax.Array]:
        grams = []
        for chunks in self.parts[side]:
            x = _unit_scale(np.concatenate(chunks))  # host float64 stays float64 for gram_*'s own checks
            grams.append(gram_linear(x) if self.kernel == "linear" else gram_rbf(x, self.threshold))
        return grams

    def result(self) -> np.ndarray:
        grams_a = self._grams(0)
        grams_b = self._grams(1) if len(self.parts) == 2 else grams_a
        return np.array([[float(_biased_cka(ga, gb)) for gb in grams_b] for ga in grams_a])
