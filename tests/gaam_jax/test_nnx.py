"""NNX layers (gaam_jax.nnx) against their Linen twins: parameters, numerics, gates, shardings.

Each NNX layer is built abstractly (``nnx.eval_shape``: no initialiser is compiled), given the
Linen twin's parameters with the converter, and compared with Linen under ``jax.jit`` (through
``nnx.split``/``nnx.merge``) and under ``nnx.jit``: outputs, gradients with respect to the inputs
and every parameter, the returned gates and the gate kept as ``nnx.Intermediate``.

Tolerance: the two sides run the same functional core and the same operations in the same order,
so they are the same program; two separately compiled programs may still differ in how XLA fuses
and reassociates float32 sums, by float32 rounding: F32 of each array's scale (bfloat16: BF16).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from arrays import bernoulli, normal
from flax import nnx
from flax.traverse_util import flatten_dict
from tolerances import BF16, F32, scaled_atol

import gaam_jax
import gaam_jax.nnx as gnnx
from gaam_jax import sharding

X = normal((2, 8, 12), seed=0)  # [batch, 8 layers, 12 features]
X16 = normal((2, 8, 16), seed=1)
KV = normal((2, 5, 6), seed=2)  # cross-attention keys/values: 5 tokens of width 6
MASK = bernoulli((2, 8, 12), seed=3, p=0.8)
CROSS_MASK = bernoulli((1, 1, 8, 5), seed=4, p=0.7)


def _floating(a):
    return isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating)


class Case:
    """A Linen layer, its NNX twin, the call's arguments and which gate keyword it takes."""

    def __init__(self, linen, make_nnx, args, gate_kw=None, dtype=jnp.float32):
        self.linen, self.make_nnx, self.args = linen, make_nnx, args
        self.gate_kw, self.dtype = gate_kw, dtype


def _rngs():
    return {"rngs": nnx.Rngs(0)}


def _cases():
    bf16 = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    gqgaam = dict(gaam_heads=2, embed_dim=16, query_heads=4, kv_heads=2)
    return {
        "paper": Case(
            gaam_jax.GaussianAdaptiveAttention(num_heads=4),
            lambda: gnnx.GaussianAdaptiveAttention(4, 12, **_rngs()),
            (X, MASK),
            "return_gate",
        ),
        "paper_one_pair_per_head": Case(
            gaam_jax.GaussianAdaptiveAttention(2, axis=1, feature_axis=None, variance="one_pass"),
            lambda: gnnx.GaussianAdaptiveAttention(
                2, 1, axis=1, feature_axis=None, variance="one_pass", **_rngs()
            ),
            (X, MASK),
            "return_gate",
        ),
        "mixture": Case(  # 3 heads over 8 layers: the last head takes the remainder
            gaam_jax.MixtureGaussianAdaptiveAttention(num_heads=3, num_gaussians=2),
            lambda: gnnx.MixtureGaussianAdaptiveAttention(3, 2, **_rngs()),
            (X, MASK),
            "return_gate",
        ),
        "block": Case(
            gaam_jax.GaussianBlock((1, -1), (4, 2), (3, 2)),
            lambda: gnnx.GaussianBlock((1, -1), (4, 2), (3, 2), **_rngs()),
            (X, MASK),
            "return_gates",
        ),
        "gqa_cross": Case(
            gaam_jax.GroupedQueryAttention(4, 2, 3, out_features=10),
            lambda: gnnx.GroupedQueryAttention(
                12, 4, 2, 3, kv_features=6, out_features=10, **_rngs()
            ),
            (X, KV, CROSS_MASK),
        ),
        "paper_code_gqa": Case(
            gaam_jax.PaperCodeGroupedQueryAttention(16, 4, 2),
            lambda: gnnx.PaperCodeGroupedQueryAttention(16, 4, 2, **_rngs()),
            (X16,),
        ),
        "gqgaam": Case(
            gaam_jax.GQGAAM(**gqgaam),
            lambda: gnnx.GQGAAM(12, **gqgaam, **_rngs()),
            (X,),
        ),
        "gqgaam_textbook_bfloat16": Case(
            gaam_jax.GQGAAM(**gqgaam, attention="textbook", **bf16),
            lambda: gnnx.GQGAAM(12, **gqgaam, attention="textbook", **bf16, **_rngs()),
            (X,),
            dtype=jnp.bfloat16,
        ),
    }


CASES = _cases()


def _linen_params(module, *args, seed=0):
    """Generic parameters for ``module`` (no zeros or ones left), in GAAM's well-conditioned range:
    xi near 2, c = exp(N(0, 0.3^2)), norm scales near 1, everything else 0.3 N(0, 1). Drawn with
    numpy at the shapes of an abstract init, so nothing is compiled."""
    abstract = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)
    centre = {"xi": 2.0, "scale": 1.0}

    def draw(path, a):
        name, z = path[-1].key, rng.standard_normal(a.shape)
        value = np.exp(0.3 * z) if name == "c" else centre.get(name, 0.0) + 0.3 * z
        return jnp.asarray(value.astype(a.dtype))

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _nnx_twin(case, params):
    model = nnx.eval_shape(case.make_nnx)  # abstract: the values come from Linen
    gnnx.load_linen_variables(model, {"params": params})
    return model


def _gate_tree(intermediates):
    """Linen's ``intermediates`` (sown tuples) in the layout of an NNX Intermediate state."""
    flat = flatten_dict(dict(intermediates))
    return {k: v[0] for k, v in flat.items()}


def _nnx_gates(model):
    state = nnx.state(model, nnx.Intermediate)
    return {tuple(str(k) for k in path): v.get_value() for path, v in nnx.to_flat_state(state)}


def _close(actual, expected, scale, *, whole_tree=False):
    """Leaves equal to ``scale`` times the expected leaf's largest magnitude (``whole_tree``: the
    largest magnitude in the whole expected tree)."""
    chex.assert_trees_all_equal_structs(actual, expected)
    leaves = [jnp.asarray(e, jnp.float32) for e in jax.tree.leaves(expected)]
    tree_max = max((float(jnp.max(jnp.abs(e))) for e in leaves), default=0.0)
    for a, e in zip(jax.tree.leaves(actual), leaves, strict=True):
        atol = scale * tree_max if whole_tree else scaled_atol(e, scale)
        chex.assert_trees_all_close(jnp.asarray(a, jnp.float32), e, rtol=0, atol=atol)


@functools.cache
def _linen_reference(name):
    """Linen's output, gate, gradients (inputs, parameters) and sown gates, compiled."""
    case = CASES[name]
    params = _linen_params(case.linen, *case.args)
    floats = tuple(a for a in case.args if _floating(a))
    out_shape = jax.eval_shape(case.linen.apply, {"params": params}, *case.args)
    cot = normal(out_shape.shape, seed=9)

    def call(floats):
        it = iter(floats)
        return [next(it) if _floating(a) else a for a in case.args]

    def loss(params, floats):
        kw = {case.gate_kw: True} if case.gate_kw else {}
        out, state = case.linen.apply(
            {"params": params}, *call(floats), mutable=["intermediates"], **kw
        )
        y, gate = out if case.gate_kw else (out, None)
        value = jnp.vdot(cot, y.astype(jnp.float32))
        return value, (y, gate, _gate_tree(state.get("intermediates", {})))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, aux), grads = grad(params, floats)
    return params, floats, call, cot, aux, grads


def _compare(case, aux, grads, reference_aux, reference_grads):
    scale = BF16 if case.dtype == jnp.bfloat16 else F32
    (y, gate, gates), (ref_y, ref_gate, ref_gates) = aux, reference_aux
    assert y.dtype == ref_y.dtype
    _close(y, ref_y, scale)
    _close(gate, ref_gate, F32)  # gates are float32 whatever the dtype
    _close(gates, ref_gates, F32)
    # A gradient that is zero in exact arithmetic (the key bias: softmax ignores a shift of all
    # logits) is pure rounding noise from the other terms: gradients are compared at the scale of
    # the whole gradient.
    _close(grads, reference_grads, scale, whole_tree=True)


@pytest.mark.parametrize("name", list(CASES))
def test_nnx_layer_equals_linen_under_jax_jit_and_nnx_jit(name):
    case = CASES[name]
    params, floats, call, cot, ref_aux, ref_grads = _linen_reference(name)
    model = _nnx_twin(case, params)
    # Converted both ways: the NNX model holds exactly the Linen parameters.
    chex.assert_trees_all_equal(gnnx.linen_variables(model), {"params": params})
    kw = {case.gate_kw: True} if case.gate_kw else {}

    def forward(m, floats):
        out = m(*call(floats), **kw)
        y, gate = out if case.gate_kw else (out, None)
        return jnp.vdot(cot, y.astype(jnp.float32)), (y, gate)

    # Plain jax.jit: the parameters as a state, the module rebuilt inside.
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)

    def loss(state, floats):
        m = nnx.merge(graphdef, state, rest)
        value, (y, gate) = forward(m, floats)
        return value, (y, gate, _nnx_gates(m))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, aux), (g_state, g_inputs) = grad(state, floats)
    _compare(case, aux, (nnx.to_pure_dict(g_state), g_inputs), ref_aux, ref_grads)

    # nnx.jit: the module itself; its gate comes out as an nnx.Intermediate.
    @nnx.jit
    def step(m, floats):
        return nnx.value_and_grad(forward, argnums=(0, 1), has_aux=True)(m, floats)

    (_, (y, gate)), (g_model, g_inputs) = step(model, floats)
    aux = (y, gate, _nnx_gates(model))
    _compare(case, aux, (nnx.to_pure_dict(g_model), g_inputs), ref_aux, ref_grads)


@pytest.mark.parametrize("name", list(CASES))
def test_sharding_metadata_gives_the_linen_partition_specs(name):
    case = CASES[name]
    mesh = sharding.make_mesh({"data": 2, "model": 4})
    expected = sharding.param_shardings(sharding.abstract_params(case.linen, *case.args), mesh)
    model = nnx.eval_shape(case.make_nnx)
    got = nnx.to_pure_dict(gnnx.param_shardings(model, mesh))
    assert jax.tree.map(lambda s: s.spec, got) == jax.tree.map(lambda s: s.spec, expected)


def test_param_shardings_place_the_state():
    mesh = sharding.make_mesh({"data": 2, "model": 4})
    model = gnnx.GaussianAdaptiveAttention(4, 12, rngs=nnx.Rngs(0))
    assert model.delta.get_metadata()["out_sharding"] == ("heads", "embed")
    params = nnx.state(model, nnx.Param)
    placed = jax.device_put(params, gnnx.param_shardings(params, mesh))
    assert placed["delta"].get_value().sharding.spec == jax.sharding.PartitionSpec("model", None)
    nnx.update(model, placed)
    y = nnx.jit(lambda m, x: m(x))(model, X)  # heads stay whole per device
    ref = gaam_jax.functional.gaussian_adaptive_attention(X, model.delta[...], model.xi[...])
    chex.assert_trees_all_close(y, ref, rtol=F32, atol=1e-6)


def test_initialisers_draw_the_linen_distributions():
    """Same initialisers, so (for other keys) the same distributions: constants equal, random
    draws with standard deviations within 6 sigma of the estimate's spread (1/sqrt(n))."""
    x = normal((2, 16, 64))
    kw = dict(gaam_heads=2, embed_dim=64, query_heads=4, kv_heads=2)
    pairs = [
        (gaam_jax.GQGAAM(**kw), lambda r: gnnx.GQGAAM(64, **kw, rngs=r)),
        (
            gaam_jax.GQGAAM(**kw, attention="textbook"),
            lambda r: gnnx.GQGAAM(64, **kw, attention="textbook", rngs=r),
        ),
        (
            gaam_jax.MixtureGaussianAdaptiveAttention(num_heads=16, num_gaussians=16),
            lambda r: gnnx.MixtureGaussianAdaptiveAttention(16, 16, rngs=r),
        ),
    ]

    @jax.jit  # one program draws both sides: one compilation
    def draw(key):
        linen = [m.init(key, x)["params"] for m, _ in pairs]
        nnx_params = [gnnx.linen_variables(make(nnx.Rngs(key)))["params"] for _, make in pairs]
        return linen, nnx_params

    linen, nnx_params = draw(jax.random.key(3))
    for lp, np_ in zip(linen, nnx_params, strict=True):
        flat_l, flat_n = flatten_dict(lp), flatten_dict(np_)
        assert set(flat_l) == set(flat_n)
        for path, a in flat_l.items():
            a, b = np.asarray(a, np.float64), np.asarray(flat_n[path], np.float64)
            assert a.shape == b.shape, path
            if np.all(a == a.flat[0]):
                np.testing.assert_array_equal(b, a, err_msg=str(path))
            else:
                ratio = b.std() / a.std()
                assert abs(ratio - 1) < 6 / np.sqrt(a.size), (path, ratio)


def test_intermediate_gate_pops_and_equals_return_gate():
    model = gnnx.GaussianBlock((1,), (4,), (2,), rngs=nnx.Rngs(0))
    model(2.0 * X)
    y, gates = model(X, return_gates=True)  # replaces the first call's gate, unlike sow
    popped = nnx.pop(model, nnx.Intermediate)
    chex.assert_trees_all_equal(nnx.to_pure_dict(popped), {"layer_0": {"gate": gates["layer_0"]}})
    assert not nnx.state(model, nnx.Intermediate)  # popped
    # Readable as gaam_jax.importance reads Linen's intermediates.
    model = gnnx.GaussianAdaptiveAttention(4, 12, rngs=nnx.Rngs(0))
    _, gate = model(X, return_gate=True)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Intermediate))
    chex.assert_trees_all_equal(gaam_jax.importance.find_gate(pure), gate)


@pytest.mark.parametrize(
    "params,message",
    [
        ({"delta": np.zeros((4, 10)), "xi": np.ones((4, 12))}, r"params/delta has shape \(4, 10\)"),
        ({"delta": np.zeros((4, 12))}, "params/xi is missing"),
        (
            {"delta": np.zeros((4, 12)), "xi": np.ones((4, 12)), "c": np.ones(2)},
            "params/c in the Linen variables is not in the model",
        ),
    ],
    ids=["shape", "missing", "unexpected"],
)
def test_mismatched_load_is_a_one_line_error_and_changes_nothing(params, message):
    model = gnnx.GaussianAdaptiveAttention(4, 12, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=message) as err:
        gnnx.load_linen_variables(model, {"params": params})
    assert "\n" not in str(err.value)
    chex.assert_trees_all_equal(model.delta[...], jnp.zeros((4, 12)))
    with pytest.raises(ValueError, match="expected Linen variables"):
        gnnx.load_linen_variables(model, params)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda r: gnnx.GaussianAdaptiveAttention(0, 4, rngs=r), "num_heads"),
        (lambda r: gnnx.GaussianAdaptiveAttention(2, 4, feature_axis=None, rngs=r), "must be 1"),
        (lambda r: gnnx.GaussianAdaptiveAttention(2, 4, variance="x", rngs=r), "variance"),
        (lambda r: gnnx.MixtureGaussianAdaptiveAttention(2, 2, eps=0.0, rngs=r), "eps"),
        (lambda r: gnnx.GaussianBlock((1, 1), (2,), (2, 2), rngs=r), "equal length"),
        (lambda r: gnnx.GroupedQueryAttention(8, 4, 3, 2, rngs=r), "multiple"),
        (lambda r: gnnx.GQGAAM(8, embed_dim=12, query_heads=8, rngs=r), "divisible"),
        (lambda r: gnnx.GQGAAM(8, attention="x", rngs=r), "attention"),
    ],
)
def test_invalid_constructor_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        nnx.eval_shape(lambda: make(nnx.Rngs(0)))


# --------------------------------------------------------------------------------------------
# The decoder, through nnx.bridge
# --------------------------------------------------------------------------------------------

XD = normal((4, 8, 12), seed=5)
DECODER = dict(num_classes=3, num_heads=2, conv_features=8, map_shape=(3, 4))


def _decoder_variables(linen, x, seed=0):
    variables = jax.eval_shape(linen.init, jax.random.key(0), x)
    params = _linen_params(linen, x, seed=seed)
    rng = np.random.default_rng(seed + 1)
    stats = jax.tree.map(  # running means anywhere, running variances positive
        lambda a: jnp.asarray(np.exp(0.3 * rng.standard_normal(a.shape)).astype(a.dtype)),
        variables.get("batch_stats", {}),
    )
    return {"params": params, **({"batch_stats": stats} if stats else {})}


@pytest.mark.parametrize("front", ["gaam", "mha_bn"])
def test_bridged_decoder_equals_linen(front):
    linen = gaam_jax.GaussianAdaptiveTransformer(front=front, **DECODER)
    variables = _decoder_variables(linen, XD)
    kwargs = {k: v for k, v in DECODER.items() if k != "num_classes"}
    model = nnx.eval_shape(
        lambda: gnnx.GaussianAdaptiveTransformer(3, XD, rngs=nnx.Rngs(0), front=front, **kwargs)
    )
    gnnx.load_linen_variables(model, variables)
    chex.assert_trees_all_equal(gnnx.linen_variables(model), variables)
    mutable = ["intermediates"] if front == "gaam" else ["batch_stats"]
    train = front == "mha_bn"  # BatchNorm on batch statistics, updating its running ones

    @jax.jit
    def linen_step(variables, x):
        def loss(params):
            out, state = linen.apply(
                {**variables, "params": params}, x, train=train, mutable=mutable
            )
            return jnp.sum(jnp.sin(out)), (out, state)

        return jax.value_and_grad(loss, has_aux=True)(variables["params"])

    (_, (ref_y, ref_state)), ref_grads = linen_step(variables, XD)
    ref_state = ref_state.get("intermediates") or ref_state.get("batch_stats")

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def split_step(params, rest, x):
        def loss(params):
            m = nnx.merge(graphdef, params, rest)
            out = m(x, train=train, mutable=mutable)
            kind = nnx.Intermediate if front == "gaam" else nnx.BatchStat
            return jnp.sum(jnp.sin(out)), (out, nnx.to_pure_dict(nnx.state(m, kind)))

        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, (y, state)), grads = split_step(params, rest, XD)
    _close(y, ref_y, F32)
    _close(state, ref_state, F32)
    _close(nnx.to_pure_dict(grads), ref_grads, F32, whole_tree=True)

    @nnx.jit
    def nnx_step(m, x):
        return nnx.value_and_grad(
            lambda m: jnp.sum(jnp.sin(m(x, train=train, mutable=mutable))), argnums=0
        )(m)

    _, grads = nnx_step(model, XD)
    _close(nnx.to_pure_dict(grads), ref_grads, F32, whole_tree=True)
    kind = nnx.Intermediate if front == "gaam" else nnx.BatchStat
    _close(nnx.to_pure_dict(nnx.state(model, kind)), ref_state, F32)

    mesh = sharding.make_mesh({"data": 2, "model": 4})
    expected = sharding.param_shardings(sharding.abstract_params(linen, XD), mesh)
    got = nnx.to_pure_dict(gnnx.param_shardings(model, mesh))
    assert jax.tree.map(lambda s: s.spec, got) == jax.tree.map(lambda s: s.spec, expected)


def test_bridged_decoder_initialises_as_linen():
    model = gnnx.GaussianAdaptiveTransformer(
        3, XD, rngs=nnx.Rngs(0), **{k: v for k, v in DECODER.items() if k != "num_classes"}
    )
    assert isinstance(model, nnx.bridge.ToNNX)
    params = gnnx.linen_variables(model)["params"]
    linen = gaam_jax.GaussianAdaptiveTransformer(**DECODER)
    shapes = jax.eval_shape(linen.init, jax.random.key(0), XD)["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda a: a.shape, shapes)
    chex.assert_trees_all_equal(params["attention"]["xi"], jnp.full((2, 12), 2.0))
    assert set(nnx.to_pure_dict(nnx.state(model))) == set(params)  # no RNG state is kept
    logits = model(XD)
    chex.assert_trees_all_close(logits, linen.apply({"params": params}, XD), rtol=F32, atol=1e-6)
