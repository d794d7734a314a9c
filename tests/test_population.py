"""Population layout: sharded over 8 fake devices (with padding) equals one device; every chunk size
(vmap, loop and between) computes the same."""

import jax
import numpy as np
import pytest
import tiny

from cka_jax.train import loop
from cka_jax.train import population as pop

# Runs here compile the same small programs again and again: keep them across runs.
jax.config.update("jax_compilation_cache_dir", tiny.CACHE_DIR)


def tiny_config(size, strategy):
    return tiny.tiny_config(size, 1, strategy=strategy)


def test_layout_pads_and_chunks_cover_every_model_once():
    layout = pop.make_layout(10, "loop", jax.devices())
    assert (layout.num_devices, layout.padded_size, layout.per_device) == (8, 16, 2)
    assert layout.num_chunks == 2 and layout.models_per_call == 1
    models = np.concatenate([layout.chunk_models(k) for k in range(layout.num_chunks)])
    assert sorted(models) == list(range(16))
    vmapped = pop.make_layout(10, "vmap", jax.devices())
    assert vmapped.num_chunks == 1 and vmapped.models_per_call == 2
    assert pop.make_layout(3, "auto", jax.devices()[:1]).strategy == "loop"  # CPU: the fallback, before measuring
    between = pop.make_layout(10, "2", jax.devices()[:3])  # 4 per device
    assert (between.per_device, between.num_chunks, between.models_per_call, between.strategy) == (4, 2, 2, "2")
    with pytest.raises(ValueError, match="at least one model"):
        pop.make_layout(0)


def test_split_and_merge_chunks_round_trip():
    layout = pop.make_layout(10, "loop", jax.devices())
    stacked = {"w": pop.host_to_sharded(np.arange(16 * 3.0).reshape(16, 3), layout.sharded)}
    chunks = pop.split_chunks(stacked, layout)
    np.testing.assert_array_equal(chunks[1]["w"][:, 0], layout.chunk_models(1) * 3)
    np.testing.assert_array_equal(pop.merge_chunks(chunks, layout)["w"], stacked["w"])


@pytest.mark.slow
@pytest.mark.parametrize("num_devices", [1, 8])
def test_merging_chunks_compiles_programs_whose_inputs_do_not_grow_with_the_population(caplog, num_devices):
    """A checkpoint stacks the chunks: in one program of M x leaves inputs it took 3.4 GB to
    compile at M = 200 models (digits ResNet-8) and was OOM-killed at M = 1000."""
    leaves = 5
    for chunks_per_device in (4, 32):
        size = chunks_per_device * num_devices
        layout = pop.make_layout(size, "loop", jax.devices()[:num_devices])
        stacked = {
            f"w{i}": pop.host_to_sharded(np.arange(size * 3.0).reshape(size, 3) + i, layout.sharded)
            for i in range(leaves)
        }
        chunks = pop.split_chunks(stacked, layout)
        caplog.clear()
        with jax.log_compiles(True):
            merged = pop.merge_chunks(chunks, layout)
        inputs = [
            r.getMessage().split(" with global shapes")[1].count("ShapedArray")
            for r in caplog.records
            if r.getMessage().startswith("Compiling ")
        ]
        assert max(inputs, default=0) <= 2 * leaves + 1, inputs
        for name in stacked:
            np.testing.assert_array_equal(merged[name], stacked[name])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Final test logits of 10 models under four layouts."""
    out = {}
    for name, strategy, devices in [
        ("one_device_loop", "loop", jax.devices()[:1]),
        ("sharded_loop", "loop", jax.devices()),
        ("sharded_vmap", "vmap", jax.devices()),
        ("three_devices_2_per_call", "2", jax.devices()[:3]),  # 4 per device, 2 of them padding slots
    ]:
        workdir = str(tmp_path_factory.mktemp(name))
        result = loop.train_and_evaluate(tiny_config(10, strategy), workdir, devices=devices)
        out[name] = (result, np.load(f"{workdir}/predictions/test.npz")["logits"], workdir)
    return out


@pytest.mark.slow
def test_sharded_with_padding_equals_unsharded(runs):
    (one, logits_one, _), (sharded, logits_sharded, _) = runs["one_device_loop"], runs["sharded_loop"]
    assert logits_one.shape == logits_sharded.shape == (10, 360, 10)
    np.testing.assert_allclose(logits_sharded, logits_one, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(sharded.test_accuracy, one.test_accuracy)
    # the models differ from each other (own seeds, own data order), so the check means something
    assert np.abs(logits_one[0] - logits_one[1]).max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sharded_vmap", "three_devices_2_per_call"])
def test_every_chunk_size_equals_the_loop(runs, name):
    np.testing.assert_allclose(runs[name][1], runs["sharded_loop"][1], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_run_saved_on_8_devices_resumes_on_1(runs):
    """The checkpoint holds 16 slots (10 models padded for 8 devices); one device needs 10."""
    _, logits_sharded, workdir = runs["sharded_loop"]
    result = loop.train_and_evaluate(tiny_config(10, "loop"), workdir, devices=jax.devices()[:1])
    assert result.step == result.total_steps
    np.testing.assert_allclose(
        np.load(f"{workdir}/predictions/test.npz")["logits"], logits_sharded, rtol=1e-4, atol=1e-4
    )
