"""DoRA and per-module ranks and alphas, on models built from Flax's own layers (Linen and NNX).

The Linen model has every projection kind the adapters know: an ``Einsum`` (and one whose
kernel axis ``n`` is shared by input and output), ``DenseGeneral`` s with several output and
several input axes, a ``Dense`` without bias and a ``Dense`` stacked by ``nn.scan``; its biases
are moved off zero so that DoRA's ``y - bias`` is exercised. The formula itself was checked
against peft 0.21.2's DoRA on a torch ``Linear`` (output and gradients of A, B and the
magnitude to 5e-7) when it was written; these tests need no torch.
"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import load_file
from tolerances import F32, scaled_atol

from gaam_jax.adapters import COLLECTION, LoRA, adapt, init_magnitudes, merge, merge_model

B, T, F, D, H, L = 3, 4, 5, 6, 2, 2
TARGETS = r"^(embed|query|out|per_head|nobias)$|layers/mlp$"
DORA = LoRA(rank=2, alpha=4.0, targets=TARGETS, use_dora=True)


class Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.Dense(D, name="mlp")(h), None


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Einsum((F, D), "btf,fd->btd", name="embed")(x)
        q = nn.DenseGeneral((H, D // H), name="query")(h)  # kernel [D, H, D/H]
        p = nn.Einsum((H, D // H, 3), "btnh,nhk->btnk", name="per_head")(q)  # n: per head
        h = h + nn.DenseGeneral(D, axis=(-2, -1), name="out")(p)  # kernel [H, 3, D]
        h = nn.Dense(D, use_bias=False, name="nobias")(h)
        layers = nn.scan(
            Layer,
            variable_axes={"params": 0, COLLECTION: 0},
            split_rngs={"params": True},
            length=L,
        )
        h, _ = layers(name="layers")(h, None)
        return h


def _x(seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, T, F)), jnp.float32)


def _moved(tree, seed, scale=0.3, only=None):
    """Leaves (those whose last key is in ``only``, or all) moved off their values, by numpy
    noise: no RNG program to compile (XLA:CPU spends seconds on each threefry kernel)."""
    rng = np.random.default_rng(seed)
    return unflatten_dict(
        {
            p: v + scale * rng.normal(size=v.shape).astype(np.float32)
            if only is None or p[-1] in only
            else v
            for p, v in flatten_dict(tree).items()
        }
    )


_BASE = jax.jit(LinenModel().apply)


def _filled(shapes, seed, zero=()):
    """Arrays of ``shapes`` (ShapeDtypeStruct s) drawn by numpy; the ``zero`` leaves zeros."""
    zeros = {p: np.zeros(v.shape, np.float32) for p, v in flatten_dict(shapes).items()}
    moved = _moved(unflatten_dict(zeros), seed)
    return unflatten_dict(
        {p: v for p, v in flatten_dict(moved).items() if p[-1] not in zero}
        | {p: v for p, v in zeros.items() if p[-1] in zero}
    )


@functools.cache
def _linen(lora=DORA):
    """The adapted model's jitted apply, its adapters (magnitudes of ``params``), params, x."""
    x = _x()
    params = _filled(jax.eval_shape(LinenModel().init, jax.random.key(0), x)["params"], 0)
    model = adapt(LinenModel(), lora=lora)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)[COLLECTION]
    adapters = init_magnitudes(params, _filled(shapes, 1, zero=("lora_b",)), lora)

    @jax.jit
    def run(params, adapters, x):
        return model.apply({"params": params, COLLECTION: adapters}, x)

    return model, run, adapters, params, x


def test_linen_dora_magnitudes_are_kernel_norms_and_dora_starts_as_the_base():
    _, run, adapters, params, x = _linen()
    mags = {"/".join(k[:-1]): v for k, v in flatten_dict(adapters).items()
            if k[-1] == "lora_magnitude"}  # fmt: skip
    kernels = {"/".join(k[:-1]): v for k, v in flatten_dict(params).items() if k[-1] == "kernel"}
    # Dense: [out]; DenseGeneral: the output dims; Einsum: contracted dims kept as 1; scan: stacked.
    shapes = {"embed": (1, D), "query": (H, D // H), "per_head": (H, 1, 3), "out": (D,),
              "nobias": (D,), "layers/mlp": (L, D)}  # fmt: skip
    assert {k: v.shape for k, v in mags.items()} == shapes
    in_axes = {"embed": (0,), "query": (0,), "per_head": (1,), "out": (0, 1), "nobias": (0,),
               "layers/mlp": (1,)}  # fmt: skip
    for path, axes in in_axes.items():
        want = np.sqrt(np.sum(np.square(kernels[path]), axis=axes)).reshape(shapes[path])
        np.testing.assert_allclose(mags[path], want, rtol=1e-6, err_msg=path)
    want = _BASE({"params": params}, x)
    np.testing.assert_allclose(run(params, adapters, x), want, atol=scaled_atol(want, 1e-6))


def test_linen_dora_merged_equals_unmerged_and_every_factor_gets_a_gradient():
    _, run, adapters, params, x = _linen()
    adapters = _moved(adapters, 3)  # B off zero, m off ||W||
    unmerged = run(params, adapters, x)
    merged = _BASE({"params": merge(params, adapters, DORA)}, x)
    np.testing.assert_allclose(merged, unmerged, atol=scaled_atol(unmerged, F32))
    assert not np.allclose(unmerged, _BASE({"params": params}, x), atol=1e-3)
    grads = jax.jit(jax.grad(lambda a: jnp.sum(run(params, a, x) ** 2)))(adapters)
    for path, g in flatten_dict(grads).items():
        assert np.abs(np.asarray(g)).max() > 0, path
    with pytest.raises(ValueError, match="use_dora=False"):
        merge(params, adapters, LoRA(rank=2, alpha=4.0, targets=TARGETS))


def _numpy_init(key, shape, dtype=jnp.float32):
    """A kernel initialiser drawn by numpy (the key unused): no RNG program to compile."""
    return jnp.asarray(np.random.default_rng(sum(shape)).normal(size=shape) / 2, dtype)


class OneDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, kernel_init=_numpy_init, name="lin")(x)


def _dora_reference(x, kernel, bias, a, b, m, scale, detach):
    """DoRA written out: the norm is a constant for the gradient (peft) or not (detach off)."""
    norm = jnp.linalg.norm(kernel + scale * a @ b, axis=0)
    norm = jax.lax.stop_gradient(norm) if detach else norm
    f = m / norm
    xw = x @ kernel
    return xw + bias[None] + (f - 1)[None] * xw + f[None] * scale * (x @ a @ b)


def test_dora_gradient_treats_the_weight_norm_as_a_constant():
    lora = LoRA(rank=2, alpha=4.0, targets="^lin$", use_dora=True)
    x = _x()[0]
    model = adapt(OneDense(), lora=lora)
    variables = model.init(jax.random.key(1), x)
    # The interceptor initialises the magnitude from the kernel beside it.
    kernel = variables["params"]["lin"]["kernel"]
    magnitude = variables[COLLECTION]["lin"]["lora_magnitude"]
    np.testing.assert_allclose(magnitude, np.linalg.norm(kernel, axis=0), rtol=1e-6)
    params = _moved(variables["params"], 1, only=("bias",))
    adapters = _moved(variables[COLLECTION], 2)
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(T, 3)), jnp.float32)
    k, bias = params["lin"]["kernel"], params["lin"]["bias"]

    def ours(ad):
        return jnp.sum(weights * model.apply({"params": params, COLLECTION: ad}, x))

    def reference(ad, detach):
        f = ad["lin"]
        y = _dora_reference(x, k, bias, f["lora_a"], f["lora_b"], f["lora_magnitude"], 2.0, detach)
        return jnp.sum(weights * y)

    got = jax.jit(jax.grad(ours))(adapters)["lin"]
    want = jax.jit(jax.grad(reference), static_argnums=1)(adapters, True)["lin"]
    attached = jax.jit(jax.grad(reference), static_argnums=1)(adapters, False)["lin"]
    np.testing.assert_allclose(ours(adapters), reference(adapters, True), rtol=1e-5)
    for name in ("lora_a", "lora_b", "lora_magnitude"):
        np.testing.assert_allclose(got[name], want[name], atol=scaled_atol(want[name], F32))
    for name in ("lora_a", "lora_b"):  # a norm left in the graph would change these
        assert not np.allclose(got[name], attached[name], atol=1e-3), name


# --- NNX ---------------------------------------------------------------------------------


class NnxModel(nnx.Module):
    def __init__(self, rngs):
        init = {"kernel_init": _numpy_init, "rngs": rngs}
        self.embed = nnx.Einsum("btf,fd->btd", (F, D), (D,), **init)
        self.query = nnx.LinearGeneral(D, (H, D // H), **init)
        self.out = nnx.LinearGeneral((H, D // H), D, axis=(-2, -1), **init)
        self.nobias = nnx.Linear(D, D, use_bias=False, **init)

    def __call__(self, x):
        h = self.embed(x)
        return self.nobias(h + self.out(self.query(h)))


def _nnx(lora):
    base = NnxModel(nnx.Rngs(0))
    for layer in (base.embed, base.query, base.out):
        layer.bias[...] = _numpy_init(None, layer.bias.shape)
    return base, adapt(base, lora=lora, rngs=nnx.Rngs(1))


def test_nnx_dora_starts_as_the_base_gets_gradients_and_merges():
    lora = LoRA(rank=2, alpha=4.0, targets=TARGETS, use_dora=True)
    base, model = _nnx(lora)
    x = _x()
    assert model.query.lora_magnitude.shape == (H, D // H)
    assert isinstance(model.embed.lora_magnitude, nnx.LoRAParam)
    kernel = np.asarray(base.out.kernel[...]).reshape(D, D)  # [H, D/H, D]: norm over H, D/H
    np.testing.assert_allclose(model.out.lora_magnitude[...], np.linalg.norm(kernel, axis=0), 1e-6)
    want = base(x)
    np.testing.assert_allclose(model(x), want, atol=scaled_atol(want, 1e-6))
    nnx.update(model, _moved(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)), 4))
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    grads = jax.jit(jax.grad(lambda a: jnp.sum(nnx.merge(graphdef, a, rest)(x) ** 2)))(adapters)
    flat = flatten_dict(nnx.to_pure_dict(grads))
    assert sum(k[-1] == "lora_magnitude" for k in flat) == 4
    for path, g in flat.items():
        assert np.abs(np.asarray(g)).max() > 0, path
    merged = merge_model(model)
    assert not nnx.to_pure_dict(nnx.state(merged, nnx.LoRAParam))
    unmerged = model(x)
    np.testing.assert_allclose(merged(x), unmerged, atol=scaled_atol(unmerged, F32))


# --- per-module ranks and alphas ---------------------------------------------------------

PATTERNS = LoRA(
    rank=2, alpha=4.0, targets=TARGETS, scaling="rslora",
    rank_pattern={"query": 3, "layers/mlp": 4}, alpha_pattern={"(out|mlp)": 9.0},
)  # fmt: skip


def test_rank_and_alpha_patterns_match_suffixes_at_path_boundaries():
    lora = LoRA(rank=2, rank_pattern={"query": 4, "b.*/value": 3, "attn/(key|value)": 5})
    assert lora.rank_pattern == (("query", 4), ("b.*/value", 3), ("attn/(key|value)", 5))
    assert lora == LoRA(rank=2, rank_pattern=lora.rank_pattern)  # a dict or pairs: one value
    assert hash(lora) == hash(LoRA(rank=2, rank_pattern=[list(p) for p in lora.rank_pattern]))
    paths = ("query", "attn/query", "attn/xquery", "query/x", "blocks/0/value", "attn/value",
             "attn/key", "key")  # fmt: skip
    got = {p: lora.rank_for(p) for p in paths}
    # The first key that matches wins: "b.*/value" needs a "b" in the path's last two parts.
    assert got == {"query": 4, "attn/query": 4, "attn/xquery": 2, "query/x": 2,
                   "blocks/0/value": 3, "attn/value": 5, "attn/key": 5, "key": 2}  # fmt: skip
    assert PATTERNS.scale_for("query") == pytest.approx(4.0 / np.sqrt(3))
    assert PATTERNS.scale_for("layers/mlp") == pytest.approx(9.0 / 2.0)
    assert PATTERNS.scale_for("out") == pytest.approx(9.0 / np.sqrt(2))
    assert PATTERNS.scale_for("embed") == PATTERNS.scale == pytest.approx(4.0 / np.sqrt(2))
    for bad, match in (({"(": 2}, "not a regular expression"), ({"q": 0}, "positive integer"),
                       ("query", "map regular expressions")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            LoRA(rank_pattern=bad)
    with pytest.raises(ValueError, match="must be a number"):
        LoRA(alpha_pattern={"q": "8"})


def test_patterns_give_each_path_its_shapes_and_scale_in_linen_nnx_and_merge():
    _, run, adapters, params, x = _linen(PATTERNS)
    flat = flatten_dict(adapters)
    ranks = {"/".join(k[:-1]): v.shape[-1] for k, v in flat.items() if k[-1] == "lora_a"}
    assert ranks == {"embed": 2, "query": 3, "per_head": 2, "out": 2, "nobias": 2, "layers/mlp": 4}
    assert flat[("layers", "mlp", "lora_b")].shape == (L, 4, D)
    moved = _moved(adapters, 2)
    unmerged = run(params, moved, x)
    merged = _BASE({"params": merge(params, moved, PATTERNS)}, x)
    np.testing.assert_allclose(merged, unmerged, atol=scaled_atol(unmerged, F32))
    # Another alpha for one path: merging must use it (the merged model differs).
    other = LoRA(rank=2, alpha=4.0, targets=TARGETS, scaling="rslora",
                 rank_pattern=PATTERNS.rank_pattern, alpha_pattern={"out": 9.0})  # fmt: skip
    assert not np.allclose(_BASE({"params": merge(params, moved, other)}, x), merged)
    with pytest.raises(ValueError, match="has rank 4, the LoRA gives it 2"):
        merge(params, moved, LoRA(rank=2, alpha=4.0, targets=TARGETS))
    _, nnx_model = _nnx(PATTERNS)
    assert nnx_model.query.lora_a.shape == (D, 3) and nnx_model.query.lora_b.shape == (3, H, D // H)
    assert nnx_model.out.lora_scale == pytest.approx(9.0 / np.sqrt(2))
    assert nnx_model.embed.lora_scale == pytest.approx(PATTERNS.scale)


def test_dora_is_refused_on_an_einsum_without_per_output_magnitudes():
    class Summed(nn.Module):  # k is summed over in the kernel alone: no output axis carries it
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((F, 2), "btf,fk->bt", use_bias=False, name="embed")(x)

    with pytest.raises(ValueError, match="DoRA at 'embed'"):
        adapt(Summed(), lora=DORA).init(jax.random.key(0), _x())


# --- configs and fine-tuning -------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    ["configs/finetune.py:dora_r4", "configs/finetune.py:dora_r4,runlocal",
     "configs/paper/iemocap.py:dora_r4", "configs/paper/cifar100.py:dora_r4,paper_faithful",
     "configs/paper/ag_news.py:dora_r4,runlocal"],
)  # fmt: skip
def test_dora_r4_configs_load(spec):
    from train import config as config_lib
    from train import finetune

    c = config_lib.load(spec)
    lora = finetune.adapters_from_config(c.adapters).lora
    assert (lora.rank, lora.use_dora, lora.rank_pattern, lora.alpha_pattern) == (4, True, (), ())


def test_config_patterns_and_optimizer_groups():
    from train import config as config_lib
    from train import finetune

    c = config_lib.load(
        "configs/finetune.py:lora_r4",
        ["adapters.rank_pattern=(('query', 8),)", "adapters.alpha_pattern=(('value', 4.0),)"],
    )
    lora = finetune.adapters_from_config(c.adapters).lora
    assert lora.rank_for("layers/query") == 8 and lora.alpha_for("layers/value") == 4.0
    assert not lora.use_dora
    recorded = c.adapters.copy_and_resolve_references()
    recorded.rank_pattern = [["query", 8]]  # as a recorded config.json gives it back
    assert finetune.adapters_from_config(recorded).lora == lora
    old = c.adapters.copy_and_resolve_references()
    with old.unlocked():  # a config recorded before these keys existed
        del old["use_dora"], old["rank_pattern"], old["alpha_pattern"]
    assert finetune.adapters_from_config(old).lora == LoRA(rank=4, alpha=16.0)
    # peft's LoRA+ puts the (1-D) magnitude vectors in B's group.
    model = finetune.FineTuneModel(None, None, None, None, trainable_head="classifier")
    params = {"head": {"classifier": {"kernel": 0}},
              "adapters": {"encoder": {"layers": {"query": {n: 0 for n in
                           ("lora_a", "lora_b", "lora_magnitude")}}}}}  # fmt: skip
    labels = model.labels(params)["adapters"]["encoder"]["layers"]["query"]
    assert labels == {"lora_a": "lora_a", "lora_b": "lora_b", "lora_magnitude": "lora_b"}


@pytest.mark.slow
def test_dora_finetuning_run_starts_from_the_base_and_exports_merged(tmp_path, tfds_dir):
    """configs/finetune.py:dora_r4,runlocal on the tiny BERT: the magnitudes start at the
    pretrained kernels' norms (not the random init's), the run's PEFT adapter (DoRA magnitudes
    as lora_magnitude_vector) gives its logits through classifier_from_pretrained, and the
    exported (merged) program equals the unmerged logits."""
    from model_folders import tiny_bert_folder

    from gaam_jax.adapters import peft
    from gaam_jax.encoders import classifier_from_pretrained, from_pretrained
    from train import config as config_lib
    from train import finetune, trainer
    from train.inference import Predictor, load_exported

    c = config_lib.load("configs/finetune.py:dora_r4,runlocal")
    c.encoder.path = str(tiny_bert_folder(tmp_path / "bert"))
    c.dataset_paths.pang_lee_polarity = str(tfds_dir)
    checked = trainer.check(c, tmp_path / "run")
    model = finetune.build_model(c, 2, finetune.example_of(checked.datasets[0]))
    init = jax.jit(model.init)(jax.random.key(0), jax.tree.map(jnp.zeros_like, model.example))
    base = from_pretrained(c.encoder.path).params
    for name in ("query", "value"):
        m = init["params"]["adapters"]["encoder"]["layers"][name]["lora_magnitude"]
        want = np.linalg.norm(np.asarray(base["layers"][name]["kernel"]), axis=1)
        np.testing.assert_allclose(m, want, rtol=1e-6)
    trainer.run(c, tmp_path / "run", progress=False, checked=checked)
    run = tmp_path / "run" / "pang_lee_polarity" / "seed0_fold1"
    raw = json.loads((run / "adapter" / peft.CONFIG_FILE).read_text())
    assert raw["use_dora"] and raw["task_type"] == "SEQ_CLS"
    keys = load_file(run / "adapter" / peft.WEIGHTS_FILE)
    layer0 = "base_model.model.bert.encoder.layer.0.attention.self."
    assert layer0 + "query.lora_magnitude_vector" in keys
    predictor = Predictor.from_run(run)
    inputs = predictor.preprocess(["a moving , beautifully acted film .", "tedious and flat ."])
    logits = predictor.logits(**inputs)
    clf = classifier_from_pretrained(c.encoder.path, adapter=run / "adapter")
    np.testing.assert_allclose(clf.logits(**inputs), logits, rtol=0, atol=1e-5)
    exported = load_exported(predictor.export(tmp_path / "model.jaxexport"))
    np.testing.assert_allclose(exported(**inputs), logits, rtol=1e-5, atol=1e-5)
