"""The paper's experiment configs (configs/paper/): every variant trains on inputs of its shape.

The real features (WavLM, BEiT, Llama 2 on IEMOCAP, CIFAR-100, AG News) cannot exist offline,
so each config is exercised on features of the right shape: every full-size variant traced
abstractly (``jax.eval_shape``: init, a train step, an evaluation), the runlocal variants for
two real steps. Each experiment runs end to end through extraction and the CLI in
tests/data/test_extract_paper.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.paper import base
from gaam_jax import param_count
from train import __main__ as cli
from train import config as config_lib
from train.steps import Steps, stacked_zeros

# experiment -> (config file, classes, [N, d] of one example)
EXPERIMENTS = {
    "iemocap": ("configs/paper/iemocap.py", 4, (24, 1024)),
    "cifar100": ("configs/paper/cifar100.py", 100, (24, 1024)),
    "ag_news": ("configs/paper/ag_news.py", 4, (40, 5120)),
}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("variant", base.VARIANTS)
def test_every_full_size_variant_builds_and_steps_abstractly(experiment, variant):
    """The real decoder at its real input shape: init, one train step, one evaluation, traced
    with ``jax.eval_shape`` (nothing is computed or allocated)."""
    path, classes, shape = EXPERIMENTS[experiment]
    config = config_lib.load(f"{path}:{variant}")
    assert config.num_epochs == 35 and config.optimizer.plateau_patience == 10
    steps = Steps(config, classes, shape)
    state = steps.abstract_state(1)
    batch = {
        "x": jax.ShapeDtypeStruct((1, config.batch_size, *shape), jnp.float32),
        "label": jax.ShapeDtypeStruct((1, config.batch_size), jnp.int32),
    }
    active = jax.ShapeDtypeStruct((1,), jnp.bool_)
    new, sums = jax.eval_shape(steps.train_step, state, stacked_zeros(1), batch, active)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    assert sums.loss.shape == (1,)
    valid = jax.ShapeDtypeStruct((1, config.batch_size), jnp.bool_)
    out = jax.eval_shape(steps.evaluate_batch, state, {**batch, "valid": valid})
    assert ("gate_total" in out) == (variant in ("daamv1", "daamv2", "gqdaam", "mixture"))


@pytest.mark.parametrize(
    "experiment,variant",
    [("iemocap", "daamv1"), ("cifar100", "mixture"), ("iemocap", "gqdaam"), ("iemocap", "mha_bn")],
)
def test_runlocal_variants_take_two_steps(experiment, variant):
    """A runlocal variant (narrow convolutions, same input shape and structure) trains; every
    variant of every experiment is traced at full size above."""
    path, classes, shape = EXPERIMENTS[experiment]
    config = config_lib.load(f"{path}:{variant},runlocal")
    steps = Steps(config, classes, shape)
    state = steps.init_state([config.seeds[0]])
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(1, 2, *shape)).astype(np.float32),
        "label": np.array([[0, classes - 1]], np.int32),
    }
    first = jax.tree.map(np.asarray, state.params)
    for _ in range(2):
        state, sums = steps.train_step(state, stacked_zeros(1), batch, np.array([True]))
        assert np.isfinite(np.asarray(sums.loss)).all()
    assert int(state.step[0]) == 2
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), first, state.params)
    assert any(jax.tree.leaves(moved)), "two steps changed no parameter"
    out = steps.evaluate_batch(state, {**batch, "valid": np.array([[True, False]])})
    assert float(out["count"][0]) == 1.0


def test_configs_match_the_papers_recipe():
    iemocap = config_lib.load("configs/paper/iemocap.py:daamv1")
    assert (iemocap.loss, iemocap.batch_size, iemocap.optimizer.learning_rate) == (
        "focal",
        8,
        1e-4,
    )
    assert iemocap.cv.kind == "leave_one_group_out"
    cifar = config_lib.load("configs/paper/cifar100.py:daamv2")
    assert (cifar.batch_size, cifar.optimizer.learning_rate, len(cifar.seeds)) == (32, 1e-5, 5)
    ag = config_lib.load("configs/paper/ag_news.py:gqdaam")
    assert (ag.batch_size, ag.optimizer.learning_rate, len(ag.seeds)) == (32, 5e-5, 3)
    assert config_lib.load("configs/paper/iemocap.py:mha").model.layers == (22,)
    # The decoders are the paper's: parameter counts equal the authors' code (docs/design.md §7).
    expected = {("iemocap", "daamv1"): 336_412, ("iemocap", "daamv2"): 322_076,
                ("cifar100", "mha"): 6_877_820, ("ag_news", "gqdaam"): 3_615_276}  # fmt: skip
    for (experiment, variant), count in expected.items():
        path, classes, shape = EXPERIMENTS[experiment]
        steps = Steps(config_lib.load(f"{path}:{variant}"), classes, shape)
        params = steps.abstract_state(1).params  # one run: a leading axis of 1
        assert param_count.count_params(params) == count, (experiment, variant)


def test_unknown_variant_is_named(capsys):
    assert cli.main(["--config", "configs/paper/iemocap.py:daamv3", "--workdir", "x"]) == 2
    assert "daamv3" in capsys.readouterr().err
