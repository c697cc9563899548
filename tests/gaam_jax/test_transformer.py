"""The Gaussian Adaptive Transformer decoder: fronts, shapes, parameter counts, BatchNorm, gates."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from arrays import init, normal

from gaam_jax import GQGAAM, GaussianAdaptiveTransformer, decoder_param_counts, importance
from gaam_jax.transformer import FRONTS, square_map_shape

X = normal((4, 8, 64))  # [batch, 8 layers, 64 features]


def _small(front, **kw):
    kw.setdefault("num_heads", 2 if front != "gqgaam" else 4)
    return GaussianAdaptiveTransformer(
        num_classes=3, front=front, conv_features=16, attention_dim=32, **kw
    )


@functools.cache
def _front(front):
    """A small decoder of ``front``, its variables and its compiled evaluation forward (shared
    by the tests below: initialising and compiling dominate their time)."""
    model = _small(front)
    return model, init(model, 1, X), jax.jit(model.apply)


@pytest.mark.parametrize("front", FRONTS)
def test_every_front_gives_logits(front):
    _, variables, apply = _front(front)
    logits = apply(variables, X)
    chex.assert_shape(logits, (4, 3))
    chex.assert_tree_all_finite(logits)


# Counts from the authors' code (docs/design.md section 6): (name, model, input, total, no fc).
PAPER_COUNTS = [
    ("IEMOCAP DAAMv1", dict(num_classes=4, num_heads=8), (24, 1024), 336_412, 238_104),
    ("IEMOCAP DAAMv2", dict(num_classes=4, num_heads=1), (24, 1024), 322_076, 223_768),
    ("CIFAR-100 MHA", dict(num_classes=100, front="mha"), (24, 1024), 6_877_820, 4_420_120),
    ("CIFAR-100 MHA+BN", dict(num_classes=100, front="mha_bn"), (24, 1024), 6_877_868, 4_420_168),
    (
        "IEMOCAP GQDAAM",
        dict(num_classes=4, front="gqgaam", map_shape=(8, 64)),
        (24, 1024),
        1_272_348,
        1_223_192,
    ),
    (
        "AG News GQDAAM",
        dict(num_classes=4, front="gqgaam", map_shape=(64, 8)),
        (40, 5120),
        3_615_276,
        3_533_352,
    ),
    ("AG News DAAMv1", dict(num_classes=4, num_heads=8), (40, 5120), 1_270_316, 451_112),
    ("AG News DAAMv2 (true g=1)", dict(num_classes=4, num_heads=1), (40, 5120), 1_198_636, 379_432),
]


@pytest.mark.parametrize("name,kwargs,shape,total,without_fc", PAPER_COUNTS, ids=lambda v: v)
def test_parameter_counts_match_the_authors_code(name, kwargs, shape, total, without_fc):
    counts = decoder_param_counts(GaussianAdaptiveTransformer(**kwargs), (1, *shape))
    assert counts["total"] == total, name
    assert counts["without_classifier"] == without_fc, name


@pytest.mark.parametrize("heads,d", [(8, 1024), (8, 5120), (1, 1024), (1, 5120), (4, 64)])
def test_daam_only_count_is_2_h_d(heads, d):
    counts = decoder_param_counts(
        GaussianAdaptiveTransformer(num_classes=2, num_heads=heads, conv_features=8), (1, 8, d)
    )
    assert counts["attention"] == 2 * heads * d


def test_mixture_front_has_the_papers_64_parameters():
    model = GaussianAdaptiveTransformer(num_classes=4, front="mixture", num_heads=8)
    assert decoder_param_counts(model, (1, 24, 1024))["attention"] == 64


@pytest.mark.parametrize("front", ["gaam", "mha", "mha_bn", "gqgaam", "mixture"])
def test_samples_are_independent_in_evaluation(front):
    # Attention runs over the layer tokens of each sample, never across the minibatch (the
    # released MHA code's bug), so a sample's logits do not depend on its batch-mates.
    _, variables, apply = _front(front)
    full = apply(variables, X)
    alone = apply(variables, X[:1])
    other = apply(variables, jnp.concatenate([X[:1], 5.0 * X[1:]]))
    chex.assert_trees_all_close(full[:1], alone, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(other[:1], alone, rtol=1e-5, atol=1e-6)


def test_mha_bn_uses_batch_statistics_only_in_training():
    model, variables, apply = _front("mha_bn")
    stats0 = variables["batch_stats"]["batch_norm"]
    chex.assert_shape((stats0["mean"], stats0["var"]), (8,))  # one per layer channel
    # Training: batch statistics, so sample 0 depends on its batch-mates; running stats move.
    train = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    y1, s1 = train(variables, X)
    y2, _ = train(variables, jnp.concatenate([X[:1], 3.0 * X[1:] + 1.0]))
    assert float(jnp.max(jnp.abs(y1[0] - y2[0]))) > 1e-4
    assert float(jnp.max(jnp.abs(s1["batch_stats"]["batch_norm"]["mean"]))) > 0.0
    # Evaluation: running averages, which with a fresh model are mean 0, var 1.
    y_eval = apply(variables, X)
    y_eval_alone = apply(variables, X[:1])
    chex.assert_trees_all_close(y_eval[:1], y_eval_alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="batch_stats"):  # flax refuses to update immutably
        jax.eval_shape(functools.partial(model.apply, train=True), variables, X)


@pytest.mark.parametrize("front", ["gaam", "gqgaam", "mixture"])
def test_gate_is_sown_for_the_importance_factor(front):
    model, variables, _ = _front(front)
    _, inter = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))(variables, X)
    gate = importance.find_gate(inter)
    chex.assert_shape(gate, X.shape)
    assert gate.dtype == jnp.float32


@pytest.mark.parametrize("front", ["gaam", "gqgaam"])
def test_variance_reaches_the_gaam_of_every_front(front):
    # Features of magnitude ~3000 (Llama-like hidden states): the one-pass estimator
    # E[x^2] - E[x]^2 cancels catastrophically in float32, the shifted one does not, so the
    # two must give different logits whenever the front really uses the configured estimator.
    x = normal((4, 8, 64), seed=7, shift=3000.0)
    logits, attention = {}, {}
    for variance in ("shifted", "one_pass"):
        model = _small(front, variance=variance)
        variables = init(model, 8, x)  # same key: same parameters
        apply = functools.partial(
            model.apply, capture_intermediates=True, mutable=["intermediates"]
        )
        logits[variance], inter = jax.jit(apply)(variables, x)
        attention[variance] = (variables["params"]["attention"], inter["intermediates"])
    assert float(jnp.max(jnp.abs(logits["shifted"] - logits["one_pass"]))) > 1e-2
    if front == "gqgaam":
        # The decoder's front is exactly a GQGAAM built with the same variance (both sides
        # compiled, as the decoder's intermediates are: bit for bit).
        for variance, (params, inter) in attention.items():
            gq = GQGAAM(gaam_heads=4, embed_dim=32, variance=variance)
            np.testing.assert_array_equal(
                jax.jit(gq.apply)({"params": params}, x), inter["attention"]["__call__"][0]
            )


def test_decoder_init_is_xavier_uniform_with_torch_default_biases():
    model = GaussianAdaptiveTransformer(num_classes=4, num_heads=8, conv_features=512)
    params = init(model, 5, jnp.zeros((1, 24, 1024)))["params"]
    k1 = np.asarray(params["conv1"]["kernel"])  # [3, 3, 24, 512]
    bound = np.sqrt(6.0 / (24 * 9 + 512 * 9))
    assert np.abs(k1).max() <= bound and np.abs(k1).max() > 0.99 * bound
    np.testing.assert_allclose(k1.std(), bound / np.sqrt(3), rtol=0.02)
    b1 = np.asarray(params["conv1"]["bias"])
    assert np.abs(b1).max() <= 1 / np.sqrt(24 * 9) and np.abs(b1).max() > 0.9 / np.sqrt(24 * 9)
    fc = np.asarray(params["classifier"]["kernel"])
    np.testing.assert_allclose(fc.std(), np.sqrt(2.0 / (24 * 1024 + 4)), rtol=0.02)
    chex.assert_trees_all_equal(params["attention"]["xi"], jnp.full((8, 1024), 2.0))


def test_bfloat16_compute():
    model = _small("gaam", dtype=jnp.bfloat16)
    logits = jax.jit(model.apply)(init(model, 6, X), X)
    assert logits.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(logits)


def test_square_map_shapes_are_the_papers():
    assert square_map_shape(1024) == (32, 32)
    assert square_map_shape(5120) == (64, 80)
    assert square_map_shape(7) == (1, 7)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: GaussianAdaptiveTransformer(num_classes=2, front="lstm"), "front must be one of"),
        (lambda: GaussianAdaptiveTransformer(num_classes=0), "num_classes"),
    ],
)
def test_invalid_configs(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_inputs():
    model = _small("gaam", map_shape=(5, 5))
    with pytest.raises(ValueError, match=r"map_shape \(5, 5\) does not hold the 64"):
        jax.eval_shape(model.init, jax.random.key(0), X)  # checked while tracing
    with pytest.raises(ValueError, match="batch, layers, features"):
        jax.eval_shape(_small("gaam").init, jax.random.key(0), X[0])
    with pytest.raises(ValueError, match="cannot be split into 3 equal heads"):
        jax.eval_shape(_small("gaam", num_heads=3).init, jax.random.key(0), X)


def test_layer_selection_keeps_the_named_layers():
    x = normal((3, 6, 64))
    picked = GaussianAdaptiveTransformer(2, num_heads=1, conv_features=4, layers=(4, 1, 2))
    plain = GaussianAdaptiveTransformer(2, num_heads=1, conv_features=4)
    variables = init(picked, 1, x)
    chex.assert_trees_all_close(
        jax.jit(picked.apply)(variables, x),
        jax.jit(plain.apply)(variables, x[:, jnp.array([4, 1, 2])]),
    )  # the same computation on the same values: exact
    assert variables["params"]["attention"]["delta"].shape == (1, 64)
    with pytest.raises(ValueError, match="out of range for inputs with 6 layers"):
        jax.eval_shape(GaussianAdaptiveTransformer(2, layers=(6,)).init, jax.random.key(1), x)
    with pytest.raises(ValueError, match="distinct"):
        GaussianAdaptiveTransformer(2, layers=(1, 1))
