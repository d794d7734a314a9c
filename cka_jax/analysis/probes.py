"""Linear probes (paper Fig. 4): softmax regression on frozen, spatially averaged layer features,
fitted with optax on training examples and scored on the test set, vmapped over the models.

Report section (`section`, entry `ANALYSIS`): probes.npz, probes.png.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from cka_jax.analysis.blocks import blocks_in_structure, layers_inside, mean_heatmap_block, undefined_block_note
from cka_jax.analysis.bootstrap import bootstrap_mean, format_interval
from cka_jax.analysis.entry import Analysis
from cka_jax.analysis.notes import caption, joined, line_note, with_note
from cka_jax.analysis.outputs import Section, Table, write_npz
from cka_jax.analysis.plots import add_note, finish_layer_axis, short_name, subplots
from cka_jax.analysis.representations import collect
from cka_jax.analysis.undefined import LayerStatus, defined_rows, left_out, mean_of_defined

if TYPE_CHECKING:
    from cka_jax.analysis.context import AnalysisContext


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit_and_score(
    train_x, train_y, test_x, test_y, *, num_classes: int, steps: int, learning_rate: float, l2: float
) -> jax.Array:
    """One probe per model: train_x (M, n, p), test_x (M, k, p) -> test accuracy (M,)."""
    import optax  # here, not at the top: importing the module should not load the optimiser library

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


def probe_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    steps: int = 300,
    learning_rate: float = 0.05,
    l2: float = 1e-4,
) -> np.ndarray:
    """Test accuracy (M,) of linear probes fitted per model on train_features (M, n, p) with labels
    (n,), scored on test_features (M, k, p) with labels (k,). Features are standardised with the
    training statistics; full-batch Adam for `steps` steps with an L2 penalty `l2` on the weights.
    A model whose features are not all finite gets NaN (undefined), not a chance-level score."""
    if train_features.ndim != 3 or test_features.ndim != 3:
        raise ValueError(
            f"features must be (models, examples, features), got {train_features.shape} and {test_features.shape}"
        )
    return np.asarray(
        _fit_and_score(
            train_features,
            jnp.asarray(train_labels),
            test_features,
            jnp.asarray(test_labels),
            num_classes=num_classes,
            steps=steps,
            learning_rate=learning_rate,
            l2=l2,
        )
    )


def plot_probes(
    accuracy: np.ndarray, layer_names: Sequence[str], title: str, inside: Sequence[bool] = (), note: str = ""
):
    """Probe accuracy per layer (seeds thin, mean over the defined seeds thick; pre-residual layers
    as open markers); layers inside the block structure shaded; `note` under the figure."""
    fig, ax = subplots(figsize=(max(6, 0.32 * len(layer_names)), 4))
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


def section(ctx: AnalysisContext) -> Section:
    """Fig. 4: linear probe accuracy per layer, pre and post residual."""
    p, o = ctx.main, ctx.options
    train_images, train_labels = ctx.train_set(p)
    pick = np.sort(np.random.default_rng(o.seed).permutation(len(train_labels))[: o.probe_examples])
    train = collect(p, train_images[pick], ctx.test, "pre_and_post", pool=True, progress=ctx.progress)
    test = collect(p, ctx.test.in_memory_images(), ctx.test, "pre_and_post", pool=True, progress=ctx.progress)
    names = tuple(train)
    acc = np.stack(
        [
            probe_accuracy(train[n], train_labels[pick], test[n], ctx.test.labels, ctx.test.num_classes, o.probe_steps)
            for n in ctx.progress(names, desc="linear probes", leave=False)
        ],
        axis=1,
    )
    write_npz(ctx.path("probes.npz"), accuracy=acc, layer_names=np.array(names))
    block, block_layers = mean_heatmap_block(ctx, p)
    inside = layers_inside(names, blocks_in_structure(block_layers, block))
    finite = LayerStatus.of(train).finite & LayerStatus.of(test).finite
    note = left_out(
        defined_rows(acc),
        lambda m: f"non-finite features in seed {m}" if not finite[m].all() else "the probe's accuracy is not finite",
    )
    notes = joined(note, undefined_block_note(block))
    fig = plot_probes(acc, names, f"{p.name}: linear probes on frozen features", inside, line_note(notes))
    mean, low, high = bootstrap_mean(acc, o.num_bootstrap, o.level, o.seed)
    rows = [
        [short_name(n), format_interval(m, lo, hi, 3, note)]
        for n, m, lo, hi in zip(names, mean, low, high, strict=True)
    ]
    text = (
        f"Softmax regression (Adam, {o.probe_steps} full-batch steps, L2 1e-4) on each layer's spatially "
        f"averaged features of {len(pick)} training examples, scored on the {len(ctx.test.labels)} test "
        "examples. Shaded: layers of residual blocks inside the detected block structure. In the paper, "
        "probe accuracy plateaus inside the block structure. A model with non-finite features has an "
        "undefined probe accuracy (not a chance-level one)."
    )
    table = Table(["layer", f"probe accuracy, mean [{o.level:.0%} CI over seeds]"], rows, caption(note))
    return Section(
        "probes", "Linear probes", with_note(text, notes), [ctx.save_figure(fig, "probes")], [table], ["probes.npz"]
    )


ANALYSIS = Analysis("probes", section, description="linear probes per layer (Fig. 4)")
