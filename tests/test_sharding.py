"""Sharding on 8 CPU devices: rules, head-parallel GAAM, sharded training, checkpoints."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from train_helpers import tiny_config, toy_features

from data import pipeline
from gaam_jax import GaussianAdaptiveTransformer, sharding
from gaam_jax import functional as F
from train import config as config_lib
from train.checkpointing import Checkpoints
from train.trainer import Trainer

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
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 24, 1024)))["params"]
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
    abstract = jax.eval_shape(gq.init, jax.random.key(0), jnp.zeros((2, 24, 1024)))["params"]
    specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(abstract, mesh))
    assert specs["attention"]["embed_transform"]["kernel"] == P(None, "model")
    assert specs["attention"]["gqa"]["LayerNorm_0"]["scale"] == P(None)


def test_head_parallel_gaam_equals_single_device_without_gathering_the_input():
    mesh = sharding.make_mesh({"data": 2, "model": 4})
    x = jax.random.normal(jax.random.key(0), (8, 24, 64))
    delta = 0.1 * jax.random.normal(jax.random.key(1), (8, 64))
    xi = 2.0 + 0.1 * jax.random.normal(jax.random.key(2), (8, 64))
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
    chex.assert_trees_all_close(
        fwd(*args), F.gaussian_adaptive_attention(x, delta, xi, axis=1), atol=1e-6
    )
    chex.assert_trees_all_close(
        grad(*args), jax.grad(loss, argnums=(0, 1, 2))(x, delta, xi), rtol=1e-5, atol=1e-5
    )
    hlo = fwd.lower(*args).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo and "all-reduce" not in hlo
    hlo = grad.lower(*args).compile().as_text()
    assert "all-gather" not in hlo  # only the parameter gradients are reduced over "data"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_features(tmp_path_factory.mktemp("toy"), n=64, layers=8, dim=16)


def _steps(trainer, source, idx, n):
    state = trainer.init_state(0)
    step = trainer.train_step(0)
    it = pipeline.train_epoch(source, idx, batch_size=trainer.config.batch_size, seed=0, epoch=0)
    for _, batch in zip(range(n), it, strict=False):
        state, _ = step(state, trainer.put_batch({k: batch[k] for k in ("x", "label")}))
    return state


@pytest.mark.parametrize(
    "mesh_shape", [{"data": 8, "model": 1}, {"data": 4, "model": 2}, {"data": 2, "model": 4}]
)
def test_sharded_train_steps_equal_unsharded(toy, tmp_path, mesh_shape):
    config = config_lib.load(tiny_config(tmp_path / "cfg.py", toy, batch_size=8))
    config.model.num_heads = 4
    source, _ = pipeline.load_features(toy)
    idx = np.arange(64)
    plain = _steps(Trainer(config, 2, (8, 16)), source, idx, 4)
    mesh = sharding.make_mesh(mesh_shape)
    trainer = Trainer(config, 2, (8, 16), mesh=mesh)
    sharded = _steps(trainer, source, idx, 4)
    assert (
        sharded.params["attention"]["delta"].sharding.spec
        == trainer.state_sharding.params["attention"]["delta"].spec
    )
    # float32 sums reduced in another order across devices: ~1e-6 relative after 4 Adam steps.
    chex.assert_trees_all_close(
        jax.device_get(sharded.params), jax.device_get(plain.params), rtol=1e-4, atol=1e-5
    )
    val = trainer.evaluate(sharded, source, idx[:20])
    val_plain = Trainer(config, 2, (8, 16)).evaluate(plain, source, idx[:20])
    assert val["accuracy"] == pytest.approx(val_plain["accuracy"])


def test_checkpoint_restores_onto_a_different_mesh(toy, tmp_path):
    config = config_lib.load(tiny_config(tmp_path / "cfg.py", toy, batch_size=8))
    config.model.num_heads = 4
    source, _ = pipeline.load_features(toy)
    big = Trainer(config, 2, (8, 16), mesh=sharding.make_mesh({"data": 2, "model": 4}))
    state = _steps(big, source, np.arange(64), 2)
    ckpt = Checkpoints(tmp_path / "ckpt")
    ckpt.save(2, state, {"epoch": 0})
    ckpt.close()
    for shape in ({"data": 4, "model": 1}, None):
        target = Trainer(
            config,
            2,
            (8, 16),
            mesh=None if shape is None else sharding.make_mesh(shape, jax.devices()[:4]),
        )
        ckpt = Checkpoints(tmp_path / "ckpt")
        restored, meta = ckpt.restore_latest(target.init_state(1))
        ckpt.close()
        for a, b in zip(
            jax.tree.leaves(jax.device_get(restored)),
            jax.tree.leaves(jax.device_get(state)),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
        if shape is not None:
            assert restored.params["conv1"]["kernel"].sharding.mesh.devices.size == 4
