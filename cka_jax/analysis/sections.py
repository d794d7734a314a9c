"""Each analysis end to end: compute (the analysis modules) → numbers and figures on disk → a
report section. One function per analysis, `f(ctx) -> Section`, registered in `runner.ANALYSES`."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cka_jax.analysis import across as across_lib
from cka_jax.analysis import blocks as blocks_lib
from cka_jax.analysis import cca_measures as cca_lib
from cka_jax.analysis import deletion as deletion_lib
from cka_jax.analysis import disagreement as dis_lib
from cka_jax.analysis import dynamics as dyn_lib
from cka_jax.analysis import pcs as pcs_lib
from cka_jax.analysis import probes as probes_lib
from cka_jax.analysis import unit_matching as match_lib
from cka_jax.analysis.bootstrap import bootstrap_mean, format_interval
from cka_jax.analysis.context import AnalysisContext
from cka_jax.analysis.outputs import Section, Table, save_figure, write_json, write_npz
from cka_jax.analysis.plots import short_name
from cka_jax.analysis.representations import collect
from cka_jax.analysis.within import plot_within, summary_rows
from cka_jax.analysis.workdir import (AnalysisInputError, Population, check_same_labels, checkpoint_steps,
                                      class_names, load_correct, load_population, load_train_set)
from cka_jax.matching import MATCHING_METHODS
from cka_jax.models import representation_names


def _figure(ctx: AnalysisContext, fig, stem: str) -> str:
    save_figure(fig, ctx.path(stem))
    return f"{stem}.png"


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
            "cka_within.npz holds cka (M, L, L) over the stem and every block output, and layer_names (L,).")
    return Section("within", "Within-model CKA", text, figures, [table], numbers)


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


def blocks(ctx: AnalysisContext) -> Section:
    """Fig. 2 / D.2: the block structure's size per model, and a grid over all populations."""
    o = ctx.options
    records, grid_maps, grid_names, grid_blocks, table_rows, sensitivity_rows = [], [], [], [], [], []
    thresholds = sorted({*SENSITIVITY_THRESHOLDS, o.block_threshold})
    for i, p in enumerate(ctx.populations):
        h = ctx.within(p).select("blocks")
        sizes_at = {t: blocks_lib.block_sizes(h.cka, t, o.block_min_layers) for t in thresholds}
        sizes = sizes_at[o.block_threshold]
        fraction = sizes[:, 2] / len(h.layer_names)
        by_threshold = {t: float(np.mean(s[:, 2])) / len(h.layer_names) for t, s in sizes_at.items()}
        sensitivity_rows.append([p.name] + [f"{by_threshold[t]:.2f}" for t in thresholds])
        mean, low, high = bootstrap_mean(fraction, o.num_bootstrap, o.level, o.seed)
        mean_block = blocks_lib.detect_block(h.mean(), o.block_threshold, o.block_min_layers)
        records.append({"population": p.name, "workdir": p.workdir, "architecture": p.architecture,
                        "data_fraction": p.config.data.fraction, "num_layers": len(h.layer_names),
                        "block_per_model": sizes.tolist(), "block_fraction_mean": mean,
                        "block_fraction_interval": [low, high], "level": o.level,
                        "block_of_mean_heatmap": [mean_block.start, mean_block.stop],
                        "blocks_inside": blocks_lib.blocks_in_structure(h.layer_names, mean_block),
                        "block_fraction_by_threshold": {f"{t:g}": f for t, f in by_threshold.items()}})
        if i == 0:
            write_npz(ctx.path("blocks.npz"), block=sizes, layer_names=np.array(h.layer_names),
                      threshold=o.block_threshold)
        grid_maps.append(h.mean())
        grid_names.append(h.layer_names)
        grid_blocks.append(mean_block)
        table_rows.append([p.name, p.architecture, f"{p.config.data.fraction:g}",
                           " ".join(str(s) for s in sizes[:, 2]), str(len(h.layer_names)),
                           format_interval(mean, low, high, 2)])
    write_json(ctx.path("blocks.json"), records)
    row_labels, col_labels, positions = _grid_positions(ctx.populations)
    fig = blocks_lib.plot_block_grid(grid_maps, grid_names, grid_blocks, row_labels, col_labels, positions,
                                     "Block structure (seed-averaged block-output CKA; detected block outlined)")
    table = Table(["population", "architecture", "data fraction", "block size per seed (layers)", "layers",
                   f"block fraction, mean [{o.level:.0%} CI over seeds]"], table_rows)
    sensitivity = Table(["population"] + [f"CKA ≥ {t:g}" for t in thresholds], sensitivity_rows,
                        "Mean block fraction over seeds as the threshold (--block_threshold) varies: how much the "
                        "sizes above depend on it")
    text = (f"The block structure is the longest run of consecutive block outputs whose pairwise CKA all reach "
            f"{o.block_threshold} (at least {o.block_min_layers} layers), found per seed on the block-output "
            "heatmap. Pass sweeps (width, depth, data fraction) with --compare to fill the grid: rows are "
            "training-data fractions, columns architectures. Intervals are percentile bootstraps over seeds.")
    return Section("blocks", "Block structure", text, [_figure(ctx, fig, "blocks_grid")], [table, sensitivity],
                   ["blocks.npz", "blocks.json"])


def _main_block(ctx: AnalysisContext, population: Population) -> tuple[blocks_lib.BlockStructure, tuple[str, ...]]:
    """The block structure of the seed-averaged block-output heatmap, and the block-output names."""
    h = ctx.within(population).select("blocks")
    o = ctx.options
    return blocks_lib.detect_block(h.mean(), o.block_threshold, o.block_min_layers), h.layer_names


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
    pcs = pcs_lib.principal_components(reps)
    write_npz(ctx.path("pcs.npz"), variance_fraction=pcs.variance_fraction, cosine=pcs.cosine, cka=pcs.cka,
              cka_without_first_pc=pcs.cka_without_pc, layer_names=np.array(pcs.layer_names))
    fig = pcs_lib.plot_principal_components(pcs, f"{p.name}: first principal component of block outputs")
    inside = _inside(pcs.layer_names, blocks_lib.blocks_in_structure(block_layers, block))
    split = pcs_lib.summary(pcs, inside)
    rows = [[short_name(n), f"{v:.3f}"] for n, v in zip(pcs.layer_names, np.nanmean(pcs.variance_fraction, 0))]
    text = (f"On the first {len(next(iter(reps.values()))[0])} test examples: the fraction of each block output's "
            "variance along its first principal component, the |cosine| between first-PC scores of layer pairs "
            "(example space, so layers of different widths compare), and CKA before and after removing each "
            "layer's first PC. In the paper, layers inside the block structure have a dominant first PC that "
            "they share, and removing it removes the block. Mean variance fraction inside the detected block "
            f"structure: {split['inside']:.3f}; outside: {split['outside']:.3f}.")
    return Section("pcs", "Principal components", text, [_figure(ctx, fig, "pcs")],
                   [Table(["layer", "first-PC variance fraction (mean over seeds)"], rows)], ["pcs.npz"])


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
    fig = probes_lib.plot_probes(acc, names, f"{p.name}: linear probes on frozen features", inside)
    mean, low, high = bootstrap_mean(acc, o.num_bootstrap, o.level, o.seed)
    rows = [[short_name(n), format_interval(m, lo, hi)] for n, m, lo, hi in zip(names, mean, low, high)]
    text = (f"Softmax regression (Adam, {o.probe_steps} full-batch steps, L2 1e-4) on each layer's spatially "
            f"averaged features of {len(pick)} training examples, scored on the {len(ctx.test.labels)} test "
            "examples. Shaded: layers of residual blocks inside the detected block structure. In the paper, "
            "probe accuracy plateaus inside the block structure.")
    table = Table(["layer", f"probe accuracy, mean [{o.level:.0%} CI over seeds]"], rows)
    return Section("probes", "Linear probes", text, [_figure(ctx, fig, "probes")], [table], ["probes.npz"])


def deletion(ctx: AnalysisContext) -> Section:
    """Fig. 5: test accuracy after deleting each residual block."""
    p, o = ctx.main, ctx.options
    if not p.config.model.residual:
        raise AnalysisInputError(f"block deletion needs residual connections; {p.workdir!r} was trained without")
    names = p.model.block_names()
    acc = deletion_lib.deletion_accuracy(p, ctx.test, [(), *[(b,) for b in names]], ctx.progress)
    full, deleted = acc[:, 0], acc[:, 1:]
    block, block_layers = _main_block(ctx, p)
    inside_blocks = blocks_lib.blocks_in_structure(block_layers, block)
    inside = [b in inside_blocks for b in names]
    write_npz(ctx.path("deletion.npz"), full_accuracy=full, accuracy=deleted, block_names=np.array(names),
              inside_block_structure=np.array(inside))
    fig = deletion_lib.plot_deletion(full, deleted, names, f"{p.name}: accuracy with one block deleted", inside)
    drop = full[:, None] - deleted
    mean, low, high = bootstrap_mean(drop, o.num_bootstrap, o.level, o.seed)
    rows = [[b, "yes" if flag else "no", format_interval(m, lo, hi)]
            for b, flag, m, lo, hi in zip(names, inside, mean, low, high)]
    fm, fl, fh = bootstrap_mean(full, o.num_bootstrap, o.level, o.seed)
    text = (f"Each residual block's branch is removed in turn (its shortcut kept) and the whole test set "
            f"re-scored. Full-network accuracy: {format_interval(fm, fl, fh)} (mean [{o.level:.0%} CI over "
            "seeds]). Shaded: blocks inside the detected block structure, where the paper finds deletion "
            "costs little.")
    table = Table(["deleted block", "inside block structure", "accuracy drop, mean [CI]"], rows)
    return Section("deletion", "Block deletion", text, [_figure(ctx, fig, "deletion")], [table], ["deletion.npz"])


def seeds(ctx: AnalysisContext) -> Section:
    """Fig. 6: CKA between layers of different seeds of the same architecture."""
    p, o = ctx.main, ctx.options
    if p.size < 2:
        raise AnalysisInputError(f"cross-seed CKA needs at least 2 models; {p.workdir!r} has {p.size}")
    sub = p.subset(slice(0, o.max_models))
    pairs = across_lib.cross_cka(sub, None, ctx.test, "blocks", o.batch_size, o.passes, o.seed, ctx.progress)
    names = representation_names(p.model, "blocks")
    write_npz(ctx.path("cka_seeds.npz"), cka=pairs, layer_names=np.array(names))
    figures = [_figure(ctx, across_lib.plot_seeds(pairs, names, f"{p.name}: CKA across seeds"), "cka_seeds"),
               _figure(ctx, across_lib.plot_same_layer(pairs, names, f"{p.name}: same layer, different seeds"),
                       "cka_seeds_same_layer")]
    same = across_lib.same_layer_across_seeds(pairs)
    mean, low, high = bootstrap_mean(same, o.num_bootstrap, o.level, o.seed)
    rows = [[short_name(n), format_interval(m, lo, hi)] for n, m, lo, hi in zip(names, mean, low, high)]
    text = (f"Population-mode minibatch CKA between the block outputs of every pair of the first {sub.size} "
            "seeds. In the paper, layers outside a block structure match the same layer of other seeds closely, "
            "while block-structure representations differ across seeds.")
    table = Table(["layer", f"CKA with the same layer of another seed, mean [{o.level:.0%} CI over pairs]"], rows)
    return Section("seeds", "CKA across seeds", text, figures, [table], ["cka_seeds.npz"])


def architectures(ctx: AnalysisContext) -> Section:
    """Fig. E.1: CKA between the layers of different architectures (seed pairs averaged)."""
    a, o = ctx.main, ctx.options
    heatmaps, names_b, labels_b, arrays = [], [], [], {}
    for b in ctx.populations[1:]:
        pairs = across_lib.cross_cka(a.subset(slice(0, o.max_models)), b.subset(slice(0, o.max_models)), ctx.test,
                                     "blocks", o.batch_size, o.passes, o.seed, ctx.progress)
        heatmaps.append(np.nanmean(pairs, axis=(0, 1)))
        names_b.append(representation_names(b.model, "blocks"))
        labels_b.append(b.name)
        arrays[f"cka__{b.name}"] = pairs
        arrays[f"layer_names__{b.name}"] = np.array(names_b[-1])
    names_a = representation_names(a.model, "blocks")
    write_npz(ctx.path("cka_architectures.npz"), layer_names=np.array(names_a), **arrays)
    fig = across_lib.plot_architectures(heatmaps, names_a, names_b, a.name, labels_b)
    text = ("Population-mode minibatch CKA between the block outputs of every model of the main population "
            f"(rows) and every model of each compared one (columns), first {o.max_models} seeds each, averaged "
            "over model pairs. cka__<name> in the .npz holds all pairs (Ma, Mb, La, Lb). In the paper, layers at "
            "the same relative depth match when neither network has a block structure.")
    return Section("architectures", "CKA across architectures", text, [_figure(ctx, fig, "cka_architectures")],
                   [], ["cka_architectures.npz"])


def disagreement(ctx: AnalysisContext) -> Section:
    """Fig. 7 / F.1-F.4: per-example accuracy scatter and per-class Welch tests."""
    o, a = ctx.options, ctx.main
    correct_a, labels = load_correct(a.workdir)
    classes = class_names(a.config, ctx.test.num_classes)
    figures, tables, records = [], [], []
    for b in ctx.populations[1:]:
        correct_b, labels_b = load_correct(b.workdir)
        check_same_labels([a.workdir, b.workdir], [labels, labels_b])
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
        records.append({"population_b": b.name, "classes_differing": differing,
                        "class_names_differing": [classes[c] for c in differing],
                        "num_classes_differing": len(differing), "alpha": o.alpha, "fdr": o.fdr,
                        "overall": overall._asdict(), "models_per_group": k,
                        "per_example_correlation": correlations})
        rows = [[classes[c], f"{tests.difference[c]:+.4f}", f"{tests.p_value[c]:.3g}", f"{tests.p_adjusted[c]:.3g}"]
                for c in sorted(differing, key=lambda c: -tests.difference[c])]
        correction = "Benjamini-Hochberg adjusted " if o.fdr else ""
        tables.append(Table(["class", "accuracy A − B", "p", "adjusted p"], rows,
                            f"{a.name} vs {b.name}: {len(differing)} of {len(classes)} classes differ "
                            f"({correction}Welch p < {o.alpha}); overall accuracy {overall.mean_a:.4f} ± "
                            f"{overall.sem_a:.4f} vs {overall.mean_b:.4f} ± {overall.sem_b:.4f} (± SEM), "
                            f"t({overall.dof:.1f}) = {overall.t:.2f}, p = {overall.p_value:.3g}"))
    write_json(ctx.path("disagreement.json"), records)
    text = ("Per-example accuracy = the fraction of a group of models that get an example right. The first "
            "panel compares a group of each population (A1, B1); the next ones compare two disjoint groups of the "
            "same population, the baseline. Every group holds half the smaller population's models, so the "
            "scatters are comparable: systematic differences between architectures show as more scatter (a "
            "lower A1 vs B1 correlation, per_example_correlation in disagreement.json) than the baselines "
            "(jitter added to show overlapping points). Per-class accuracies are compared over all models with "
            "Welch's t-test (--fdr adds the Benjamini-Hochberg correction).")
    return Section("disagreement", "Per-example and per-class disagreement", text, figures, tables,
                   ["disagreement.json"] + [f"disagreement__{b.name}.npz" for b in ctx.populations[1:]])


def _two_seeds(ctx: AnalysisContext, what: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Pooled block outputs of seeds 0 and 1 of the main population: name -> (n, C) each."""
    if ctx.main.size < 2:
        raise AnalysisInputError(f"{what} compares two seeds; {ctx.main.workdir!r} has {ctx.main.size} model")
    reps = ctx.pooled_blocks(ctx.main)
    return {n: r[0] for n, r in reps.items()}, {n: r[1] for n, r in reps.items()}


def cca(ctx: AnalysisContext) -> Section:
    """SVCCA and PWCCA heatmaps within each model, and the same layer across seeds."""
    p, o = ctx.main, ctx.options
    reps = ctx.pooled_blocks(p)
    names = tuple(reps)
    maps = {m: cca_lib.within_heatmaps(m, reps) for m in ("svcca", "pwcca")}
    figures = [_figure(ctx, cca_lib.plot_cca_heatmaps(maps["svcca"], maps["pwcca"], names,
                                                      f"{p.name}: SVCCA and PWCCA between block outputs"), "cca")]
    arrays = {f"{m}_within": v for m, v in maps.items()}
    tables = []
    if p.size >= 2 and o.max_models >= 2:
        curves = {m: cca_lib.cross_seed_same_layer(m, reps) for m in ("svcca", "pwcca", "cka")}
        arrays.update({f"{m}_seeds": v for m, v in curves.items()})
        figures.append(_figure(ctx, cca_lib.plot_relative_depth(
            curves, "similarity with the same layer, other seed", f"{p.name}: across seeds", names), "cca_seeds"))
        rows = [[short_name(n)] + [f"{np.nanmean(curves[m][:, i]):.3f}" for m in curves] for i, n in enumerate(names)]
        tables.append(Table(["layer", "SVCCA", "PWCCA", "linear CKA"], rows, "Same layer across seeds, mean over pairs"))
    write_npz(ctx.path("cca.npz"), layer_names=np.array(names), **arrays)
    n_examples = next(iter(reps.values())).shape[1]
    text = (f"SVCCA (top directions explaining 99% of the variance, then CCA; mean canonical correlation) and PWCCA "
            f"(canonical correlations weighted by how much of the representation they account for) between the "
            f"spatially averaged channels of block outputs, on {n_examples} test examples. CCA needs many more "
            "examples than channels; pairs where a side has at least n - 1 channels are NaN. Seeds: the first "
            f"{min(p.size, o.max_models)} models.")
    return Section("cca", "SVCCA and PWCCA", text, figures, tables, ["cca.npz"])


def matching(ctx: AnalysisContext) -> Section:
    """Li et al. 2016: bipartite and semi-matching of units across two seeds, per layer."""
    a, b = _two_seeds(ctx, "unit matching")
    curves = match_lib.matching_curves(a, b)
    write_npz(ctx.path("matching.npz"), layer_names=np.array(list(curves)),
              **{f"{m}_correlations": match_lib.padded(curves, m) for m in MATCHING_METHODS})
    fig = match_lib.plot_matching(curves, f"{ctx.main.name}: matched unit correlations, seed 0 vs seed 1")
    rows = [[short_name(n)] + [f"{np.mean(c[m]):.3f}" for m in MATCHING_METHODS] for n, c in curves.items()]
    text = ("Units (spatially averaged channels) of each block output of seed 0 matched to those of seed 1 by "
            "Pearson correlation over test examples: one-to-one (bipartite, Hungarian algorithm) and semi-matching "
            "(each unit to its best partner). Curves sort the matched correlations; high curves mean units recur "
            "one for one across seeds.")
    table = Table(["layer"] + [f"mean {m} matched correlation" for m in MATCHING_METHODS], rows)
    return Section("matching", "Unit matching across seeds", text, [_figure(ctx, fig, "matching")], [table],
                   ["matching.npz"])


def sparse(ctx: AnalysisContext) -> Section:
    """Li et al. 2016: L1-penalised prediction of one seed's units from another's (local vs distributed)."""
    a, b = _two_seeds(ctx, "sparse prediction")
    penalties = match_lib.DEFAULT_L1_PENALTIES
    losses = match_lib.sparse_losses(a, b, penalties, ctx.options.seed)
    names = list(a)
    write_npz(ctx.path("sparse.npz"), loss=losses, l1_penalties=np.array(penalties), layer_names=np.array(names))
    fig = match_lib.plot_sparse(losses, penalties, names, f"{ctx.main.name}: sparse prediction of seed 1 from seed 0")
    rows = [[short_name(n)] + [f"{v:.3f}" for v in row] for n, row in zip(names, losses)]
    text = ("Each standardised unit of seed 1 is predicted from all units of the same layer of seed 0 by Lasso "
            "regression; the loss is measured on a held-out quarter of the examples (1 = predicting the mean). A "
            "loss that stays low as the penalty grows means a few units suffice (local code); a loss that rises "
            "means the code is distributed.")
    table = Table(["layer"] + [f"α = {a:g}" for a in penalties], rows, "Held-out loss per L1 penalty")
    return Section("sparse", "Sparse prediction across seeds", text, [_figure(ctx, fig, "sparse")], [table],
                   ["sparse.npz"])


def dynamics(ctx: AnalysisContext) -> Section:
    """Raghu et al. 2017: each layer at kept checkpoints vs the final network (SVCCA and CKA)."""
    p = ctx.main
    steps = [s for s in checkpoint_steps(p.workdir) if s < p.step]
    if not steps:
        raise AnalysisInputError(f"learning dynamics needs checkpoints before the final one; {p.workdir!r} kept "
                                 f"only step {p.step} (see checkpoint.keep_at_fractions)")
    final = ctx.pooled_blocks(p)
    measures = ("svcca", "cka")
    values = {m: [] for m in measures}
    for step in ctx.progress(steps, desc="checkpoints", leave=False):
        reps = ctx.pooled_blocks(load_population(p.workdir, step, p.name))
        for m in measures:
            values[m].append(dyn_lib.similarity_to_final(m, reps, final))
    values = {m: np.stack(v) for m, v in values.items()}
    fractions = [s / p.step for s in steps]
    names = list(final)
    write_npz(ctx.path("dynamics.npz"), steps=np.array(steps), final_step=p.step, layer_names=np.array(names),
              **values)
    fig = dyn_lib.plot_dynamics(values, fractions, names, f"{p.name}: layers during training vs the final network")
    rows = [[f"{s} ({f:.0%})"] + [f"{v:.2f}" for v in np.nanmean(values['svcca'][i], 0)]
            for i, (s, f) in enumerate(zip(steps, fractions))]
    text = ("Each kept checkpoint's block outputs (spatially averaged, same test examples) against the same layer "
            "of the same seed at the end of training. Raghu et al. find networks converge bottom-up: early layers "
            "reach their final representation first.")
    table = Table(["step"] + [short_name(n) for n in names], rows, "SVCCA with the final network, mean over seeds")
    return Section("dynamics", "Learning dynamics", text, [_figure(ctx, fig, "dynamics")], [table], ["dynamics.npz"])


def convergence(ctx: AnalysisContext) -> Section:
    """Morcos et al. 2018: cross-seed PWCCA per population (memorising vs generalising, narrow vs wide)."""
    o = ctx.options
    curves, rows, arrays = {}, [], {}
    for p in ctx.populations:
        if min(p.size, o.max_models) < 2:
            raise AnalysisInputError(f"cross-seed PWCCA needs 2 models; {p.workdir!r} has {p.size}")
        values = cca_lib.cross_seed_same_layer("pwcca", ctx.pooled_blocks(p))
        label = f"{p.name}: {p.architecture}"
        curves[label] = values
        arrays[f"pwcca__{p.name}"] = values
        mean, low, high = bootstrap_mean(np.nanmean(values, 1), o.num_bootstrap, o.level, o.seed)
        rows.append([p.name, p.architecture, "yes" if p.config.data.random_labels else "no",
                     format_interval(mean, low, high)])
    write_npz(ctx.path("convergence.npz"), **arrays)
    fig = cca_lib.plot_relative_depth(curves, "PWCCA between seeds", "Cross-seed PWCCA per population")
    text = ("PWCCA between the same block outputs of different seeds, per population, against relative depth. "
            "Morcos et al. find that generalising networks converge to more similar solutions than memorising "
            "ones (train one population with data.random_labels=True to compare) and wider networks to more "
            "similar solutions than narrower ones.")
    table = Table(["population", "architecture", "random labels",
                   f"mean cross-seed PWCCA over layers [{o.level:.0%} CI over pairs]"], rows)
    return Section("convergence", "Convergence across seeds (PWCCA)", text, [_figure(ctx, fig, "convergence")],
                   [table], ["convergence.npz"])
