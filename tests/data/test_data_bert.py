"""The Flax BERT encoder against Hugging Face's PyTorch BertModel (committed fixtures)."""

import json
import pathlib

import chex
import numpy as np
import pytest

from data.preprocess.text import TextPreprocessor
from gaam_jax.encoders import bert, from_pretrained

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "minilm_hidden_states.npz"


def test_tokenizer_matches_hugging_face():
    ref = np.load(FIXTURE)
    folder = bert.minilm_dir()
    pre = TextPreprocessor(folder, json.loads((folder / "config.json").read_text()))
    batch = pre(list(ref["texts"]))
    t = ref["input_ids"].shape[1]
    # Padded to a bucketed length (32 here) on the right: the first T columns are HF's batch.
    assert batch["input_ids"].shape == (4, 32)
    np.testing.assert_array_equal(batch["input_ids"][:, :t], ref["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"][:, :t], ref["attention_mask"])
    assert not batch["attention_mask"][:, t:].any()
    # Single texts have token type 0 everywhere: the encoder's default for token_type_ids.
    assert not ref["token_type_ids"].any()


def test_collate_to_a_given_length_pads_or_cuts_on_the_right():
    folder = bert.minilm_dir()
    pre = TextPreprocessor(folder, json.loads((folder / "config.json").read_text()))
    ids = pre.encode(["a fine film .", "a long and rather dull film about nothing much at all ."])
    whole = pre.collate(ids)  # the bucketed length: both texts whole
    for length in (40, 6):
        batch = pre.collate(ids, length=length)
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, length)
        for row, seq in enumerate(ids):
            n = min(len(seq), length)
            np.testing.assert_array_equal(batch["input_ids"][row, :n], seq[:n])
            assert batch["attention_mask"][row].sum() == n
            assert (batch["input_ids"][row, n:] == pre.pad_id).all()
    t = whole["input_ids"].shape[1]  # the longer text's tokens, bucketed (16)
    np.testing.assert_array_equal(
        pre.collate(ids, length=40)["input_ids"][:, :t], whole["input_ids"]
    )


@pytest.mark.parametrize("attention", ["xla", "blockwise"])
def test_hidden_states_match_hugging_face(attention):
    ref = np.load(FIXTURE)
    valid = ref["attention_mask"].astype(bool)
    inputs = {k: ref[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    # block 4 < T = 19: five query and key blocks, the last one padded.
    enc = from_pretrained(bert.minilm_dir(), attention=attention, block_size=4)
    states = enc.hidden_states(**inputs)  # [batch, layers, length, hidden]
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


def test_config_and_weight_errors(tmp_path):
    config = bert.BertConfig.from_json(bert.minilm_dir() / "config.json")
    assert (config.num_hidden_layers, config.hidden_size) == (6, 384)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="not BERT"):
        bert.BertConfig.from_json(tmp_path / "config.json")
    with pytest.raises(ValueError, match="has shape"):
        bert.params_from_hf(
            config, {"embeddings.word_embeddings.weight": np.zeros((3, 3), np.float32)}
        )
