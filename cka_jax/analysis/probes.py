"""Linear probes (paper Fig. 4): softmax regression on frozen, spatially averaged layer features,
fitted with optax on training examples and scored on the test set, vmapped over the models."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from cka_jax.analysis.plots import add_note, finish_layer_axis
from cka_jax.analysis.undefined import mean_of_defined


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit_and_score(train_x, train_y, test_x, test_y, *, num_classes: int, steps: int,
                   learning_rate: float, l2: float) -> jax.Array:
    """One probe per model: train_x (M, n, p), test_x (M, k, p) -> test accuracy (M,)."""
    def one(tx, ex):
        mean, std = tx.mean(0), tx.std(0) + 1e-6
        tx, ex = (tx - mean) / std, (ex - mean) / std
        params = {"w": jnp.zeros((tx.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
        opt = optax.adam(learning_rate)

        def loss(p):
            logits = tx @ p["w"] + p["b"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, train_y).mean() + l2 * jnp.sum(p["w"] ** 2)

        def step(carry, _):
            p, s = carry
            updates, s = opt.update(jax.grad(loss)(p), s)
            return (optax.apply_updates(p, updates), s), None

        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
        accuracy = jnp.mean(jnp.argmax(ex @ params["w"] + params["b"], -1) == test_y)
        # argmax of NaN logits is 0: without this a non-finite layer would score class 0's share
        return jnp.where(jnp.isfinite(tx).all() & jnp.isfinite(ex).all(), accuracy, jnp.nan)

    return jax.vmap(one)(train_x.astype(jnp.float32), test_x.astype(jnp.float32))


def probe_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                   test_labels: np.ndarray, num_classes: int, steps: int = 300, learning_rate: float = 0.05,
                   l2: float = 1e-4) -> np.ndarray:
    """Test accuracy (M,) of linear probes fitted per model on train_features (M, n, p) with labels
    (n,), scored on test_features (M, k, p) with labels (k,). Features are standardised with the
    training statistics; full-batch Adam for `steps` steps with an L2 penalty `l2` on the weights.
    A model whose features are not all finite gets NaN (undefined), not a chance-level score."""
    if train_features.ndim != 3 or test_features.ndim != 3:
        raise ValueError(f"features must be (models, examples, features), got {train_features.shape} and "
                         f"{test_features.shape}")
    return np.asarray(_fit_and_score(train_features, jnp.asarray(train_labels), test_features,
                                     jnp.asarray(test_labels), num_classes=num_classes, steps=steps,
                                     learning_rate=learning_rate, l2=l2))


def plot_probes(accuracy: np.ndarray, layer_names: Sequence[str], title: str, inside: Sequence[bool] = (),
                note: str = ""):
    """Probe accuracy per layer (seeds thin, mean over the defined seeds thick; pre-residual layers
    as open markers); layers inside the block structure shaded; `note` under the figure."""
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(layer_names)), 4))
    x = np.arange(len(layer_names))
    for row in accuracy:
        ax.plot(x, row, color="tab:green", alpha=0.25, lw=1)
    mean = mean_of_defined(accuracy)[0]
    ax.plot(x, mean, color="tab:green", lw=2)
    pre = np.array(["pre_residual" in n for n in layer_names])
    ax.scatter(x[~pre], mean[~pre], color="tab:green", zorder=3, label="post-residual / other")
    ax.scatter(x[pre], mean[pre], facecolor="white", edgecolor="tab:green", zorder=3, label="pre-residual")
    finish_layer_axis(ax, layer_names, inside, "linear probe test accuracy", title, fontsize=7)
    fig.tight_layout()
    add_note(fig, note)
    return fig
