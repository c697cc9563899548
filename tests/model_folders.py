"""The tiny model folders the tests build from the committed fixtures: helpers shared by the
test files of several folders (tests/gaam_jax, tests/data, tests/train).

``llama_folder``, ``beit_folder`` and ``wavlm_folder`` copy the tiny random parity fixtures
(tests/fixtures/encoders) to a folder with the files a Hugging Face snapshot adds: a word-level
``tokenizer.json`` for Llama (built with the tokenizers library) and
``preprocessor_config.json`` for BEiT and WavLM. ``write_tiny_bert`` writes a random BERT
folder; ``tiny_bert_folder`` is the peft fixtures' tiny BERT with a word-level tokenizer.
"""

import json
import pathlib
import shutil

import numpy as np
from safetensors.numpy import save_file

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "encoders"
WORDS = "the a of to in and for on is with news world sports business science tech".split()


def llama_folder(dst: pathlib.Path) -> pathlib.Path:
    """The tiny Llama fixture plus a word-level tokenizer.json that adds BOS as Llama-2's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    shutil.copytree(FIXTURES / "llama" / "base", dst)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(dst / "tokenizer.json"))
    return dst


def beit_folder(dst: pathlib.Path) -> pathlib.Path:
    """The tiny BEiT fixture (24x24 images) plus BEiT-Large's processor settings at size 24."""
    shutil.copytree(FIXTURES / "beit" / "cls_shared_abs", dst)
    config = dict(do_resize=True, size={"height": 24, "width": 24}, resample=2,
                  do_center_crop=False, do_rescale=True, rescale_factor=1 / 255,
                  do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)  # fmt: skip
    (dst / "preprocessor_config.json").write_text(json.dumps(config))
    return dst


def wavlm_folder(dst: pathlib.Path, do_normalize: bool = True) -> pathlib.Path:
    """The tiny stable-layer-norm WavLM fixture, its feature encoder striding 320 as WavLM-Large.

    Only ``conv_stride`` changes (the weights do not depend on it): 80,000 samples give 250
    frames like the real model's 249, instead of 3,999, which keeps the tests fast.
    """
    shutil.copytree(FIXTURES / "wavlm" / "stable", dst)
    config = json.loads((dst / "config.json").read_text())
    config["conv_stride"] = [5, 8, 8]
    (dst / "config.json").write_text(json.dumps(config))
    pre = dict(do_normalize=do_normalize, feature_size=1, sampling_rate=16000, padding_value=0.0)
    (dst / "preprocessor_config.json").write_text(json.dumps(pre))
    return dst


def bert_tensors(vocab=30, hidden=32, heads=4, ff=64, layers=2, positions=16, seed=0):
    """Random BertModel tensors under Hugging Face names (float32)."""
    rng = np.random.default_rng(seed)
    t = {
        "embeddings.word_embeddings.weight": (vocab, hidden),
        "embeddings.position_embeddings.weight": (positions, hidden),
        "embeddings.token_type_embeddings.weight": (2, hidden),
        "embeddings.LayerNorm.weight": (hidden,),
        "embeddings.LayerNorm.bias": (hidden,),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value"):
            t[p + name + ".weight"], t[p + name + ".bias"] = (hidden, hidden), (hidden,)
        t[p + "attention.output.dense.weight"] = (hidden, hidden)
        t[p + "attention.output.dense.bias"] = (hidden,)
        t[p + "intermediate.dense.weight"], t[p + "intermediate.dense.bias"] = (ff, hidden), (ff,)
        t[p + "output.dense.weight"], t[p + "output.dense.bias"] = (hidden, ff), (hidden,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + norm + ".weight"], t[p + norm + ".bias"] = (hidden,), (hidden,)
    out = {}
    for name, shape in t.items():
        base = 1.0 if name.endswith("LayerNorm.weight") else 0.0
        out[name] = (base + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    config = {
        "model_type": "bert", "vocab_size": vocab, "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": ff,
        "max_position_embeddings": positions, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
    }  # fmt: skip
    return config, out


def write_tiny_bert(folder, dtype=np.float32, prefix="", shards=1, **kwargs):
    """A tiny random BERT folder; ``shards > 1`` writes an index and several files."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config, tensors = bert_tensors(**kwargs)
    tensors = {prefix + k: v.astype(dtype) for k, v in tensors.items()}
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, folder / "model.safetensors")
    else:
        names = sorted(tensors)
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = names[i::shards]
            save_file({k: tensors[k] for k in part}, folder / file)
            weight_map.update(dict.fromkeys(part, file))
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    return folder


def text_inputs(batch=3, length=7, vocab=30, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[-1, length // 2 :] = 0  # a padded example
    return {"input_ids": ids, "attention_mask": mask}


BERT_WORDS = (
    "the a , . of and to is in it that film movie as with for its an but this be on you by "
    "one his not are all more at from about have like or so story than has"
).split()


def tiny_bert_folder(dst: pathlib.Path) -> pathlib.Path:
    """The tiny random BERT of the peft fixtures (2 layers x 32, 64 ids) with a word-level
    tokenizer.json that adds [CLS] and [SEP] as BERT's: a text encoder that compiles fast."""
    import shutil

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    shutil.copytree(pathlib.Path(__file__).parent / "fixtures" / "peft" / "bert" / "model", dst)
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in
             enumerate(BERT_WORDS)}}  # fmt: skip
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.save(str(dst / "tokenizer.json"))
    return dst
