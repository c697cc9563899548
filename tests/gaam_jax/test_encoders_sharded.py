"""gaam_jax.encoders on a (data, model) mesh of 8 CPU devices: placement by logical axes, parity.

conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported.
"""

import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from model_folders import text_inputs, write_tiny_bert

from gaam_jax.encoders import from_pretrained
from gaam_jax.sharding import DEFAULT_RULES, abstract_params, make_mesh

LLAMA = pathlib.Path(__file__).parents[1] / "fixtures" / "encoders" / "llama" / "base"
MESHES = [(8, 1), (4, 2), (2, 4)]

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    # vocab 30: split over model=2, not over model=4 (stays replicated there).
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "bert", vocab=30)


@pytest.fixture(scope="module")
def bert_reference(tiny_bert):
    inputs = text_inputs(batch=3)  # 3 examples: padded to the data axis and cut back
    return inputs, np.asarray(from_pretrained(tiny_bert).hidden_states(**inputs))


@pytest.fixture(scope="module")
def llama_reference():
    io = np.load(LLAMA / "io.npz")
    inputs = {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    single = from_pretrained(LLAMA)
    return inputs, single, np.asarray(single.hidden_states(**inputs)), io["hidden_states"]


def _close_per_layer(got, want):
    # Sharded matmuls sum partial products in another order (and the padded batch compiles
    # to other kernels): float32 rounding, measured <= 1e-6 of each layer's largest value here
    # (up to 6e-6 on MiniLM).
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    for layer in range(want.shape[1]):
        scale = np.abs(want[:, layer]).max()
        np.testing.assert_allclose(got[:, layer], want[:, layer], rtol=0, atol=2e-5 * scale)


def _expected_bert_shard_shapes(model: int) -> dict:
    """Per-device shapes the default rules give tiny BERT (hidden 32, mlp 64, vocab 30).

    The layers' parameters are stacked ``[2, ...]``: the leading ``stack`` axis stays whole.
    """
    split = lambda n: n // model if n % model == 0 else n  # noqa: E731
    out = {("word", "embedding"): (split(30), 32)}
    for name in ("query", "key", "value"):
        out[("layers", name, "kernel")] = (2, 32, split(32))
        out[("layers", name, "bias")] = (2, split(32))
    out[("layers", "attention_output", "kernel")] = (2, split(32), 32)
    out[("layers", "intermediate", "kernel")] = (2, 32, split(64))
    out[("layers", "intermediate", "bias")] = (2, split(64))
    out[("layers", "output", "kernel")] = (2, split(64), 32)
    return out


@pytest.mark.parametrize("data,model", MESHES)
def test_sharded_bert_equals_one_device_and_splits_weights_by_the_rules(
    tiny_bert, bert_reference, data, model
):
    inputs, want = bert_reference
    mesh = make_mesh({"data": data, "model": model})
    enc = from_pretrained(tiny_bert, mesh=mesh)
    got = enc.hidden_states(**inputs)
    assert got.shape == (3, 3, 7, 32)
    _close_per_layer(got, want)
    expected = _expected_bert_shard_shapes(model)
    total = 0
    for key, leaf in flatten_dict(enc.params).items():
        shapes = {s.data.shape for s in leaf.addressable_shards}
        assert len(leaf.addressable_shards) == 8
        assert shapes == {expected.get(key, leaf.shape)}, (key, shapes)
        total += leaf.nbytes
    held = enc.bytes_per_device()
    assert len(held) == 8 and len(set(held.values())) == 1
    sharded = sum(4 * int(np.prod(leaf.shape)) for key, leaf in flatten_dict(enc.params).items()
                  if expected.get(key, leaf.shape) != leaf.shape)  # fmt: skip
    assert next(iter(held.values())) == total - sharded + sharded // model
    if model > 1:
        assert sharded > 0.5 * total  # the big matrices are split


@pytest.mark.parametrize("data,model", MESHES)
def test_sharded_llama_equals_one_device_and_holds_one_model_th(llama_reference, data, model):
    inputs, single, want, torch_states = llama_reference
    mesh = make_mesh({"data": data, "model": model})
    enc = from_pretrained(LLAMA, mesh=mesh)
    _close_per_layer(enc.hidden_states(**inputs), want)
    # Expected per-device shapes from the logical names the module gives its parameters.
    abstract = abstract_params(single.module, np.zeros((1, 8), np.int32))
    logical = flatten_dict(nn.get_partition_spec(abstract))
    rules = dict(DEFAULT_RULES)
    split_any = False
    for key, leaf in flatten_dict(enc.params).items():
        shape = list(leaf.shape)
        for dim, name in enumerate(logical[key]):
            if rules.get(name) == "model" and shape[dim] % model == 0:
                shape[dim] //= model
                split_any |= model > 1
        assert {s.data.shape for s in leaf.addressable_shards} == {tuple(shape)}, key
    assert split_any or model == 1
    # The unsharded result itself matches transformers (the llama tests bound it; sanity here).
    assert np.abs(want - torch_states).max() <= 1e-4 * np.abs(torch_states).max()


@pytest.mark.parametrize("data,model", [(2, 4)])  # every mesh: the hidden_states tests above
def test_sharded_blockwise_pooled_states_equal_one_device(llama_reference, data, model):
    """The memory-linear path and pooling inside the scan shard like the rest."""
    inputs, single, _, _ = llama_reference
    options = {"attention": "blockwise", "block_size": 4}  # T = 12: three blocks
    one = from_pretrained(LLAMA, **options).pooled_states(layers=slice(1, None), **inputs)
    mesh = make_mesh({"data": data, "model": model})
    got = from_pretrained(LLAMA, mesh=mesh, **options).pooled_states(
        layers=slice(1, None), **inputs
    )
    assert got.shape == (3, single.config.num_hidden_layers, single.config.hidden_size)
    _close_per_layer(got, one)
    # Pooled inside the scan equals pooling the dense path's hidden states by hand.
    hidden = np.asarray(single.hidden_states(**inputs))[:, 1:]
    m = inputs["attention_mask"][:, None, :, None].astype(np.float32)
    _close_per_layer(got, (hidden * m).sum(2) / m.sum(2))


def test_rules_are_data_and_are_checked(tiny_bert):
    mesh = make_mesh({"data": 4, "model": 2})
    # As a config file would hold them: lists, mlp kept whole.
    rules = [list(r) for r in DEFAULT_RULES if r[0] != "mlp"] + [["mlp", None]]
    enc = from_pretrained(tiny_bert, mesh=mesh, rules=rules)
    layers = enc.params["layers"]  # [2, ...]: the stack axis is never split
    assert layers["intermediate"]["kernel"].addressable_shards[0].data.shape == (2, 32, 64)
    assert layers["query"]["kernel"].addressable_shards[0].data.shape == (2, 32, 16)
    with pytest.raises(ValueError, match="mapped twice"):
        from_pretrained(tiny_bert, mesh=mesh, rules=(("mlp", "model"), ("mlp", None)))
    other = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("batch", "tensor"))
    with pytest.raises(ValueError, match="mesh axes must be"):
        from_pretrained(tiny_bert, mesh=other)
