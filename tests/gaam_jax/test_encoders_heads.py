"""Classification heads (gaam_jax.encoders.heads) against transformers 5.24's classification models.

Fixtures (tests/fixtures/heads/<arch>/<variant>/, written by tests/reference/make_head_fixtures.py)
are tiny random ``BertForSequenceClassification``, ``BeitForImageClassification`` (mean and CLS
pooling), ``WavLMForSequenceClassification`` (post-norm, pre-norm, weighted layer sum) and
``LlamaForSequenceClassification`` checkpoints with every parameter perturbed, and their eval-mode
logits for batches with padded rows. Our path is the project's own: ``from_pretrained`` of the
folder, then ``classifier_from_encoder`` with the checkpoint's tensors (``head_params_from_hf``),
so every head parameter in the comparison comes from the checkpoint.
"""

from __future__ import annotations

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from gaam_jax import GaussianAdaptiveTransformer, count_params
from gaam_jax.adapters import Adapters, LoRA
from gaam_jax.encoders import checkpoint, from_pretrained, pooling
from gaam_jax.encoders import heads as H

ROOT = pathlib.Path(__file__).parents[1] / "fixtures" / "heads"
CASES = [
    ("bert", "cls"),
    ("beit", "mean"),
    ("beit", "cls"),
    ("wavlm", "base"),
    ("wavlm", "stable"),
    ("wavlm", "weighted"),
    ("llama", "pad"),
]
INPUTS = {
    "bert": ("input_ids", "attention_mask", "token_type_ids"),
    "beit": ("pixel_values",),
    "wavlm": ("input_values", "attention_mask"),
    "llama": ("input_ids", "attention_mask"),
}

# float32 on CPU: the encoders match transformers' hidden states to <= 1e-6 of their scale (their
# own tests), and the heads add a handful of float32 operations (a LayerNorm, one or two small
# matmuls, tanh, a softmax) done in another order (masked mean before the projector instead of
# after; sum of pooled means instead of mean of the weighted sum). Measured: <= 1e-6 of
# max |logit|; 1e-4 (the encoders' F32_RTOL) leaves room for other BLAS backends, while a wrong
# pooling, mask or norm moves the logits by 1e-2 or more (test_wrong_pooling_is_detected).
F32_RTOL = 1e-4


def _io(arch: str, variant: str) -> dict[str, np.ndarray]:
    with np.load(ROOT / arch / variant / "io.npz") as data:
        return dict(data)


@functools.cache
def _encoder(arch: str, variant: str):
    return from_pretrained(ROOT / arch / variant, attention="xla")


def _build(arch: str, variant: str, **kwargs):
    """``(encoder, classifier, params)``: the encoder loaded once per folder, the head from it."""
    encoder = _encoder(arch, variant)
    tensors = checkpoint.open_tensors(ROOT / arch / variant)
    classifier, params = H.classifier_from_encoder(encoder, tensors=tensors, **kwargs)
    return encoder, classifier, params


def _apply(classifier, variables, inputs, **kwargs):
    return jax.jit(functools.partial(classifier.apply, **kwargs))(variables, inputs)


def _inputs(arch: str, io: dict, rows: slice = slice(None)) -> dict[str, np.ndarray]:
    return {k: io[k][rows] for k in INPUTS[arch]}


def _rel_error(out, ref) -> float:
    out = np.asarray(out)
    assert out.dtype == np.float32 and out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_logits_match_transformers(arch, variant):
    _, classifier, params = _build(arch, variant)
    io = _io(arch, variant)
    error = _rel_error(_apply(classifier, {"params": params}, _inputs(arch, io)), io["logits"])
    print(arch, variant, "max |logit diff| / max |logit|", error)
    assert error <= F32_RTOL
    if variant == "base" and arch == "wavlm":  # no attention_mask: the mean over every frame
        nomask = {"input_values": io["input_values"]}
        error = _rel_error(_apply(classifier, {"params": params}, nomask), io["logits_nomask"])
        print(arch, variant, "no mask", error)
        assert error <= F32_RTOL


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_every_head_parameter_comes_from_the_checkpoint(arch, variant):
    encoder, classifier, params = _build(arch, variant)
    fresh = flatten_dict(H.init_head_params(classifier))
    got = flatten_dict(params["head"])
    assert got.keys() == fresh.keys()
    for path, leaf in got.items():
        assert leaf.shape == fresh[path].shape and leaf.dtype == jnp.float32
        assert not np.array_equal(leaf, fresh[path]), path
    assert jax.tree.structure(params["encoder"]) == jax.tree.structure(encoder.params)
    tensors = checkpoint.open_tensors(ROOT / arch / variant)
    torch_name = {"llama": "score.weight", "wavlm": "projector.weight"}.get(
        arch, "classifier.weight"
    )
    module = torch_name.split(".")[0]
    np.testing.assert_array_equal(got[(module, "kernel")], tensors[torch_name].T)


def test_base_model_layouts_give_the_pooler_only():
    """A bare BertModel / BeitModel checkpoint: pooler names without prefix, no classifier."""
    bert = checkpoint.open_tensors(ROOT / "bert" / "cls")
    bare = {k.removeprefix("bert."): v for k, v in bert.items() if not k.startswith("classifier")}
    got = H.head_params_from_hf("bert", {"hidden_size": 16}, bare)
    assert set(got) == {"pooler"}
    np.testing.assert_array_equal(got["pooler"]["kernel"], bert["bert.pooler.dense.weight"].T)
    np.testing.assert_array_equal(got["pooler"]["bias"], bert["bert.pooler.dense.bias"])
    beit = checkpoint.open_tensors(ROOT / "beit" / "mean")
    bare = {k.removeprefix("beit."): v for k, v in beit.items() if not k.startswith("classifier")}
    got = H.head_params_from_hf("beit", {"hidden_size": 16}, bare)
    assert set(got) == {"pooler_norm"}
    np.testing.assert_array_equal(got["pooler_norm"]["scale"], beit["beit.pooler.layernorm.weight"])
    cls = checkpoint.open_tensors(ROOT / "beit" / "cls")
    got = H.head_params_from_hf("beit", {"hidden_size": 16, "use_mean_pooling": False}, cls)
    assert set(got) == {"final_norm", "classifier"}
    assert H.head_params_from_hf("llama", {"hidden_size": 16}, {}) == {}
    assert H.head_params_from_hf("dat", {}, bert) == {}


def _head_on(arch: str, variant: str, pooling: str, **head_kwargs) -> float:
    """Relative logit error of the fixture's head on the encoder's states pooled by ``pooling``
    over the encoder's own mask (not the head's)."""
    encoder, classifier, params = _build(arch, variant)
    io = _io(arch, variant)
    feats = encoder.pooled_states(pooling, **_inputs(arch, io))
    head = H.make_head(arch, 3, **{**classifier.head_kwargs, **head_kwargs})
    return _rel_error(jax.jit(head.apply)({"params": params["head"]}, feats), io["logits"])


def test_wrong_pooling_is_detected():
    """The fixtures see the pooled position: BEiT's class token instead of the patch mean,
    Llama's attention mask instead of the pad id (row 0 ends in the pad id), WavLM-stable's last
    state without the final LayerNorm all miss by far more than F32_RTOL."""
    assert _head_on("beit", "mean", "first") > 100 * F32_RTOL
    assert _head_on("llama", "pad", "last") > 100 * F32_RTOL
    assert _head_on("wavlm", "stable", "mean") > 100 * F32_RTOL


def test_llama_without_pad_id_takes_the_last_position_of_one_row():
    _, classifier, params = _build("llama", "pad", head_kwargs={"pad_token_id": None})
    io = _io("llama", "pad")
    out = _apply(classifier, {"params": params}, _inputs("llama", io, slice(1, 2)))
    assert _rel_error(out, io["logits_no_pad_id"]) <= F32_RTOL
    with pytest.raises(ValueError, match="batch size 4 > 1") as err:
        _apply(classifier, {"params": params}, _inputs("llama", io))
    assert "\n" not in str(err.value)


DAT = {"num_heads": 1, "conv_features": 4, "map_shape": [4, 4]}  # as a config file gives them


def test_dat_head_runs_on_every_layer():
    encoder, classifier, params = _build(
        "bert", "cls", num_classes=5, head="dat", head_kwargs={**DAT, "pooling": "mean"}
    )
    assert classifier.head_kind == "dat"
    decoder = GaussianAdaptiveTransformer(5, num_heads=1, conv_features=4, map_shape=(4, 4))

    @jax.jit
    def both(params, inputs):
        out = classifier.apply({"params": params}, inputs)
        feats = encoder.module.apply(
            {"params": params["encoder"]}, **inputs, collect=pooling.pooling("mean")
        )
        return out, feats, decoder.apply({"params": params["head"]}, feats)

    out, feats, want = both(params, _inputs("bert", _io("bert", "cls")))
    assert out.shape == (3, 5) and out.dtype == jnp.float32 and np.isfinite(out).all()
    assert feats.shape == (3, 3, 16)  # [B, L+1, H]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_head_param_counts():
    hidden, layers, c, proj = 16, 2, 3, 8
    want = {
        ("bert", "cls"): hidden * hidden + hidden + hidden * c + c,
        ("beit", "mean"): 2 * hidden + hidden * c + c,
        ("beit", "cls"): 2 * hidden + hidden * c + c,
        ("wavlm", "base"): hidden * proj + proj + proj * c + c,
        ("wavlm", "weighted"): hidden * proj + proj + proj * c + c + layers + 1,
        ("llama", "pad"): hidden * c,
    }
    for (arch, variant), count in want.items():
        _, classifier, params = _build(arch, variant)
        io = _io(arch, variant)
        shapes = jax.eval_shape(classifier.init, jax.random.key(0), _inputs(arch, io))
        assert set(shapes["params"]) == {"encoder", "head"}
        assert count_params(shapes["params"]["head"]) == count, (arch, variant)
        assert count_params(shapes["params"]["encoder"]) == count_params(params["encoder"])
    _, classifier, _ = _build("bert", "cls", head="dat", head_kwargs=DAT)
    decoder = GaussianAdaptiveTransformer(3, num_heads=1, conv_features=4, map_shape=(4, 4))
    want = jax.eval_shape(decoder.init, jax.random.key(0), jnp.zeros((1, layers + 1, hidden)))
    shapes = jax.eval_shape(classifier.init, jax.random.key(0), _inputs("bert", _io("bert", "cls")))
    assert count_params(shapes["params"]["head"]) == count_params(want["params"])


def test_adapted_encoder_and_head_gradients():
    encoder = _encoder("bert", "cls").with_adapters(Adapters(lora=LoRA(rank=2), daam=True))
    tensors = checkpoint.open_tensors(ROOT / "bert" / "cls")
    classifier, params = H.classifier_from_encoder(encoder, tensors=tensors)
    inputs = _inputs("bert", _io("bert", "cls"))
    adapters = {"encoder": encoder.adapters}
    assert set(adapters["encoder"]) == set(encoder.adapters)

    def loss(head, adapters):
        v = {"params": {"encoder": params["encoder"], "head": head}, "adapters": adapters}
        logits = classifier.apply(v, inputs)
        return jnp.sum(logits**2), logits

    (_, logits), (g_head, g_adapters) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    )(params["head"], adapters)
    # LoRA's B starts at zero and DAAM at the identity: the adapted model starts as the base
    # (the checkpoint's head, as transformers').
    assert _rel_error(logits, _io("bert", "cls")["logits"]) <= F32_RTOL
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(g_head))
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(g_adapters))


def test_bert_dropout_only_in_training():
    _, classifier, params = _build("bert", "cls", head_kwargs={"dropout": 0.5})
    inputs = _inputs("bert", _io("bert", "cls"))
    eval_out = _apply(classifier, {"params": params}, inputs)
    train_out = _apply(
        classifier, {"params": params}, inputs, train=True, rngs={"dropout": jax.random.key(1)}
    )
    assert not np.allclose(eval_out, train_out)
    assert H.head_kwargs_from_hf("bert", {"hidden_dropout_prob": 0.2}) == {
        "dropout": 0.2,
        "init_std": 0.02,
    }


def test_trainable_paths():
    _, _, params = _build("wavlm", "weighted")
    mask = H.trainable_mask(params, "wavlm", paper_faithful=True)
    trained = {"/".join(p) for p, m in flatten_dict(mask["head"]).items() if m}
    assert trained == {"classifier/kernel", "classifier/bias"}
    assert not any(jax.tree.leaves(mask["encoder"]))
    assert all(jax.tree.leaves(H.trainable_mask(params, "wavlm")["head"]))
    _, _, params = _build("llama", "pad")
    assert not any(jax.tree.leaves(H.trainable_mask(params, "llama", True)["head"]))
    assert H.trainable_head_paths("dat", True) == H.trainable_head_paths("bert") == ""
    assert dict(H.PAPER_TRAINABLE_HEAD_PATHS).keys() == set(H.HEADS)


def _one_line(call, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value), str(err.value)


def test_bad_heads_and_options_are_refused_in_one_line():
    module = _encoder("bert", "cls").module
    _one_line(lambda: H.SequenceClassifier(module, 3, "nope"), "head must be 'auto' or one of")
    _one_line(lambda: H.SequenceClassifier(module, 3, "beit"), "the encoder is 'bert'")
    _one_line(lambda: H.SequenceClassifier(module, 0), "num_classes must be a positive int")
    _one_line(
        lambda: H.SequenceClassifier(module, 3, head_kwargs={"pool": 1}), "unknown option 'pool'"
    )
    _one_line(lambda: H.SequenceClassifier(GaussianAdaptiveTransformer(3), 3), "head='auto'")
    _one_line(lambda: H.make_head("dat", 3, pooling="max"), "pooling must be one of")
    _one_line(lambda: H.make_head("dat", 3, front="cnn"), "front must be one of")
    _one_line(lambda: H.make_head("wavlm", 3, classifier_proj_size=0), "classifier_proj_size")
    _one_line(lambda: H.make_head("bert", 3, dropout=1.0), "dropout must be in")
    _one_line(lambda: H.make_head("llama", 3, pad_token_id="0"), "pad_token_id")
    _one_line(lambda: H.head_kwargs_from_hf("wavlm", {"add_adapter": True}), "add_adapter")
    _one_line(lambda: H.trainable_head_paths("auto"), "head must be")


def test_checkpoint_heads_that_do_not_fit_are_refused_in_one_line():
    encoder = _encoder("bert", "cls")
    tensors = checkpoint.open_tensors(ROOT / "bert" / "cls")
    # a classifier for 3 labels on a 5-class head; skip_mismatched keeps its fresh init
    _one_line(lambda: H.classifier_from_encoder(encoder, 5, tensors=tensors), "another num_classes")
    _, params = H.classifier_from_encoder(encoder, 5, tensors=tensors, skip_mismatched=True)
    assert params["head"]["classifier"]["kernel"].shape == (16, 5)
    np.testing.assert_array_equal(
        params["head"]["pooler"]["kernel"], tensors["bert.pooler.dense.weight"].T
    )
    bad = dict(tensors)
    bad["bert.pooler.dense.weight"] = np.zeros((16, 8), np.float32)
    _one_line(lambda: H.head_params_from_hf("bert", {"hidden_size": 16}, bad), "has shape")
    fresh = H.init_head_params(H.SequenceClassifier(encoder.module, 3))
    score = {"score": {"kernel": np.zeros((16, 3))}}
    _one_line(lambda: H.merge_head_params(fresh, score), "the head has no score")


def test_missing_inputs_and_wrong_wavlm_norm_are_refused_in_one_line():
    encoder, classifier, params = _build("llama", "pad")
    mask = {"attention_mask": _io("llama", "pad")["attention_mask"]}
    _one_line(lambda: classifier.apply({"params": params}, mask), "inputs need 'input_ids'")
    # a stable-layer-norm WavLM encoder must carry the final norm on its last state exactly
    # when transformers' head reads last_hidden_state (not with the weighted layer sum)
    wavlm = _encoder("wavlm", "stable").module
    _one_line(lambda: H.SequenceClassifier(wavlm, 3), "final_norm_on_last_state=True")
    normed = wavlm.clone(final_norm_on_last_state=True)
    weighted = {"use_weighted_layer_sum": True}
    _one_line(
        lambda: H.SequenceClassifier(normed, 3, head_kwargs=weighted),
        "final_norm_on_last_state=False",
    )
    assert H.SequenceClassifier(normed, 3).head_kind == "wavlm"


def test_module_names_and_unbound_head():
    _, classifier, params = _build("beit", "cls")
    assert classifier.head_kind == "beit"
    assert set(params["head"]) == {"final_norm", "classifier"}
    head = H.make_head("beit", 3, use_mean_pooling=False)
    assert isinstance(head, nn.Module) and head.parent is None
