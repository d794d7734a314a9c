"""Each analysis end to end: compute (the analysis modules) → numbers and figures on disk → a
report section. One function per analysis, `f(ctx) -> Section`, registered in `runner.ANALYSES`.

Undefined values (see `cka_jax.analysis.undefined`) stay NaN in the .npz files, are null with a
reason in the .json files, read "undefined (reason)" in the tables and are hatched or left out
of the figures with a note; every mean over models says which models it left out and why.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from cka_jax.analysis import across as across_lib
from cka_jax.analysis import blocks as blocks_lib
from cka_jax.analysis import cca_measures as cca_lib
from cka_jax.analysis import deletion as deletion_lib
from cka_jax.analysis import disagreement as dis_lib
from cka_jax.analysis import dynamics as dyn_lib
from cka_jax.analysis import pcs as pcs_lib
from cka_jax.analysis import probes as probes_lib
from cka_jax.analysis import training_curves as curves_lib
from cka_jax.analysis import unit_matching as match_lib
from cka_jax.analysis.bootstrap import bootstrap_mean, format_interval
from cka_jax.analysis.context import AnalysisContext
from cka_jax.analysis.outputs import Section, Table, save_figure, write_json, write_npz
from cka_jax.analysis.plots import UNDEFINED_KEY, short_name
from cka_jax.analysis.representations import collect
from cka_jax.analysis.undefined import (LayerStatus, defined_rows, is_defined, left_out, mean_of_defined, model_list,
                                        number)
from cka_jax.analysis.within import plot_within, summary_rows
from cka_jax.analysis.inputs import Population, checkpoint_steps, class_names, load_population, load_train_set
from cka_jax.matching import MATCHING_METHODS
from cka_jax.models import representation_names


def _figure(ctx: AnalysisContext, fig, stem: str) -> str:
    save_figure(fig, ctx.path(stem))
    return f"{stem}.png"


def _with_note(text: str, note: str) -> str:
    """`text`, then `note` (what is undefined and why) as its own paragraph when there is one."""
    return f"{text}\n\nUndefined values: {note}." if note else text


def _caption(note: str) -> str:
    """A table caption saying which models its means leave out ('' when none)."""
    return f"Undefined values: {note}" if note else ""


def _figure_note(note: str) -> str:
    return f"{UNDEFINED_KEY}; {note}" if note else ""


def _status_why(status: LayerStatus, fallback: str) -> Callable[[int], str]:
    """why(model) for `left_out`: the layers that make a model's values undefined."""
    return lambda m: status.why([m]) or fallback


def _pair_why(status_a: LayerStatus, status_b: LayerStatus, fallback: str, pairs: Sequence[tuple[int, int]],
              label_a: str = "seed", label_b: str = "seed") -> Callable[[int], str]:
    """why(k) for model pair pairs[k] = (i, j), i of status_a and j of status_b."""
    def why(k: int) -> str:
        i, j = pairs[k]
        parts = [r for r in (status_a.why([i], label_a), status_b.why([j], label_b)) if r]
        return "; ".join(dict.fromkeys(parts)) or fallback
    return why


def training(ctx: AnalysisContext) -> Section:
    """How well each population trained: train loss and test accuracy per epoch from metrics.jsonl,
    diverged and under-trained seeds named."""
    curves, rows, records, notes = {}, [], [], []
    for p in ctx.populations:
        num_classes = ctx.test.num_classes
        try:
            c = curves_lib.read_curves(p.workdir, p.size, num_classes, bool(p.config.data.random_labels))
        except (OSError, ValueError) as error:
            notes.append(f"{p.name}: metrics.jsonl cannot be read ({error}); its curves are not shown")
            records.append({"population": p.name, "workdir": p.workdir, "error": str(error)})
            continue
        if c is None:
            notes.append(f"{p.name}: no training metrics (no metrics.jsonl rows in {os.path.abspath(p.workdir)}); "
                         "its curves cannot be shown")
            records.append({"population": p.name, "workdir": p.workdir, "error": "no metrics.jsonl rows"})
            continue
        curves[p.name] = c
        summary = curves_lib.describe(c)
        records.append({"population": p.name, "workdir": p.workdir, **summary,
                        "under_trained_rule": curves_lib.UNDER_TRAINED_RULE})
        notes.append(f"{p.name}: {curves_lib.marked_seeds(c)}")
        test = summary["final_test_accuracy"]
        ok = np.isfinite(test)
        spread = f" (seeds {test[ok].min():.3f} to {test[ok].max():.3f})" if ok.sum() > 1 else ""
        undefined = "no seed reached a finite final value" if not ok.any() else ""
        rows.append([p.name, str(summary["epochs"]), str(p.size),
                     number(summary["final_train_loss_mean"], 4, undefined),
                     number(summary["final_test_accuracy_mean"], 3, undefined or "not evaluated") + spread,
                     model_list(summary["diverged_seeds"]) if summary["diverged_seeds"] else "none",
                     model_list(summary["under_trained_seeds"]) if summary["under_trained_seeds"] else "none"])
    write_json(ctx.path("training.json"), records)
    figures = []
    if curves:
        fig = curves_lib.plot_training(curves, "Training curves (thin: seeds; thick: mean of the seeds that did not "
                                                "diverge)")
        figures.append(_figure(ctx, fig, "training_curves"))
    text = ("How well each population trained, from its metrics.jsonl, before its similarity figures: train loss "
            "and test accuracy per epoch, each seed a thin line (red: diverged, with a cross where it did; "
            "orange: under-trained) and the mean over the seeds that did not diverge a thick one. A seed diverged "
            "when its train loss or accuracy became non-finite; " + curves_lib.UNDER_TRAINED_RULE +
            ". The later sections analyse every seed, so read them knowing which these are.\n\n" + "\n\n".join(notes))
    table = Table(["population", "epochs", "seeds", "final train loss (mean)", "final test accuracy (mean)",
                   "diverged", "under-trained"], rows, "Means over the seeds that did not diverge")
    return Section("training", "Training curves", text, figures, [table] if rows else [], ["training.json"])


def within(ctx: AnalysisContext) -> Section:
    """Fig. 1 / C.1 / D.1: CKA between all layers, block outputs and pre/post-residual layers."""
    heatmaps = ctx.within(ctx.main)
    figures, numbers = [], []
    for capture, stem, what in (("blocks", "cka_within", "block outputs (post-residual) and stem"),
                                ("pre_and_post", "cka_within_pre_and_post", "pre- and post-residual layers"),
                                ("all", "cka_within_all", "all layers")):
        h = heatmaps.select(capture)
        write_npz(ctx.path(f"{stem}.npz"), **h.arrays())
        numbers.append(f"{stem}.npz")
        figures.append(_figure(ctx, plot_within(h, f"{ctx.main.name}: CKA between {what}"), stem))
    blocks = heatmaps.select("blocks")
    table = Table(["model", "mean CKA between block outputs", "CKA(stem, last block)"], summary_rows(blocks),
                  "Per seed, over the block-output heatmap")
    text = (f"Linear CKA (unbiased minibatch estimator, {ctx.options.passes} pass(es) over the test set in "
            f"minibatches of at most {ctx.options.batch_size}) between every pair of layers of each model. "
            "The first panel averages the seeds. A block structure shows as a large bright square of "
            "consecutive layers; pre/post-residual pairs give the checkerboard. "
            "cka_within.npz holds cka (M, L, L) over the stem and every block output, and layer_names (L,); "
            "layer_finite and layer_varying (M, L) say which layers had non-finite or constant activations, "
            "which make their CKA undefined (NaN, hatched in the figures).")
    return Section("within", "Within-model CKA", _with_note(text, heatmaps.mean_note()), figures, [table], numbers)


def _grid_positions(populations: list[Population]) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """Rows by training-data fraction (largest first), columns by architecture."""
    rows = sorted({p.config.data.fraction for p in populations}, reverse=True)
    cols: list[str] = []
    positions: list[tuple[int, int]] = []
    taken: set[tuple[int, str]] = set()
    for p in populations:
        row = rows.index(p.config.data.fraction)
        label = p.architecture if (row, p.architecture) not in taken else f"{p.architecture} ({p.name})"
        taken.add((row, label))
        if label not in cols:
            cols.append(label)
        positions.append((row, cols.index(label)))
    return [f"data fraction {f:g}" for f in rows], cols, positions


SENSITIVITY_THRESHOLDS = (0.7, 0.8, 0.85, 0.9, 0.95)   # block sizes are also reported at these


def _sizes_text(sizes: np.ndarray) -> str:
    """Block sizes per seed as table text, 'undefined' for NaN."""
    return " ".join(str(int(v)) if np.isfinite(v) else "undefined" for v in sizes)


def _population_blocks(ctx: AnalysisContext, p: Population, thresholds: Sequence[float]) -> dict:
    """Block sizes of `p` at every threshold, their means over the seeds whose heatmap is defined,
    the bootstrap interval at the chosen threshold and the block of the mean heatmap."""
    o = ctx.options
    h = ctx.within(p).select("blocks")
    num_layers = len(h.layer_names)
    sizes_at = {t: blocks_lib.block_sizes(h.cka, t, o.block_min_layers) for t in thresholds}
    sizes = sizes_at[o.block_threshold]
    by_threshold = {t: float(mean_of_defined(s[:, 2])[0]) / num_layers for t, s in sizes_at.items()}
    mean, low, high = bootstrap_mean(sizes[:, 2] / num_layers, o.num_bootstrap, o.level, o.seed)
    return {"heatmaps": h, "sizes": sizes, "by_threshold": by_threshold, "interval": (mean, low, high),
            "note": left_out(np.isfinite(sizes[:, 2]), h.why),
            "mean_block": blocks_lib.detect_block(h.mean(), o.block_threshold, o.block_min_layers)}


def blocks(ctx: AnalysisContext) -> Section:
    """Fig. 2 / D.2: the block structure's size per model, and a grid over all populations."""
    o = ctx.options
    records, grid_maps, grid_names, grid_blocks, table_rows, sensitivity_rows, notes = [], [], [], [], [], [], []
    thresholds = sorted({*SENSITIVITY_THRESHOLDS, o.block_threshold})
    for i, p in enumerate(ctx.populations):
        r = _population_blocks(ctx, p, thresholds)
        h, sizes, mean_block, note = r["heatmaps"], r["sizes"], r["mean_block"], r["note"]
        mean, low, high = r["interval"]
        reason = note or "undefined heatmaps"
        undefined = np.flatnonzero(~np.isfinite(sizes[:, 2])).tolist()
        sensitivity_rows.append([p.name] + [number(r["by_threshold"][t], 2, "every seed undefined")
                                            for t in thresholds])
        records.append({"population": p.name, "workdir": p.workdir, "architecture": p.architecture,
                        "data_fraction": p.config.data.fraction, "num_layers": len(h.layer_names),
                        "block_per_model": sizes, "undefined_models": undefined,
                        "undefined_reason": {str(m): h.why(m) for m in undefined},
                        "block_fraction_mean": mean, "block_fraction_interval": [low, high], "level": o.level,
                        "block_fraction_note": note,
                        "block_of_mean_heatmap": ([mean_block.start, mean_block.stop] if mean_block.defined
                                                  else None),
                        "blocks_inside": blocks_lib.blocks_in_structure(h.layer_names, mean_block),
                        "block_fraction_by_threshold": {f"{t:g}": f for t, f in r["by_threshold"].items()}})
        if i == 0:
            write_npz(ctx.path("blocks.npz"), block=sizes, layer_names=np.array(h.layer_names),
                      threshold=o.block_threshold)
        grid_maps.append(h.mean())
        grid_names.append(h.layer_names)
        grid_blocks.append(mean_block)
        if note:
            notes.append(f"{p.name}: {note}")
        interval = format_interval(mean, low, high, 2, reason)
        table_rows.append([p.name, p.architecture, f"{p.config.data.fraction:g}", _sizes_text(sizes[:, 2]),
                           str(len(h.layer_names)), interval + (f" ({note})" if note and is_defined(mean) else "")])
    write_json(ctx.path("blocks.json"), records)
    row_labels, col_labels, positions = _grid_positions(ctx.populations)
    fig = blocks_lib.plot_block_grid(grid_maps, grid_names, grid_blocks, row_labels, col_labels, positions,
                                     "Block structure (seed-averaged block-output CKA; detected block outlined)",
                                     _figure_note("; ".join(notes)))
    table = Table(["population", "architecture", "data fraction", "block size per seed (layers)", "layers",
                   f"block fraction, mean [{o.level:.0%} CI over seeds]"], table_rows)
    sensitivity = Table(["population"] + [f"CKA ≥ {t:g}" for t in thresholds], sensitivity_rows,
                        "Mean block fraction over seeds as the threshold (--block_threshold) varies: how much the "
                        "sizes above depend on it" + (f" ({'; '.join(notes)})" if notes else ""))
    text = (f"The block structure is the longest run of consecutive block outputs whose pairwise CKA all reach "
            f"{o.block_threshold} (at least {o.block_min_layers} layers), found per seed on the block-output "
            "heatmap. A heatmap with any undefined cell has an undefined block (it could complete or break any "
            "block): its size is 'undefined', never 0. Pass sweeps (width, depth, data fraction) with --compare "
            "to fill the grid: rows are training-data fractions, columns architectures. Intervals are percentile "
            "bootstraps over seeds.")
    return Section("blocks", "Block structure", _with_note(text, "; ".join(notes)), [_figure(ctx, fig, "blocks_grid")],
                   [table, sensitivity], ["blocks.npz", "blocks.json"])


def _main_block(ctx: AnalysisContext, population: Population) -> tuple[blocks_lib.BlockStructure, tuple[str, ...]]:
    """The block structure of the seed-averaged block-output heatmap, and the block-output names."""
    h = ctx.within(population).select("blocks")
    o = ctx.options
    return blocks_lib.detect_block(h.mean(), o.block_threshold, o.block_min_layers), h.layer_names


def _block_note(block: blocks_lib.BlockStructure) -> str:
    """What an undefined block structure means for the layers marked as inside it."""
    if block.defined:
        return ""
    return ("the block structure is undefined (no seed's block-output heatmap is wholly defined: see Within-model "
            "CKA), so no layer is marked as inside or outside it")


def _inside(layer_names: Sequence[str], blocks_inside: Sequence[str]) -> list[bool]:
    """Per layer: does it belong to a residual block inside the block structure."""
    return [any(n.startswith(b + "/") for b in blocks_inside) for n in layer_names]


def _test_subset(ctx: AnalysisContext) -> np.ndarray:
    """The first max_examples test images (uint8)."""
    return ctx.test.images[:ctx.options.max_examples]


def principal_components(ctx: AnalysisContext) -> Section:
    """Fig. 3 / D.5: first-PC variance fraction, first-PC cosine similarity, CKA without the first PC."""
    p = ctx.main
    block, block_layers = _main_block(ctx, p)
    reps = collect(p, _test_subset(ctx), ctx.test, "blocks", progress=ctx.progress)
    status = LayerStatus.of(reps)
    pcs = pcs_lib.principal_components(reps)
    write_npz(ctx.path("pcs.npz"), variance_fraction=pcs.variance_fraction, cosine=pcs.cosine, cka=pcs.cka,
              cka_without_first_pc=pcs.cka_without_pc, layer_names=np.array(pcs.layer_names))
    mean, defined = mean_of_defined(pcs.variance_fraction)
    why = _status_why(status, "no first principal component")
    note = "; ".join(n for n in (left_out(defined, why), _block_note(block)) if n)
    fig = pcs_lib.plot_principal_components(pcs, f"{p.name}: first principal component of block outputs",
                                            _figure_note(note))
    inside = _inside(pcs.layer_names, blocks_lib.blocks_in_structure(block_layers, block))
    split = pcs_lib.summary(pcs, inside) if block.defined else {"inside": np.nan, "outside": np.nan}
    split_reason = "block structure undefined" if not block.defined else "no such layer, or every seed undefined"
    reason = left_out(defined, why)
    rows = [[short_name(n), number(v, 3, reason)] for n, v in zip(pcs.layer_names, mean)]
    text = (f"On the first {len(next(iter(reps.values()))[0])} test examples: the fraction of each block output's "
            "variance along its first principal component, the |cosine| between first-PC scores of layer pairs "
            "(example space, so layers of different widths compare), and CKA before and after removing each "
            "layer's first PC. In the paper, layers inside the block structure have a dominant first PC that "
            "they share, and removing it removes the block. Mean variance fraction inside the detected block "
            f"structure: {number(split['inside'], 3, split_reason)}; outside: "
            f"{number(split['outside'], 3, split_reason)}. A non-finite or constant layer has no first PC: "
            "its values are undefined.")
    return Section("pcs", "Principal components", _with_note(text, note), [_figure(ctx, fig, "pcs")],
                   [Table(["layer", "first-PC variance fraction (mean over seeds)"], rows, _caption(reason))],
                   ["pcs.npz"])


def probes(ctx: AnalysisContext) -> Section:
    """Fig. 4: linear probe accuracy per layer, pre and post residual."""
    p, o = ctx.main, ctx.options
    train_images, train_labels = load_train_set(p.config)
    pick = np.sort(np.random.default_rng(o.seed).permutation(len(train_labels))[:o.probe_examples])
    train = collect(p, train_images[pick], ctx.test, "pre_and_post", pool=True, progress=ctx.progress)
    test = collect(p, ctx.test.images, ctx.test, "pre_and_post", pool=True, progress=ctx.progress)
    names = tuple(train)
    acc = np.stack([probes_lib.probe_accuracy(train[n], train_labels[pick], test[n], ctx.test.labels,
                                              ctx.test.num_classes, o.probe_steps)
                    for n in ctx.progress(names, desc="linear probes", leave=False)], axis=1)
    write_npz(ctx.path("probes.npz"), accuracy=acc, layer_names=np.array(names))
    block, block_layers = _main_block(ctx, p)
    inside = _inside(names, blocks_lib.blocks_in_structure(block_layers, block))
    finite = LayerStatus.of(train).finite & LayerStatus.of(test).finite
    note = left_out(defined_rows(acc), lambda m: f"non-finite features in seed {m}" if not finite[m].all()
                    else "the probe's accuracy is not finite")
    notes = "; ".join(n for n in (note, _block_note(block)) if n)
    fig = probes_lib.plot_probes(acc, names, f"{p.name}: linear probes on frozen features", inside, _with_key(notes))
    mean, low, high = bootstrap_mean(acc, o.num_bootstrap, o.level, o.seed)
    rows = [[short_name(n), format_interval(m, lo, hi, 3, note)] for n, m, lo, hi in zip(names, mean, low, high)]
    text = (f"Softmax regression (Adam, {o.probe_steps} full-batch steps, L2 1e-4) on each layer's spatially "
            f"averaged features of {len(pick)} training examples, scored on the {len(ctx.test.labels)} test "
            "examples. Shaded: layers of residual blocks inside the detected block structure. In the paper, "
            "probe accuracy plateaus inside the block structure. A model with non-finite features has an "
            "undefined probe accuracy (not a chance-level one).")
    table = Table(["layer", f"probe accuracy, mean [{o.level:.0%} CI over seeds]"], rows, _caption(note))
    return Section("probes", "Linear probes", _with_note(text, notes), [_figure(ctx, fig, "probes")], [table],
                   ["probes.npz"])


def _with_key(note: str) -> str:
    """A note for a line figure: undefined values are left out of it."""
    return f"Undefined values are not drawn; {note}" if note else ""


def deletion(ctx: AnalysisContext) -> Section:
    """Fig. 5: test accuracy after deleting each residual block."""
    p, o = ctx.main, ctx.options
    names = p.model.block_names()
    acc = deletion_lib.deletion_accuracy(p, ctx.test, [(), *[(b,) for b in names]], ctx.progress)
    full, deleted = acc[:, 0], acc[:, 1:]
    block, block_layers = _main_block(ctx, p)
    inside_blocks = blocks_lib.blocks_in_structure(block_layers, block)
    inside = [b in inside_blocks for b in names]
    write_npz(ctx.path("deletion.npz"), full_accuracy=full, accuracy=deleted, block_names=np.array(names),
              inside_block_structure=np.array(inside), block_structure_defined=block.defined)
    note = left_out(defined_rows(acc), lambda m: "non-finite logits" + ("" if np.isfinite(full[m]) else
                                                                          " of the whole network"))
    notes = "; ".join(n for n in (note, _block_note(block)) if n)
    fig = deletion_lib.plot_deletion(full, deleted, names, f"{p.name}: accuracy with one block deleted", inside,
                                     _with_key(notes))
    drop = full[:, None] - deleted
    mean, low, high = bootstrap_mean(drop, o.num_bootstrap, o.level, o.seed)
    inside_text = (lambda flag: "yes" if flag else "no") if block.defined else (lambda flag: "undefined")
    rows = [[b, inside_text(flag), format_interval(m, lo, hi, 3, note)]
            for b, flag, m, lo, hi in zip(names, inside, mean, low, high)]
    fm, fl, fh = bootstrap_mean(full, o.num_bootstrap, o.level, o.seed)
    text = (f"Each residual block's branch is removed in turn (its shortcut kept) and the whole test set "
            f"re-scored. Full-network accuracy: {format_interval(fm, fl, fh, 3, note)} (mean [{o.level:.0%} CI "
            "over seeds]). Shaded: blocks inside the detected block structure, where the paper finds deletion "
            "costs little. A network with non-finite logits has an undefined accuracy.")
    table = Table(["deleted block", "inside block structure", "accuracy drop, mean [CI]"], rows, _caption(note))
    return Section("deletion", "Block deletion", _with_note(text, notes), [_figure(ctx, fig, "deletion")], [table],
                   ["deletion.npz"])


def _seed_pairs(num_models: int) -> list[tuple[int, int]]:
    i, j = np.triu_indices(num_models, 1)
    return list(zip(i.tolist(), j.tolist()))


def _pair_name(pairs: Sequence[tuple[int, int]], label_a: str = "seeds", label_b: str = "") -> Callable[[int], str]:
    """name(k) of model pair k: 'seeds 0–1', or 'narrow seed 0 / wide seed 1' with label_b."""
    if label_b:
        return lambda k: f"{label_a} {pairs[k][0]} / {label_b} {pairs[k][1]}"
    return lambda k: f"{label_a} {pairs[k][0]}–{pairs[k][1]}"


def seeds(ctx: AnalysisContext) -> Section:
    """Fig. 6: CKA between layers of different seeds of the same architecture."""
    p, o = ctx.main, ctx.options
    sub = p.subset(slice(0, o.max_models))
    pairs = across_lib.cross_cka(sub, None, ctx.test, "blocks", o.batch_size, o.passes, o.seed, ctx.progress)
    names = representation_names(p.model, "blocks")
    write_npz(ctx.path("cka_seeds.npz"), cka=pairs, layer_names=np.array(names))
    index = _seed_pairs(sub.size)
    same = across_lib.same_layer_across_seeds(pairs)
    note = ""
    if not np.isfinite(pairs).all():
        status = ctx.status(p)   # only when needed: it runs the within-model CKA
        note = left_out(defined_rows(np.stack([pairs[i, j] for i, j in index])),
                        _pair_why(status, status, "the CKA estimate is not finite", index), "seed pair",
                        _pair_name(index))
    figures = [_figure(ctx, across_lib.plot_seeds(pairs, names, f"{p.name}: CKA across seeds", _figure_note(note)),
                       "cka_seeds"),
               _figure(ctx, across_lib.plot_same_layer(pairs, names, f"{p.name}: same layer, different seeds",
                                                       _with_key(note)), "cka_seeds_same_layer")]
    mean, low, high = bootstrap_mean(same, o.num_bootstrap, o.level, o.seed)
    rows = [[short_name(n), format_interval(m, lo, hi, 3, note)] for n, m, lo, hi in zip(names, mean, low, high)]
    text = (f"Population-mode minibatch CKA between the block outputs of every pair of the first {sub.size} "
            "seeds. In the paper, layers outside a block structure match the same layer of other seeds closely, "
            "while block-structure representations differ across seeds.")
    table = Table(["layer", f"CKA with the same layer of another seed, mean [{o.level:.0%} CI over pairs]"], rows,
                  _caption(note))
    return Section("seeds", "CKA across seeds", _with_note(text, note), figures, [table], ["cka_seeds.npz"])


def architectures(ctx: AnalysisContext) -> Section:
    """Fig. E.1: CKA between the layers of different architectures (seed pairs averaged)."""
    a, o = ctx.main, ctx.options
    heatmaps, names_b, labels_b, arrays, notes = [], [], [], {}, []
    sub_a = a.subset(slice(0, o.max_models))
    for b in ctx.populations[1:]:
        sub_b = b.subset(slice(0, o.max_models))
        pairs = across_lib.cross_cka(sub_a, sub_b, ctx.test, "blocks", o.batch_size, o.passes, o.seed, ctx.progress)
        flat = pairs.reshape((-1,) + pairs.shape[2:])
        mean, defined = mean_of_defined(flat)
        heatmaps.append(mean)
        if not defined.all():
            index = [(i, j) for i in range(sub_a.size) for j in range(sub_b.size)]
            why = _pair_why(ctx.status(a), ctx.status(b), "the CKA estimate is not finite", index, f"{a.name} seed",
                            f"{b.name} seed")
            notes.append(f"{a.name} vs {b.name}: " + left_out(defined, why, "model pair",
                                                             _pair_name(index, f"{a.name} seed", f"{b.name} seed")))
        names_b.append(representation_names(b.model, "blocks"))
        labels_b.append(b.name)
        arrays[f"cka__{b.name}"] = pairs
        arrays[f"layer_names__{b.name}"] = np.array(names_b[-1])
    names_a = representation_names(a.model, "blocks")
    write_npz(ctx.path("cka_architectures.npz"), layer_names=np.array(names_a), **arrays)
    note = "; ".join(notes)
    fig = across_lib.plot_architectures(heatmaps, names_a, names_b, a.name, labels_b, _figure_note(note))
    text = ("Population-mode minibatch CKA between the block outputs of every model of the main population "
            f"(rows) and every model of each compared one (columns), first {o.max_models} seeds each, averaged "
            "over the model pairs whose heatmap is wholly defined. cka__<name> in the .npz holds all pairs "
            "(Ma, Mb, La, Lb). In the paper, layers at the same relative depth match when neither network has a "
            "block structure.")
    return Section("architectures", "CKA across architectures", _with_note(text, note),
                   [_figure(ctx, fig, "cka_architectures")], [], ["cka_architectures.npz"])


def _correlation_text(value: float) -> str:
    return number(value, 3, "a group's per-example accuracy is constant")


def disagreement(ctx: AnalysisContext) -> Section:
    """Fig. 7 / F.1-F.4: per-example accuracy scatter and per-class Welch tests."""
    o, a = ctx.options, ctx.main
    correct_a, labels = ctx.correct(a), ctx.test.labels
    classes = class_names(a.config, ctx.test.num_classes)
    empty = [c for c in range(ctx.test.num_classes) if not np.any(labels == c)]
    figures, tables, records = [], [], []
    for b in ctx.populations[1:]:
        correct_b = ctx.correct(b)
        k, panels = dis_lib.per_example_panels(correct_a, correct_b, o.seed)
        names = {"A": a.name, "B": b.name}
        label = lambda group: f"{names[group[0]]} group {group[1]} ({k} models)"
        pairs = [(x, y, label(gx), label(gy)) for x, y, gx, gy in panels]
        correlations = {f"{gx} vs {gy}": dis_lib.correlation(x, y) for x, y, gx, gy in panels}
        acc_a = dis_lib.per_class_accuracy(correct_a, labels, ctx.test.num_classes)
        acc_b = dis_lib.per_class_accuracy(correct_b, labels, ctx.test.num_classes)
        tests = dis_lib.per_class_tests(acc_a, acc_b, o.alpha, o.fdr)
        overall = dis_lib.overall_test(correct_a.mean(1), correct_b.mean(1))
        write_npz(ctx.path(f"disagreement__{b.name}.npz"), per_example_a=dis_lib.per_example_accuracy(correct_a),
                  per_example_b=dis_lib.per_example_accuracy(correct_b),
                  class_accuracy_a=acc_a, class_accuracy_b=acc_b, difference=tests.difference, t=tests.t,
                  p_value=tests.p_value, p_adjusted=tests.p_adjusted, significant=tests.significant)
        fig = dis_lib.plot_disagreement(pairs, tests, classes, f"{a.name} (A) vs {b.name} (B)")
        figures.append(_figure(ctx, fig, f"disagreement__{b.name}"))
        differing = [int(c) for c in np.flatnonzero(tests.significant)]
        untested = [int(c) for c in np.flatnonzero(~np.isfinite(tests.p_value))]
        records.append({"population_b": b.name, "classes_differing": differing,
                        "class_names_differing": [classes[c] for c in differing],
                        "num_classes_differing": len(differing), "alpha": o.alpha, "fdr": o.fdr,
                        "classes_untested": untested,
                        "classes_untested_reason": "no test examples, or accuracy constant over the models of both "
                                                   "populations: the t-test is undefined",
                        "classes_without_test_examples": empty,
                        "overall": overall._asdict(), "models_per_group": k,
                        "per_example_correlation": correlations,
                        "per_example_correlation_undefined_reason": {
                            key: "a group's per-example accuracy is constant"
                            for key, r in correlations.items() if not is_defined(r)}})
        rows = [[classes[c], number(tests.difference[c], 4, sign=True), f"{tests.p_value[c]:.3g}",
                 f"{tests.p_adjusted[c]:.3g}"] for c in sorted(differing, key=lambda c: -tests.difference[c])]
        correction = "Benjamini-Hochberg adjusted " if o.fdr else ""
        t_text = (f"t({overall.dof:.1f}) = {overall.t:.2f}, p = {overall.p_value:.3g}" if is_defined(overall.t) else
                  "t-test undefined (each population's accuracy is the same for all its models)")
        untested_text = (f"; {len(untested)} classes untested (t-test undefined: no test examples or constant "
                         "accuracy)" if untested else "")
        tables.append(Table(["class", "accuracy A − B", "p", "adjusted p"], rows,
                            f"{a.name} vs {b.name}: {len(differing)} of {len(classes)} classes differ "
                            f"({correction}Welch p < {o.alpha}){untested_text}; overall accuracy "
                            f"{overall.mean_a:.4f} ± {number(overall.sem_a, 4, 'one model')} vs {overall.mean_b:.4f} "
                            f"± {number(overall.sem_b, 4, 'one model')} (± SEM), {t_text}; per-example correlation "
                            + ", ".join(f"{key}: {_correlation_text(r)}" for key, r in correlations.items())))
    write_json(ctx.path("disagreement.json"), records)
    text = ("Per-example accuracy = the fraction of a group of models that get an example right. The first "
            "panel compares a group of each population (A1, B1); the next ones compare two disjoint groups of the "
            "same population, the baseline. Every group holds half the smaller population's models, so the "
            "scatters are comparable: systematic differences between architectures show as more scatter (a "
            "lower A1 vs B1 correlation, per_example_correlation in disagreement.json) than the baselines "
            "(jitter added to show overlapping points). Per-class accuracies are compared over all models with "
            "Welch's t-test (--fdr adds the Benjamini-Hochberg correction); a class whose test is undefined "
            "(no test examples, or the same accuracy for every model of both) is never counted as differing.")
    if empty:
        text += f"\n\nClasses without test examples (their accuracy is undefined): {', '.join(classes[c] for c in empty)}."
    return Section("disagreement", "Per-example and per-class disagreement", text, figures, tables,
                   ["disagreement.json"] + [f"disagreement__{b.name}.npz" for b in ctx.populations[1:]])


def _two_seeds(ctx: AnalysisContext) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], LayerStatus]:
    """Pooled block outputs of seeds 0 and 1 of the main population: name -> (n, C) each, and
    their status (models 0 and 1)."""
    reps = ctx.pooled_blocks(ctx.main)
    status = LayerStatus.of({n: r[:2] for n, r in reps.items()})
    return {n: r[0] for n, r in reps.items()}, {n: r[1] for n, r in reps.items()}, status


def cca(ctx: AnalysisContext) -> Section:
    """SVCCA and PWCCA heatmaps within each model, and the same layer across seeds."""
    p, o = ctx.main, ctx.options
    reps = ctx.pooled_blocks(p)
    names = tuple(reps)
    status = LayerStatus.of(reps)
    maps = {m: cca_lib.within_heatmaps(m, reps) for m in ("svcca", "pwcca")}
    fallback = "CCA is degenerate for these shapes"
    note = left_out(defined_rows(maps["svcca"]) & defined_rows(maps["pwcca"]), _status_why(status, fallback))
    figures = [_figure(ctx, cca_lib.plot_cca_heatmaps(maps["svcca"], maps["pwcca"], names,
                                                      f"{p.name}: SVCCA and PWCCA between block outputs",
                                                      _figure_note(note)), "cca")]
    arrays = {f"{m}_within": v for m, v in maps.items()}
    tables, notes = [], [note] if note else []
    if p.size >= 2 and o.max_models >= 2:
        curves = {m: cca_lib.cross_seed_same_layer(m, reps) for m in ("svcca", "pwcca", "cka")}
        arrays.update({f"{m}_seeds": v for m, v in curves.items()})
        index = _seed_pairs(next(iter(reps.values())).shape[0])
        seed_notes = {m: left_out(defined_rows(v), _pair_why(status, status, fallback, index), "seed pair",
                                  _pair_name(index)) for m, v in curves.items()}
        seed_note = "; ".join(dict.fromkeys(f"across seeds, {n}" for n in seed_notes.values() if n))
        notes += [seed_note] if seed_note else []
        figures.append(_figure(ctx, cca_lib.plot_relative_depth(
            curves, "similarity with the same layer, other seed", f"{p.name}: across seeds", names,
            _with_key(seed_note)), "cca_seeds"))
        means = {m: mean_of_defined(v)[0] for m, v in curves.items()}
        rows = [[short_name(n)] + [number(means[m][i], 3, seed_notes[m]) for m in curves] for i, n in enumerate(names)]
        tables.append(Table(["layer", "SVCCA", "PWCCA", "linear CKA"], rows,
                            "Same layer across seeds, mean over pairs" + (f" ({seed_note})" if seed_note else "")))
    write_npz(ctx.path("cca.npz"), layer_names=np.array(names), **arrays)
    n_examples = next(iter(reps.values())).shape[1]
    text = (f"SVCCA (top directions explaining 99% of the variance, then CCA; mean canonical correlation) and PWCCA "
            f"(canonical correlations weighted by how much of the representation they account for) between the "
            f"spatially averaged channels of block outputs, on {n_examples} test examples. CCA needs many more "
            "examples than channels; pairs where a side has at least n - 1 channels, or a non-finite or constant "
            f"side, are undefined (NaN). Seeds: the first {min(p.size, o.max_models)} models.")
    return Section("cca", "SVCCA and PWCCA", _with_note(text, "; ".join(notes)), figures, tables, ["cca.npz"])


def _layer_reasons(status: LayerStatus) -> list[str]:
    """Per layer: why seeds 0 and 1 cannot be compared there ('' when they can)."""
    return [status.why([0, 1], layers=[i]) for i in range(len(status.layer_names))]


def matching(ctx: AnalysisContext) -> Section:
    """Li et al. 2016: bipartite and semi-matching of units across two seeds, per layer."""
    a, b, status = _two_seeds(ctx)
    curves = match_lib.matching_curves(a, b)
    write_npz(ctx.path("matching.npz"), layer_names=np.array(list(curves)),
              **{f"{m}_correlations": match_lib.padded(curves, m) for m in MATCHING_METHODS})
    reasons = _layer_reasons(status)
    undefined = [f"{short_name(n)} ({r or 'no unit pair has a defined correlation'})"
                 for (n, c), r in zip(curves.items(), reasons)
                 if not len(c[MATCHING_METHODS[0]])]
    note = f"undefined layers (nothing to match): {', '.join(undefined)}" if undefined else ""
    fig = match_lib.plot_matching(curves, f"{ctx.main.name}: matched unit correlations, seed 0 vs seed 1",
                                  _with_key(note))
    rows = [[short_name(n)] + [number(match_lib.mean_matched(c[m]), 3, r or "no unit pair has a defined correlation")
                               for m in MATCHING_METHODS] for (n, c), r in zip(curves.items(), reasons)]
    text = ("Units (spatially averaged channels) of each block output of seed 0 matched to those of seed 1 by "
            "Pearson correlation over test examples: one-to-one (bipartite, Hungarian algorithm) and semi-matching "
            "(each unit to its best partner). Curves sort the matched correlations; high curves mean units recur "
            "one for one across seeds. A layer that is non-finite or constant in either seed is undefined.")
    table = Table(["layer"] + [f"mean {m} matched correlation" for m in MATCHING_METHODS], rows)
    return Section("matching", "Unit matching across seeds", _with_note(text, note), [_figure(ctx, fig, "matching")],
                   [table], ["matching.npz"])


def sparse(ctx: AnalysisContext) -> Section:
    """Li et al. 2016: L1-penalised prediction of one seed's units from another's (local vs distributed)."""
    a, b, status = _two_seeds(ctx)
    penalties = match_lib.DEFAULT_L1_PENALTIES
    losses = match_lib.sparse_losses(a, b, penalties, ctx.options.seed)
    names = list(a)
    write_npz(ctx.path("sparse.npz"), loss=losses, l1_penalties=np.array(penalties), layer_names=np.array(names))
    reasons = [r or "every unit of seed 1 is constant" for r in _layer_reasons(status)]
    undefined = [f"{short_name(n)} ({r})" for n, row, r in zip(names, losses, reasons) if not np.isfinite(row).all()]
    note = f"undefined layers: {', '.join(undefined)}" if undefined else ""
    fig = match_lib.plot_sparse(losses, penalties, names, f"{ctx.main.name}: sparse prediction of seed 1 from seed 0",
                                _with_key(note))
    rows = [[short_name(n)] + [number(v, 3, r) for v in row] for n, row, r in zip(names, losses, reasons)]
    text = ("Each standardised unit of seed 1 is predicted from all units of the same layer of seed 0 by Lasso "
            "regression; the loss is measured on a held-out quarter of the examples (1 = predicting the mean). A "
            "loss that stays low as the penalty grows means a few units suffice (local code); a loss that rises "
            "means the code is distributed. A layer that is non-finite or constant in either seed is undefined.")
    table = Table(["layer"] + [f"α = {a:g}" for a in penalties], rows, "Held-out loss per L1 penalty")
    return Section("sparse", "Sparse prediction across seeds", _with_note(text, note), [_figure(ctx, fig, "sparse")],
                   [table], ["sparse.npz"])


def dynamics(ctx: AnalysisContext) -> Section:
    """Raghu et al. 2017: each layer at kept checkpoints vs the final network (SVCCA and CKA)."""
    p = ctx.main
    steps = [s for s in checkpoint_steps(p.workdir) if s < p.step]
    final = ctx.pooled_blocks(p)
    final_status = LayerStatus.of(final)
    measures = ("svcca", "cka")
    values = {m: [] for m in measures}
    notes = []
    for step in ctx.progress(steps, desc="checkpoints", leave=False):
        reps = ctx.pooled_blocks(load_population(p.workdir, step, p.name))
        status = LayerStatus.of(reps)
        for m in measures:
            values[m].append(dyn_lib.similarity_to_final(m, reps, final))
        why = lambda k, status=status: "; ".join(
            r for r in (status.why([k]), final_status.why([k])) if r) or "CCA is degenerate for these shapes"
        note = left_out(defined_rows(values["svcca"][-1]) & defined_rows(values["cka"][-1]), why)
        notes.append(f"step {step}: {note}" if note else "")
    values = {m: np.stack(v) for m, v in values.items()}
    fractions = [s / p.step for s in steps]
    names = list(final)
    write_npz(ctx.path("dynamics.npz"), steps=np.array(steps), final_step=p.step, layer_names=np.array(names),
              **values)
    note = "; ".join(n for n in notes if n)
    fig = dyn_lib.plot_dynamics(values, fractions, names, f"{p.name}: layers during training vs the final network",
                                _with_key(note))
    rows = [[f"{s} ({f:.0%})"] + [number(v, 2, "every seed undefined") for v in mean_of_defined(values["svcca"][i])[0]]
            for i, (s, f) in enumerate(zip(steps, fractions))]
    text = ("Each kept checkpoint's block outputs (spatially averaged, same test examples) against the same layer "
            "of the same seed at the end of training. Raghu et al. find networks converge bottom-up: early layers "
            "reach their final representation first.")
    table = Table(["step"] + [short_name(n) for n in names], rows,
                  "SVCCA with the final network, mean over the seeds whose every layer is defined"
                  + (f" ({note})" if note else ""))
    return Section("dynamics", "Learning dynamics", _with_note(text, note), [_figure(ctx, fig, "dynamics")], [table],
                   ["dynamics.npz"])


def convergence(ctx: AnalysisContext) -> Section:
    """Morcos et al. 2018: cross-seed PWCCA per population (memorising vs generalising, narrow vs wide)."""
    o = ctx.options
    curves, rows, arrays, notes = {}, [], {}, []
    for p in ctx.populations:
        reps = ctx.pooled_blocks(p)
        values = cca_lib.cross_seed_same_layer("pwcca", reps)
        label = f"{p.name}: {p.architecture}"
        curves[label] = values
        arrays[f"pwcca__{p.name}"] = values
        status, index = LayerStatus.of(reps), _seed_pairs(next(iter(reps.values())).shape[0])
        note = left_out(defined_rows(values), _pair_why(status, status, "CCA is degenerate for these shapes", index),
                        "seed pair", _pair_name(index))
        if note:
            notes.append(f"{p.name}: {note}")
        mean, low, high = bootstrap_mean(values.mean(1), o.num_bootstrap, o.level, o.seed)
        rows.append([p.name, p.architecture, "yes" if p.config.data.random_labels else "no",
                     format_interval(mean, low, high, 3, note) + (f" ({note})" if note and is_defined(mean) else "")])
    write_npz(ctx.path("convergence.npz"), **arrays)
    note = "; ".join(notes)
    fig = cca_lib.plot_relative_depth(curves, "PWCCA between seeds", "Cross-seed PWCCA per population",
                                      note=_with_key(note))
    text = ("PWCCA between the same block outputs of different seeds, per population, against relative depth. "
            "Morcos et al. find that generalising networks converge to more similar solutions than memorising "
            "ones (train one population with data.random_labels=True to compare) and wider networks to more "
            "similar solutions than narrower ones.")
    table = Table(["population", "architecture", "random labels",
                   f"mean cross-seed PWCCA over layers [{o.level:.0%} CI over pairs]"], rows)
    return Section("convergence", "Convergence across seeds (PWCCA)", _with_note(text, note),
                   [_figure(ctx, fig, "convergence")], [table], ["convergence.npz"])
