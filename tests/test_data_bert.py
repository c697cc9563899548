"""The Flax BERT encoder against Hugging Face's PyTorch BertModel (committed fixtures)."""

import pathlib

import chex
import jax
import numpy as np
import pytest

from gaam_jax.encoders import bert, from_pretrained

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "minilm_hidden_states.npz"


@pytest.fixture(scope="module")
def minilm():
    return bert.load_bert(bert.minilm_dir())


def test_tokenizer_matches_hugging_face():
    ref = np.load(FIXTURE)
    tok = bert.Tokenizer(bert.minilm_dir() / "tokenizer.json", bucket=1)
    batch = tok(list(ref["texts"]))
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(batch[key], ref[key])


def test_hidden_states_match_hugging_face(minilm):
    ref = np.load(FIXTURE)
    valid = ref["attention_mask"].astype(bool)
    inputs = {k: ref[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    # The entry point: [batch, layers, length, hidden].
    states = from_pretrained(bert.minilm_dir()).hidden_states(**inputs)
    assert states.shape == (4, 7, ref["input_ids"].shape[1], 384)
    # Padded positions are not compared: no pooling here or in HF reads them. The MiniLM
    # hidden states reach ~10; float32 kernels in different orders agree to ~4e-6 here; the
    # issue's bound is 1e-4.
    chex.assert_trees_all_close(
        np.swapaxes(np.asarray(states), 0, 1)[:, valid],
        ref["hidden_states"][:, valid],
        atol=1e-4,
        rtol=0,
    )
    # load_bert (data/extract.py's interface) keeps [layers, batch, length, hidden].
    module, params, config = minilm
    legacy = jax.jit(module.apply)({"params": params}, *inputs.values())
    assert legacy.shape == (7, 4, ref["input_ids"].shape[1], 384)
    chex.assert_trees_all_close(
        np.asarray(legacy)[:, valid], ref["hidden_states"][:, valid], atol=1e-4, rtol=0
    )


def test_config_and_weight_errors(tmp_path, minilm):
    _, _, config = minilm
    assert (config.num_hidden_layers, config.hidden_size) == (6, 384)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="not BERT"):
        bert.BertConfig.from_json(tmp_path / "config.json")
    from safetensors.numpy import save_file

    save_file(
        {"embeddings.word_embeddings.weight": np.zeros((3, 3), np.float32)},
        tmp_path / "w.safetensors",
    )
    with pytest.raises(ValueError, match="has shape"):
        bert.params_from_safetensors(tmp_path / "w.safetensors", config)
