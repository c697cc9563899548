"""Each architecture's facts (``ARCHITECTURE``) and the registry that finds them."""

import inspect

import jax
import pytest

from gaam_jax.encoders import Architecture, configure, heads, registry

TINY_BERT = dict(
    model_type="bert", vocab_size=8, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
    intermediate_size=8,
)  # fmt: skip


def test_the_registry_lists_every_architecture_module():
    assert registry.model_types() == ("bert", "llama", "beit", "wavlm")
    for model_type in registry.model_types():
        arch = registry.get(model_type)
        assert isinstance(arch, Architecture) and arch.model_type == model_type
        assert inspect.getmodule(arch.encoder_cls).MODEL_TYPE == model_type
        assert arch.hf_prefix.endswith(".") and arch.hf_base_class.endswith("Model")


def test_an_unknown_model_type_is_one_line_naming_the_supported_ones():
    supported = r"\(supported: bert, llama, beit, wavlm\)\.$"
    with pytest.raises(ValueError, match=f"'gpt2' is not supported {supported}") as err:
        registry.get("gpt2")
    assert "\n" not in str(err.value)


def test_find_names_the_architecture_of_an_encoder_module():
    arch, _, module = configure(TINY_BERT)
    assert registry.find(module) is arch is registry.get("bert")
    assert registry.find(heads.make_head("bert", 3)) is None


@pytest.mark.parametrize("model_type", ["bert", "llama", "beit", "wavlm"])
def test_example_inputs_are_the_encoders_leading_inputs(model_type):
    arch = registry.get(model_type)
    example = arch.example_inputs({})
    params = list(inspect.signature(arch.encoder_cls.__call__).parameters)[1:]
    assert list(example) == params[: len(example)]
    assert all(isinstance(v, jax.ShapeDtypeStruct) and v.shape[0] == 1 for v in example.values())


def test_heads_come_from_the_architectures():
    assert heads.HF_HEADS == registry.model_types()
    assert heads.HEADS == (*registry.model_types(), "dat")
    for model_type in registry.model_types():
        head = registry.get(model_type).head
        assert heads.make_head(model_type, 3).__class__ is head.module
        assert heads.PAPER_TRAINABLE_HEAD_PATHS[model_type] == head.paper_trainable
