"""Sharding on 8 CPU devices: rules, head-parallel GAAM, sharded training, checkpoints."""

import arrays
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import NamedSharding, PartitionSpec
from train_helpers import tiny_config, toy_features

from data import pipeline
from gaam_jax import GaussianAdaptiveTransformer, sharding
from gaam_jax import functional as F
from train import config as config_lib
from train import feeds, progress
from train.checkpointing import Checkpoints
from train.steps import Steps, stacked_zeros

P = PartitionSpec


def test_mesh_fills_minus_one_and_checks_sizes():
    mesh = sharding.make_mesh({"data": -1, "model": 2})
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh({"data": 3, "model": 2})
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh({"data": -1, "model": -1})
    with pytest.raises(ValueError, match="mapped twice"):
        sharding.validate_rules((("batch", "data"), ("batch", "model")))


def test_every_parameter_gets_the_sharding_the_rules_say():
    model = GaussianAdaptiveTransformer(num_classes=4, num_heads=8)
    abstract = sharding.abstract_params(model, jnp.zeros((2, 24, 1024)))
    mesh = sharding.make_mesh({"data": 2, "model": 4})
    specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(abstract, mesh))
    assert specs == {
        "attention": {"delta": P("model", None), "xi": P("model", None)},
        "conv1": {"kernel": P(None, None, "model", None), "bias": P("model")},
        "conv2": {"kernel": P(None, None, "model", None), "bias": P("model")},
        "classifier": {"kernel": P("model", None), "bias": P(None)},
    }
    # conv1's output channels want "model" too, but it is taken by its input channels (layers).
    gq = GaussianAdaptiveTransformer(num_classes=4, front="gqgaam", map_shape=(8, 64))
    abstract = sharding.abstract_params(gq, jnp.zeros((2, 24, 1024)))
    specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(abstract, mesh))
    assert specs["attention"]["embed_transform"]["kernel"] == P(None, "model")
    assert specs["attention"]["gqa"]["LayerNorm_0"]["scale"] == P(None)


_X = jax.ShapeDtypeStruct((2, 8, 64), jnp.float32)


@pytest.mark.parametrize(
    "front,kwargs,expected",
    [
        ("gaam", {}, {("attention", "xi"): ("heads", "embed")}),
        ("mixture", {}, {("attention", "layer_0", "c"): ("heads", None)}),
        (
            "mha_bn",
            {},
            {
                ("attention", "query", "kernel"): ("embed", "heads", None),
                ("attention", "out", "kernel"): ("heads", None, "embed"),
                ("batch_norm", "bias"): ("mlp",),
            },
        ),
        (
            "gqgaam",
            {"map_shape": (8, 64)},
            {
                ("attention", "GaussianAdaptiveAttention_0", "delta"): ("heads", "embed"),
                ("attention", "gqa", "q_proj", "kernel"): ("embed", "mlp"),
            },
        ),
        (
            "gqgaam",
            {"map_shape": (8, 64), "gqa": "textbook"},
            {("attention", "gqa", "key", "bias"): ("heads", None)},
        ),
        ("none", {"conv_impl": "xla"}, {("conv2", "kernel"): (None, None, "conv", "layers")}),
    ],
)
def test_parameters_are_annotated_where_they_are_created(front, kwargs, expected):
    model = GaussianAdaptiveTransformer(num_classes=4, front=front, num_heads=4, **kwargs)
    boxed = sharding.abstract_params(model, _X)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda leaf: isinstance(leaf, nn.meta.AxisMetadata))
    assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
    axes = flatten_dict(sharding.param_logical_axes(boxed))
    for path, names in {("classifier", "kernel"): ("mlp", "classes"), **expected}.items():
        assert axes[path] == names, path
    # init itself returns plain arrays, which carry no annotations.
    plain = jax.eval_shape(model.init, jax.random.key(0), _X)["params"]
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(plain))
    with pytest.raises(ValueError, match="abstract_params"):
        sharding.param_logical_axes(plain)


def test_gaam_inside_a_users_model_is_plain_unless_annotations_are_asked_for():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = GaussianAdaptiveTransformer(num_classes=3, num_heads=4, name="gat")(x)
            return nn.Dense(5, name="head")(x)

    plain = jax.eval_shape(Model().init, jax.random.key(0), _X)["params"]
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(plain))
    with pytest.raises(ValueError, match="abstract_params"):
        sharding.param_shardings(plain, sharding.make_mesh({"data": 2, "model": 4}))
    mesh = sharding.make_mesh({"data": 2, "model": 4})
    specs = jax.tree.map(
        lambda s: s.spec, sharding.param_shardings(sharding.abstract_params(Model(), _X), mesh)
    )
    assert specs["gat"]["attention"]["delta"] == P("model", None)
    assert specs["head"]["kernel"] == P(None, None)  # not annotated: replicated


def test_head_parallel_gaam_equals_single_device_without_gathering_the_input():
    mesh = sharding.make_mesh({"data": 2, "model": 4})
    x = arrays.normal((8, 24, 64), seed=0)
    delta = arrays.normal((8, 64), seed=1, scale=0.1)
    xi = arrays.normal((8, 64), seed=2, scale=0.1, shift=2.0)
    x_sh = NamedSharding(mesh, P("data", "model", None))
    p_sh = NamedSharding(mesh, P("model", None))

    def loss(x, d, s):
        return jnp.sum(F.gaussian_adaptive_attention(x, d, s, axis=1) ** 2)

    fwd = jax.jit(
        lambda x, d, s: F.gaussian_adaptive_attention(x, d, s, axis=1),
        in_shardings=(x_sh, p_sh, p_sh),
        out_shardings=x_sh,
    )
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), in_shardings=(x_sh, p_sh, p_sh))
    args = (jax.device_put(x, x_sh), jax.device_put(delta, p_sh), jax.device_put(xi, p_sh))
    # The single-device references, each compiled as one program (not op by op).
    one_fwd = jax.jit(lambda x, d, s: F.gaussian_adaptive_attention(x, d, s, axis=1))
    one_grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    chex.assert_trees_all_close(fwd(*args), one_fwd(x, delta, xi), atol=1e-6)
    chex.assert_trees_all_close(grad(*args), one_grad(x, delta, xi), rtol=1e-5, atol=1e-5)
    hlo = fwd.lower(*args).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo and "all-reduce" not in hlo
    hlo = grad.lower(*args).compile().as_text()
    assert "all-gather" not in hlo  # only the parameter gradients are reduced over "data"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_features(tmp_path_factory.mktemp("toy"), n=64, layers=8, dim=16)


def _run(steps, source, idx, n, on_device=True):
    """``n`` training steps of epoch 0 of one run through a feed; returns the state."""
    feed = (feeds.DeviceFeed if on_device else feeds.GrainFeed)(steps, source, 2)
    plan = feeds.Plan((idx,), (idx[:20],), (0,))
    orders = feed.orders(plan, 0)
    state, _ = feed.train(steps.init_state([0]), stacked_zeros(1), orders, 0, n)
    return state, feed, plan


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh_shape,on_device",
    [({"data": 8, "model": 1}, True), ({"data": 4, "model": 2}, False),
     ({"data": 2, "model": 4}, True)],
)  # fmt: skip
def test_sharded_train_steps_equal_unsharded(toy, tmp_path, mesh_shape, on_device):
    config = config_lib.load(tiny_config(tmp_path / "cfg.py", toy, batch_size=8),
                             ["model.num_heads=4"])  # fmt: skip
    source, _ = pipeline.load_features(toy)
    idx = np.arange(64)
    plain, plain_feed, plan = _run(Steps(config, 2, (8, 16)), source, idx, 4, on_device)
    steps = Steps(config, 2, (8, 16), mesh=sharding.make_mesh(mesh_shape))
    sharded, feed, _ = _run(steps, source, idx, 4, on_device)
    assert sharded.params["attention"]["delta"].sharding.is_equivalent_to(
        steps.state_sharding(1).params["attention"]["delta"], 3
    )
    # float32 sums reduced in another order across devices: ~1e-6 relative after 4 Adam steps.
    chex.assert_trees_all_close(
        jax.device_get(sharded.params), jax.device_get(plain.params), rtol=1e-4, atol=1e-5
    )
    val = progress.fetch(feed.evaluate(sharded, plan))
    val_plain = progress.fetch(plain_feed.evaluate(plain, plan))
    assert val["correct"] == val_plain["correct"] and val["count"] == [20]
    chex.assert_trees_all_close(val["gate_total"], val_plain["gate_total"], rtol=1e-5)


@pytest.mark.slow
def test_checkpoint_restores_onto_a_different_mesh(toy, tmp_path):
    config = config_lib.load(tiny_config(tmp_path / "cfg.py", toy, batch_size=8),
                             ["model.num_heads=4"])  # fmt: skip
    source, _ = pipeline.load_features(toy)
    big = Steps(config, 2, (8, 16), mesh=sharding.make_mesh({"data": 2, "model": 4}))
    state, *_ = _run(big, source, np.arange(64), 2)
    ckpt = Checkpoints(tmp_path / "ckpt", asynchronous=False)
    ckpt.save(2, state, state, {"epoch": 0})
    ckpt.close()
    for shape in ({"data": 4, "model": 1}, None):
        mesh = None if shape is None else sharding.make_mesh(shape, jax.devices()[:4])
        target = Steps(config, 2, (8, 16), mesh=mesh)
        ckpt = Checkpoints(tmp_path / "ckpt", asynchronous=False)
        restored, _, meta = ckpt.restore(target.abstract_state(1))
        ckpt.close()
        for a, b in zip(
            jax.tree.leaves(jax.device_get(restored)),
            jax.tree.leaves(jax.device_get(state)),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
        if shape is not None:
            assert restored.params["conv1"]["kernel"].sharding.mesh.devices.size == 4
