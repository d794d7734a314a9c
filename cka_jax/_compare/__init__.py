"""Compare your own model: one call from Flax models (or activations) and data to a CKA heatmap.

    import cka_jax
    result = cka_jax.compare((module, variables), nnx_model, loader, layers_a="block*/conv")
    result.heatmap            # (La, Lb) NumPy, NaN where undefined
    result.plot()             # matplotlib Figure, first layer bottom left
    result.save("cka.npz"); cka_jax.load_comparison("cka.npz")

Models: a linen ``(module, variables[, apply_kwargs])`` pair, an NNX module, or a function
``x -> {name: activation}``; ``model_a=None`` reads activations from `batches` (for PyTorch or
NumPy users). See `compare` for every option. Only jax and numpy are imported here; flax,
matplotlib and tqdm when a call needs them.
"""

from cka_jax._compare.driver import compare
from cka_jax._compare.result import CKAComparison, load_comparison

__all__ = ["CKAComparison", "compare", "load_comparison"]
