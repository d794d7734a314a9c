"""ResNets: parameter counts, shapes and names of representations, no-residual variant, block
deletion, train/eval BatchNorm, populations under vmap and sharding."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cka_jax.models import (
    CAPTURE_PRESETS,
    CifarResNet,
    ImageNetResNet,
    create_model,
    representation_names,
    representation_shapes,
)
from cka_jax.models.layers import ProjectionShortcut, conv_factory, norm_factory

X = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))


def key(seed):
    """RBG keys: their random bits compile much faster on CPU than threefry's."""
    return jax.random.key(seed, impl="rbg")


def num_params(model, input_shape):
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(input_shape))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))


@pytest.fixture(scope="module")
def resnet8():
    model = CifarResNet(depth=8, num_classes=3)
    variables = model.init(key(0), X)
    # Non-trivial running statistics, so eval-mode and train-mode BatchNorm differ.
    _, state = model.apply(variables, 3.0 * X + 1.0, train=True, mutable=["batch_stats"])
    return model, {"params": variables["params"], **state}


@pytest.mark.parametrize("depth, expected", [(20, 0.27e6), (56, 0.85e6), (110, 1.7e6)])
def test_cifar_parameter_counts_match_published(depth, expected):
    count = num_params(CifarResNet(depth=depth, width=1.0), (1, 32, 32, 3))
    assert abs(count - expected) / expected < 0.03, count


def test_cifar_width_scales_every_conv():
    model = CifarResNet(depth=14, width=2.8)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 45)
    assert params["stage2_block1"]["conv1"]["kernel"].shape == (3, 3, 45, 90)
    assert params["stage3_block2"]["conv2"]["kernel"].shape == (3, 3, 179, 179)
    assert params["classifier"]["kernel"].shape == (179, 10)


def test_imagenet_resnet50_parameter_count_is_standard():
    assert num_params(ImageNetResNet(), (1, 64, 64, 3)) == 25_557_032
    assert num_params(ImageNetResNet(stage_sizes=(3, 4, 23, 3)), (1, 64, 64, 3)) == 44_549_160  # ResNet-101


def test_imagenet_variants_are_configs():
    wide = jax.eval_shape(
        ImageNetResNet(stage_widths=(1, 1, 2.8, 1)).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))
    )["params"]
    assert wide["stage3_block2"]["conv2"]["kernel"].shape == (3, 3, 717, 717)
    assert wide["stage3_block2"]["conv3"]["kernel"].shape == (1, 1, 717, 4 * 717)
    assert wide["stage4_block1"]["conv1"]["kernel"].shape == (1, 1, 4 * 717, 512)
    deep = ImageNetResNet(stage_sizes=(3, 4, 17, 3))
    assert len(deep.block_names()) == 27 and "stage3/block17" in deep.block_names()


def test_imagenet_representation_names_and_shapes():
    model = create_model("imagenet_resnet", num_classes=5, stage_sizes=(1, 2), stage_widths=(1.0, 0.5), num_filters=4)
    reps = representation_shapes(model, (2, 32, 32, 3), "all")
    assert list(reps) == [
        "stem",
        "stage1/block1/conv1",
        "stage1/block1/conv2",
        "stage1/block1/pre_residual",
        "stage1/block1/post_residual",
        "stage2/block1/conv1",
        "stage2/block1/conv2",
        "stage2/block1/pre_residual",
        "stage2/block1/post_residual",
        "stage2/block2/conv1",
        "stage2/block2/conv2",
        "stage2/block2/pre_residual",
        "stage2/block2/post_residual",
        "pool",
        "logits",
    ]
    assert reps["stem"].shape == (2, 8, 8, 4)
    assert reps["stage1/block1/post_residual"].shape == (2, 8, 8, 16)
    assert reps["stage2/block2/conv2"].shape == (2, 4, 4, 4)
    assert reps["stage2/block2/post_residual"].shape == (2, 4, 4, 16)
    assert reps["pool"].shape == (2, 16) and reps["logits"].shape == (2, 5)
    assert representation_names(model, "blocks", skip_blocks=("stage2/block2",)) == (
        "stem",
        "stage1/block1/post_residual",
        "stage2/block1/post_residual",
        "stage2/block2/post_residual",
    )


def test_cifar_representation_names_and_shapes():
    model = CifarResNet(depth=14)
    blocks = [f"stage{s}/block{b}" for s in (1, 2, 3) for b in (1, 2)]
    assert representation_names(model, "blocks") == ("stem", *(f"{b}/post_residual" for b in blocks))
    assert representation_names(model, "pre_and_post") == (
        "stem",
        *(f"{b}/{t}" for b in blocks for t in ("pre_residual", "post_residual")),
    )
    assert representation_names(model, "all") == (
        "stem",
        *(f"{b}/{t}" for b in blocks for t in ("conv1", "pre_residual", "post_residual")),
        "pool",
        "logits",
    )
    assert representation_names(model, "stage3/*/post_residual") == (
        "stage3/block1/post_residual",
        "stage3/block2/post_residual",
    )
    assert representation_names(model, ("logits", "stem")) == ("stem", "logits")
    shapes = representation_shapes(model, (5, 16, 16, 3), "all")
    assert tuple(shapes) == representation_names(model, "all")
    assert shapes["stem"].shape == (5, 16, 16, 16)
    assert shapes["stage2/block1/conv1"].shape == (5, 8, 8, 32)
    assert shapes["stage3/block2/pre_residual"].shape == (5, 4, 4, 64)
    assert shapes["pool"].shape == (5, 64) and shapes["logits"].shape == (5, 10)


def test_any_input_size_and_channels():
    model = CifarResNet(depth=8, width=0.5, num_classes=7)
    shapes = representation_shapes(model, (2, 7, 9, 2), "all")
    assert shapes["stem"].shape == (2, 7, 9, 8)
    assert shapes["stage3/block1/post_residual"].shape == (2, 2, 3, 32)
    assert shapes["logits"].shape == (2, 7) and shapes["logits"].dtype == jnp.float32


def test_capture_returns_logits_and_ordered_reps(resnet8):
    model, variables = resnet8
    logits = model.apply(variables, X)
    assert logits.shape == (4, 3) and logits.dtype == jnp.float32
    apply = jax.jit(model.apply, static_argnames=("train", "capture", "skip_blocks"))
    logits_captured, reps = apply(variables, X, capture="all")
    np.testing.assert_allclose(logits_captured, logits, rtol=1e-5, atol=1e-5)
    assert tuple(reps) == model.layer_names()  # network order survives jit
    np.testing.assert_allclose(reps["logits"], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        reps["pool"], reps["stage3/block1/post_residual"].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(
        reps["stage1/block1/post_residual"], jax.nn.relu(reps["stem"] + reps["stage1/block1/pre_residual"])
    )


def test_train_mode_batchnorm(resnet8):
    model, variables = resnet8
    (logits, reps), state = model.apply(variables, X, train=True, capture="blocks", mutable=["batch_stats"])
    assert list(reps) == list(representation_names(model, "blocks"))
    assert jax.tree.structure(state["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
    assert not np.allclose(state["batch_stats"]["stem_bn"]["mean"], variables["batch_stats"]["stem_bn"]["mean"])
    assert not np.allclose(logits, model.apply(variables, X), atol=1e-3)
    # Train mode normalises with batch statistics: the running averages do not matter.
    fresh_stats = {"params": variables["params"], "batch_stats": jax.tree.map(jnp.zeros_like, variables["batch_stats"])}
    np.testing.assert_allclose(
        model.apply(fresh_stats, X, train=True, mutable=["batch_stats"])[0], logits, rtol=1e-5, atol=1e-5
    )


def test_no_residual_variant(resnet8):
    model = CifarResNet(depth=8, num_classes=3, residual=False)
    variables = model.init(key(0), X)
    assert all("shortcut" not in block for block in variables["params"].values())
    residual_count = num_params(CifarResNet(depth=8, num_classes=3), X.shape)
    projections = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert num_params(model, X.shape) == residual_count - projections
    _, reps = model.apply(variables, X, capture="all")
    for block in model.block_names():
        np.testing.assert_array_equal(reps[f"{block}/post_residual"], jax.nn.relu(reps[f"{block}/pre_residual"]))
    with pytest.raises(ValueError, match="residual=True"):
        model.apply(variables, X, skip_blocks=("stage2/block1",))


def test_deleting_nothing_is_the_full_model(resnet8):
    model, variables = resnet8
    np.testing.assert_array_equal(model.apply(variables, X, skip_blocks=()), model.apply(variables, X))


def test_deleting_an_identity_block_passes_its_input_through():
    model = CifarResNet(depth=14, num_classes=3)
    variables = model.init(key(0), X)
    _, full = model.apply(variables, X, capture="all")
    logits, reps = model.apply(variables, X, capture="all", skip_blocks=("stage1/block2", "stage3/block2"))
    assert tuple(reps) == model.layer_names(("stage1/block2", "stage3/block2"))
    assert "stage1/block2/conv1" not in reps and "stage3/block2/pre_residual" not in reps
    np.testing.assert_array_equal(reps["stage1/block2/post_residual"], full["stage1/block1/post_residual"])
    np.testing.assert_array_equal(reps["stage3/block2/post_residual"], reps["stage3/block1/post_residual"])
    assert not np.allclose(reps["stage2/block1/post_residual"], full["stage2/block1/post_residual"])
    assert not np.allclose(logits, full["logits"])


def test_deleting_a_projection_block_keeps_the_projection(resnet8):
    model, variables = resnet8
    _, reps = model.apply(variables, X, capture="all", skip_blocks="stage2/block1")
    block_vars = {k: v["stage2_block1"]["shortcut"] for k, v in variables.items()}
    shortcut = ProjectionShortcut(32, 2, conv_factory(jnp.float32), norm_factory(False, jnp.float32))
    expected = jax.nn.relu(shortcut.apply(block_vars, reps["stage1/block1/post_residual"]))
    np.testing.assert_allclose(reps["stage2/block1/post_residual"], expected, rtol=1e-6, atol=1e-6)


def test_zero_init_last_bn():
    model = CifarResNet(depth=8, num_classes=3, zero_init_last_bn=True)
    variables = model.init(key(0), X)
    assert not np.any(variables["params"]["stage1_block1"]["bn2"]["scale"])
    _, reps = model.apply(variables, X, capture="all")
    np.testing.assert_array_equal(reps["stage1/block1/post_residual"], reps["stem"])
    assert np.all(CifarResNet(depth=8, num_classes=3).init(key(0), X)["params"]["stage1_block1"]["bn2"]["scale"] == 1)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = CifarResNet(depth=8, dtype=jnp.bfloat16)
    variables = jax.eval_shape(model.init, key(0), X)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits, reps = jax.eval_shape(lambda v: model.apply(v, X, capture="blocks"), variables)
    assert logits.dtype == jnp.float32 and reps["stem"].dtype == jnp.bfloat16


@pytest.fixture(scope="module")
def population(resnet8):
    model, _ = resnet8
    return jax.jit(jax.vmap(model.init, (0, None)))(jax.random.split(key(0), 8), X)


def test_population_under_vmap_matches_each_model_alone(resnet8, population):
    model, _ = resnet8
    kernels = population["params"]["stage2_block1"]["conv1"]["kernel"]
    assert kernels.shape == (8, 3, 3, 16, 32)
    assert all(not np.allclose(kernels[i], kernels[i + 1]) for i in range(7))
    logits, reps = jax.jit(jax.vmap(lambda v: model.apply(v, X, capture="pre_and_post")))(population)
    assert tuple(reps) == representation_names(model, "pre_and_post")
    for m in range(3):
        alone = jax.tree.map(lambda leaf, m=m: leaf[m], population)
        logits_m, reps_m = model.apply(alone, X, capture="pre_and_post")
        np.testing.assert_allclose(logits[m], logits_m, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            reps["stage3/block1/pre_residual"][m], reps_m["stage3/block1/pre_residual"], rtol=1e-4, atol=1e-5
        )


def test_sharded_population(resnet8, population):
    """Each device vmaps its own models (shard_map); batch statistics stay per model."""
    model, _ = resnet8
    mesh = jax.make_mesh((8,), ("pop",))
    sharded = jax.device_put(population, NamedSharding(mesh, P("pop")))

    def step(variables):
        (logits, reps), state = model.apply(variables, X, train=True, capture="pre_and_post", mutable=["batch_stats"])
        return logits, reps, state

    per_device = jax.jit(jax.shard_map(jax.vmap(step), mesh=mesh, in_specs=P("pop"), out_specs=P("pop")))
    logits, reps, state = per_device(sharded)
    assert logits.sharding.spec[0] == "pop" and reps["stem"].shape == (8, 4, 8, 8, 16)
    logits, stem_var = np.asarray(logits), np.asarray(state["batch_stats"]["stem_bn"]["var"])
    assert tuple(reps) == representation_names(model, "pre_and_post")
    for m in (0, 7):
        alone = jax.tree.map(lambda leaf, m=m: leaf[m], population)
        (logits_m, _), state_m = model.apply(alone, X, train=True, capture="pre_and_post", mutable=["batch_stats"])
        np.testing.assert_allclose(logits[m], logits_m, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stem_var[m], state_m["batch_stats"]["stem_bn"]["var"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depth": 15}, "6n\\+2"),
        ({"depth": 2}, "6n\\+2"),
        ({"depth": 20.0}, "6n\\+2"),
        ({"depth": True}, "6n\\+2"),
        ({"width": 0}, "width"),
        ({"width": -1.0}, "width"),
        ({"width": float("nan")}, "width"),
        ({"width": 0.01}, "at least 1"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_invalid_cifar_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CifarResNet(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stage_sizes": ()}, "stage_sizes"),
        ({"stage_sizes": (3, 0, 6, 3)}, "stage_sizes\\[1\\]"),
        ({"stage_widths": (1.0, 2.0)}, "one multiplier per stage"),
        ({"stage_widths": (1, 1, 0, 1)}, "stage_widths\\[2\\]"),
    ],
)
def test_invalid_imagenet_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageNetResNet(**kwargs)


def test_unknown_names_raise(resnet8):
    model, variables = resnet8
    with pytest.raises(ValueError, match="'stage4/block1'.*stage3/block1"):
        model.apply(variables, X, skip_blocks=("stage4/block1",))
    with pytest.raises(ValueError, match="'everything'.*" + re.escape(str(CAPTURE_PRESETS))):
        model.apply(variables, X, capture="everything")
    with pytest.raises(ValueError, match="'stage9/\\*'"):
        representation_names(model, ("blocks", "stage9/*"))
    with pytest.raises(ValueError, match="'vgg'.*cifar_resnet.*imagenet_resnet"):
        create_model("vgg", num_classes=10)
    with pytest.raises(ValueError, match="batch, height, width, channels"):
        model.apply(variables, X[0])


@pytest.mark.parametrize(
    "name, fields, architecture",
    [
        ("cifar_resnet", {"depth": 20, "width": 2.0}, "ResNet-20 2×"),
        ("imagenet_resnet", {"stage_sizes": (1, 2), "stage_widths": (1.0, 0.5)}, "ResNet stages 1-2 widths 1.0-0.5"),
    ],
)
def test_from_config_builds_each_registered_model(name, fields, architecture):
    from cka_jax import models
    from cka_jax.workdir.config import CHOICES, base_config

    assert CHOICES["model.name"][1] == tuple(models.MODELS)  # config validation asks the registry
    config = base_config().model
    config.name, config.residual, config.zero_init_last_bn, config.dtype = name, False, True, "bfloat16"
    for field, value in fields.items():
        config[field] = value
    model = models.from_config(config, num_classes=7)
    assert type(model) is models.MODELS[name] and model.architecture() == architecture
    assert (model.num_classes, model.residual, model.zero_init_last_bn, model.dtype) == (7, False, True, jnp.bfloat16)
    assert all(getattr(model, field) == value for field, value in fields.items())
    logits = jax.eval_shape(lambda: model.init_with_output(key(0), jnp.zeros((1, 16, 16, 3)))[0])
    assert logits.shape == (1, 7)
    config.name = "vgg"
    with pytest.raises(ValueError, match="'vgg'"):
        models.from_config(config, num_classes=7)
