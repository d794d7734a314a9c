"""SVCCA (Raghu et al. 2017) and PWCCA (Morcos et al. 2018) between layers: heatmaps within a
model, the same layer across seeds, and cross-seed convergence of whole populations.

Representations are the spatially averaged channels of each layer, (n, C) per model: CCA needs
many more examples than features, and averaging over positions is the usual reduction for
convolutional layers. A pair that CCA cannot measure (a side with at least n - 1 features) is
NaN and logged; a pair with a non-finite or constant side is NaN (undefined).

Report sections: `cca_section` (entry `CCA`): cca.npz, cca.png, cca_seeds.png;
`convergence_section` (entry `CONVERGENCE`): convergence.npz, convergence.png.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from cka_jax import linear_cka, pwcca, svcca
from cka_jax.analysis.bootstrap import bootstrap_mean, format_interval
from cka_jax.analysis.entry import Analysis, all_checks, all_populations, check_examples, check_models, main_population
from cka_jax.analysis.notes import heatmap_note, line_note, model_pairs, pair_name, pair_why, status_why, with_note
from cka_jax.analysis.outputs import Section, Table, write_npz
from cka_jax.analysis.plots import add_note, heatmap_grid, short_name, subplots
from cka_jax.analysis.undefined import (
    LayerStatus,
    defined_rows,
    is_defined,
    left_out,
    mean_of_defined,
    measurable,
    number,
)

if TYPE_CHECKING:
    from cka_jax.analysis.context import AnalysisContext

logger = logging.getLogger(__name__)

# A measure's value for one pair (a float, or a 0-d array of one)
Measure = Callable[[Any, Any], Any]
MEASURES: dict[str, Measure] = {
    "svcca": lambda x, y: svcca(x, y, keep=0.99),
    "pwcca": pwcca,
    "cka": linear_cka,
}


_BATCHED = {name: jax.jit(jax.vmap(fn)) for name, fn in MEASURES.items()}


def similarity(measure: str, xs: np.ndarray, ys: np.ndarray, chunk: int = 256) -> np.ndarray:
    """MEASURES[measure] of each pair xs[k] (n, ...), ys[k] (n, ...): (K,) floats; NaN (undefined)
    for a pair with a non-finite or constant side, and (logged) when CCA is degenerate for the
    shapes. Jitted and vmapped over chunks of `chunk` pairs (the last chunk padded), so each
    shape compiles once."""
    ok = measurable(xs) & measurable(ys)
    return np.where(ok, _similarity(measure, xs, ys, chunk), np.nan)


def _similarity(measure: str, xs: np.ndarray, ys: np.ndarray, chunk: int) -> np.ndarray:
    size = min(chunk, len(xs))
    out = []
    for start in range(0, len(xs), size):
        xb, yb = xs[start : start + size], ys[start : start + size]
        real = len(xb)
        if real < size:
            xb, yb = (np.concatenate([b, np.repeat(b[:1], size - real, 0)]) for b in (xb, yb))
        try:
            out.append(np.asarray(_BATCHED[measure](xb, yb), np.float64)[:real])
        except ValueError as error:
            logger.warning(
                "%s of shapes %s and %s is undefined (%s); recorded as NaN", measure, xs.shape[1:], ys.shape[1:], error
            )
            out.append(np.full(real, np.nan))
    return np.concatenate(out)


def padded_layers(reps: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Layers name -> (M, n, C_l) zero-padded to one width: (L, M, n, max C) and the widths (L,).

    Zero features change none of SVCCA, PWCCA (given its side order) or CKA, and one shape
    means one compilation per measure instead of one per pair of widths.
    """
    widths = np.array([r.shape[-1] for r in reps.values()])
    out = np.zeros((len(widths),) + next(iter(reps.values())).shape[:2] + (widths.max(),), np.float32)
    for i, r in enumerate(reps.values()):
        out[i, ..., : r.shape[-1]] = r
    return out, widths


SYMMETRIC = frozenset({"svcca", "cka"})  # PWCCA weights one side, so (x, y) and (y, x) can differ


def within_heatmaps(measure: str, reps: Mapping[str, np.ndarray]) -> np.ndarray:
    """(M, L, L) layer-by-layer similarity of each model; reps: name -> (M, n, C) (2-D features).

    PWCCA weights the side with fewer channels (as `cka_jax.pwcca` does without padding);
    symmetric measures are computed once per unordered pair.
    """
    layers, widths = padded_layers(reps)
    num_layers, num_models = layers.shape[:2]
    i, j = (
        np.triu_indices(num_layers)
        if measure in SYMMETRIC
        else (a.ravel() for a in np.indices((num_layers, num_layers)))
    )
    narrow_first = widths[i] <= widths[j]
    first, second = np.where(narrow_first, i, j), np.where(narrow_first, j, i)

    def flat(idx: np.ndarray) -> np.ndarray:  # (pairs·M, n, C), model fastest
        return layers[idx].reshape((-1,) + layers.shape[2:])

    values = similarity(measure, flat(first), flat(second)).reshape(len(i), num_models)
    out = np.empty((num_models, num_layers, num_layers))
    out[:, i, j] = values.T
    if measure in SYMMETRIC:
        out[:, j, i] = values.T
    return out


def seed_pairs(num_models: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, j) of all unordered pairs of distinct models, i < j."""
    return np.triu_indices(num_models, 1)


def same_layer(measure: str, reps_a: Mapping[str, np.ndarray], reps_b: Mapping[str, np.ndarray]) -> np.ndarray:
    """(K, L) similarity of layer l of reps_a[l][k] with reps_b[l][k], name -> (K, n, C) each."""
    a, _ = padded_layers(reps_a)
    b, _ = padded_layers(reps_b)
    num_layers, k = a.shape[:2]
    values = similarity(measure, a.reshape((-1,) + a.shape[2:]), b.reshape((-1,) + b.shape[2:]))
    return values.reshape(num_layers, k).T


def cross_seed_same_layer(measure: str, reps: Mapping[str, np.ndarray]) -> np.ndarray:
    """(pairs, L) similarity of each layer with the same layer of another seed, over `seed_pairs`."""
    i, j = seed_pairs(next(iter(reps.values())).shape[0])
    return same_layer(measure, {n: r[i] for n, r in reps.items()}, {n: r[j] for n, r in reps.items()})


def plot_cca_heatmaps(
    svcca_maps: np.ndarray, pwcca_maps: np.ndarray, layer_names: Sequence[str], title: str, note: str = ""
):
    """SVCCA and PWCCA heatmaps (M, L, L) side by side, each averaged over the seeds whose whole
    heatmap is defined; `note` under the figure."""
    fig = heatmap_grid(
        [mean_of_defined(svcca_maps)[0], mean_of_defined(pwcca_maps)[0]],
        ["SVCCA (mean over defined seeds)", "PWCCA (mean over defined seeds)"],
        layer_names,
        suptitle=title,
        ncols=2,
        panel=4.2,
    )
    add_note(fig, note)
    return fig


def plot_relative_depth(
    curves: Mapping[str, np.ndarray], ylabel: str, title: str, layer_names: Sequence[str] | None = None, note: str = ""
):
    """Mean ± range over the pairs of (pairs, L) curves per label whose every value is defined,
    against relative depth (or the layer names when all curves share `layer_names`); `note`
    under the figure."""
    fig, ax = subplots(figsize=(7, 4))
    for label, values in curves.items():
        x = np.linspace(0, 1, values.shape[1]) if layer_names is None else np.arange(values.shape[1])
        mean, defined = mean_of_defined(values)
        if defined.any():
            ax.fill_between(x, values[defined].min(0), values[defined].max(0), alpha=0.15)
        ax.plot(x, mean, marker="o", lw=2, label=label)
    if layer_names is None:
        ax.set_xlabel("relative depth (stem = 0, last block = 1)")
    else:
        ax.set_xticks(np.arange(len(layer_names)), [short_name(n) for n in layer_names], rotation=90, fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    add_note(fig, note)
    return fig


_DEGENERATE = "CCA is degenerate for these shapes"


def cca_section(ctx: AnalysisContext) -> Section:
    """SVCCA and PWCCA heatmaps within each model, and the same layer across seeds."""
    p, o = ctx.main, ctx.options
    reps = ctx.pooled_blocks(p)
    names = tuple(reps)
    status = LayerStatus.of(reps)
    maps = {m: within_heatmaps(m, reps) for m in ("svcca", "pwcca")}
    note = left_out(defined_rows(maps["svcca"]) & defined_rows(maps["pwcca"]), status_why(status, _DEGENERATE))
    fig = plot_cca_heatmaps(
        maps["svcca"], maps["pwcca"], names, f"{p.name}: SVCCA and PWCCA between block outputs", heatmap_note(note)
    )
    figures = [ctx.save_figure(fig, "cca")]
    arrays = {f"{m}_within": v for m, v in maps.items()}
    tables, notes = [], [note] if note else []
    if p.size >= 2 and o.max_models >= 2:
        curves = {m: cross_seed_same_layer(m, reps) for m in ("svcca", "pwcca", "cka")}
        arrays.update({f"{m}_seeds": v for m, v in curves.items()})
        index = model_pairs(next(iter(reps.values())).shape[0])
        seed_notes = {
            m: left_out(defined_rows(v), pair_why(status, status, _DEGENERATE, index), "seed pair", pair_name(index))
            for m, v in curves.items()
        }
        seed_note = "; ".join(dict.fromkeys(f"across seeds, {n}" for n in seed_notes.values() if n))
        notes += [seed_note] if seed_note else []
        fig = plot_relative_depth(
            curves, "similarity with the same layer, other seed", f"{p.name}: across seeds", names, line_note(seed_note)
        )
        figures.append(ctx.save_figure(fig, "cca_seeds"))
        means = {m: mean_of_defined(v)[0] for m, v in curves.items()}
        rows = [[short_name(n)] + [number(means[m][i], 3, seed_notes[m]) for m in curves] for i, n in enumerate(names)]
        tables.append(
            Table(
                ["layer", "SVCCA", "PWCCA", "linear CKA"],
                rows,
                "Same layer across seeds, mean over pairs" + (f" ({seed_note})" if seed_note else ""),
            )
        )
    write_npz(ctx.path("cca.npz"), layer_names=np.array(names), **arrays)
    n_examples = next(iter(reps.values())).shape[1]
    text = (
        f"SVCCA (top directions explaining 99% of the variance, then CCA; mean canonical correlation) and PWCCA "
        f"(canonical correlations weighted by how much of the representation they account for) between the "
        f"spatially averaged channels of block outputs, on {n_examples} test examples. CCA needs many more "
        "examples than channels; pairs where a side has at least n - 1 channels, or a non-finite or constant "
        f"side, are undefined (NaN). Seeds: the first {min(p.size, o.max_models)} models."
    )
    return Section("cca", "SVCCA and PWCCA", with_note(text, "; ".join(notes)), figures, tables, ["cca.npz"])


def convergence_section(ctx: AnalysisContext) -> Section:
    """Morcos et al. 2018: cross-seed PWCCA per population (memorising vs generalising, narrow vs wide)."""
    o = ctx.options
    curves, rows, arrays, notes = {}, [], {}, []
    for p in ctx.populations:
        reps = ctx.pooled_blocks(p)
        values = cross_seed_same_layer("pwcca", reps)
        curves[f"{p.name}: {p.architecture}"] = values
        arrays[f"pwcca__{p.name}"] = values
        status, index = LayerStatus.of(reps), model_pairs(next(iter(reps.values())).shape[0])
        note = left_out(
            defined_rows(values), pair_why(status, status, _DEGENERATE, index), "seed pair", pair_name(index)
        )
        if note:
            notes.append(f"{p.name}: {note}")
        mean, low, high = bootstrap_mean(values.mean(1), o.num_bootstrap, o.level, o.seed)
        rows.append(
            [
                p.name,
                p.architecture,
                "yes" if p.config.data.random_labels else "no",
                format_interval(mean, low, high, 3, note) + (f" ({note})" if note and is_defined(mean) else ""),
            ]
        )
    write_npz(ctx.path("convergence.npz"), **arrays)
    note = "; ".join(notes)
    fig = plot_relative_depth(curves, "PWCCA between seeds", "Cross-seed PWCCA per population", note=line_note(note))
    text = (
        "PWCCA between the same block outputs of different seeds, per population, against relative depth. "
        "Morcos et al. find that generalising networks converge to more similar solutions than memorising "
        "ones (train one population with data.random_labels=True to compare) and wider networks to more "
        "similar solutions than narrower ones."
    )
    table = Table(
        [
            "population",
            "architecture",
            "random labels",
            f"mean cross-seed PWCCA over layers [{o.level:.0%} CI over pairs]",
        ],
        rows,
    )
    return Section(
        "convergence",
        "Convergence across seeds (PWCCA)",
        with_note(text, note),
        [ctx.save_figure(fig, "convergence")],
        [table],
        ["convergence.npz"],
    )


CCA = Analysis(
    "cca",
    cca_section,
    description="SVCCA and PWCCA heatmaps, within model and across seeds",
    check=check_examples(main_population, "SVCCA and PWCCA"),
)
CONVERGENCE = Analysis(
    "convergence",
    convergence_section,
    needs_compare=True,
    description="cross-seed PWCCA per population: memorising vs generalising, narrow vs wide",
    check=all_checks(
        check_models(all_populations, "cross-seed PWCCA"), check_examples(all_populations, "cross-seed PWCCA")
    ),
)
