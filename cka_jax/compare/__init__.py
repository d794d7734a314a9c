"""Compare your own model: one call from Flax models (or activations) and data to a CKA heatmap.

    import cka_jax
    result = cka_jax.compare((module, variables), nnx_model, loader, layers_a="block*/conv")
    result.heatmap            # (La, Lb) NumPy, NaN where undefined
    result.plot()             # matplotlib Figure, first layer bottom left
    result.save("cka.npz"); cka_jax.compare.load("cka.npz")

Models: a linen ``(module, variables[, apply_kwargs])`` pair, an NNX module, or a function
``x -> {name: activation}``; ``model_a=None`` reads activations from `batches` (for PyTorch or
NumPy users). See `compare` for every option. Only jax and numpy are imported here; flax,
matplotlib and tqdm when a call needs them.
"""

from cka_jax.compare.driver import compare
from cka_jax.compare.result import CKAComparison, load

# `cka_jax.compare` is this function once `cka_jax` re-exports it: keep `cka_jax.compare.load`
# and `cka_jax.compare.CKAComparison` working either way.
compare.load = load  # type: ignore[attr-defined]
compare.CKAComparison = CKAComparison  # type: ignore[attr-defined]

__all__ = ["CKAComparison", "compare", "load"]
