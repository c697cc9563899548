"""Inputs that do not fit the model are refused at construction, in one line, before any work.

Each check is one ``ValueError`` naming the cause, raised when the :class:`FeatureEncoder` (or
its preprocessor) is created: before the source dataset is built, weights are loaded or a file is
written; the CLI turns it into ``error: ...`` and exit code 2. The folders are the tiny parity
fixtures of :mod:`model_folders`, edited in ``tmp_path``.
"""

import json
import pathlib

import pytest
from data_helpers import extract_cli_error
from model_folders import WORDS, beit_folder, llama_folder, wavlm_folder

from data import feature_encoder
from data.preprocess import text
from gaam_jax.encoders import bert, llama


def _edit_json(path: pathlib.Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _word_tokenizer(path: pathlib.Path, vocab: dict[str, int], bos_id: int = 1) -> None:
    """A word-level tokenizer.json with ``vocab`` whose post-processor prepends ``bos_id``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos_id)]
    )
    tok.save(str(path))


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return llama_folder(tmp_path_factory.mktemp("validation") / "llama")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, capsys):
    folder = llama_folder(tmp_path / "llama")  # config.json: vocab_size 128
    words = {f"w{i}": i + 3 for i in range(127)}
    _word_tokenizer(folder / "tokenizer.json", {"<unk>": 0, "<s>": 1, "</s>": 2, **words})
    message = (
        f"{folder / 'tokenizer.json'} has 130 tokens but config.json's vocab_size is 128: the "
        "tokenizer does not belong to this model."
    )
    with pytest.raises(ValueError) as err:
        feature_encoder.FeatureEncoder(folder)
    assert _one_line(err) == message
    # The CLI: one line, exit 2, neither the source dataset nor an output folder is created.
    data = tmp_path / "data"
    argv = ["--dataset", "pang_lee_polarity", "--data-dir", str(data), "--encoder", str(folder)]
    assert extract_cli_error([*argv, "--no-progress"], capsys, tmp_path) == f"error: {message}"
    assert not data.exists()


def test_a_token_id_beyond_the_vocabulary_is_refused(tmp_path):
    folder = llama_folder(tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    path = folder / "tokenizer.json"
    # 4 tokens, but ids with a gap: get_vocab_size counts 4, the largest id is 200.
    _word_tokenizer(path, {"<unk>": 0, "<s>": 1, "</s>": 2, "news": 200})
    with pytest.raises(ValueError) as err:
        text.TextPreprocessor(folder, config)
    assert _one_line(err) == (
        f"{path} has token 'news' with id 200 but config.json's vocab_size is 128: the "
        "tokenizer does not belong to this model."
    )
    # An id the vocabulary does not list (the post-processor's BOS) is caught at encode time.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    _word_tokenizer(path, vocab, bos_id=500)
    pre = text.TextPreprocessor(folder, config)  # 19 tokens, ids 0..18: accepted
    with pytest.raises(ValueError) as err:
        pre.encode(["world news", "the news"])
    assert _one_line(err) == (
        f"text 0: {path} gave token id 500 but config.json's vocab_size is 128: the tokenizer "
        "does not belong to this model."
    )
    # The ids the preprocessor itself inserts: padding (Llama: EOS) and BOS.
    with pytest.raises(ValueError) as err:
        text.TextPreprocessor(folder, config | {"eos_token_id": 130})
    assert _one_line(err) == (
        "config.json's padding token id 130 is not below its vocab_size 128: fix config.json "
        "(eos/bos/pad_token_id)."
    )
    # BERT: MiniLM's 30522 tokens against a smaller vocab_size.
    minilm = bert.minilm_dir()
    raw = json.loads((minilm / "config.json").read_text())
    with pytest.raises(ValueError, match=r"has 30522 tokens but config.json's vocab_size is 30000"):
        text.TextPreprocessor(minilm, raw | {"vocab_size": 30000})


def test_max_length_beyond_the_positions_is_refused(tmp_path, capsys, tiny_llama):
    minilm = bert.minilm_dir()
    raw = json.loads((minilm / "config.json").read_text())  # max_position_embeddings 512
    assert text.TextPreprocessor(minilm, raw, max_length=512).max_length == 512
    with pytest.raises(ValueError) as err:
        text.TextPreprocessor(minilm, raw, max_length=513)
    assert _one_line(err) == (
        "--max-length 513 is more than config.json's max_position_embeddings 512 (the longest "
        "sequence this model takes); pass --max-length 512 or less."
    )
    # Llama (RoPE): the limit the config states; the default 4096 is lowered to it.
    config = json.loads((tiny_llama / "config.json").read_text())  # max_position_embeddings 64
    assert text.TextPreprocessor(tiny_llama, config).max_length == 64
    unstated = config | {"max_position_embeddings": None}
    assert text.TextPreprocessor(tiny_llama, unstated).max_length == 4096
    with pytest.raises(ValueError, match="--max-length 65 is more than .*_embeddings 64 "):
        feature_encoder.FeatureEncoder(tiny_llama, max_length=65)
    data = tmp_path / "data"
    line = extract_cli_error(
        ["--dataset", "pang_lee_polarity", "--data-dir", str(data), "--max-length", "600",
         "--no-progress"], capsys, tmp_path,
    )  # fmt: skip
    assert line.startswith("error: --max-length 600 is more than config.json's")
    assert not data.exists()


def test_images_of_another_size_than_the_model_are_refused(tmp_path):
    folder = beit_folder(tmp_path / "beit")  # image_size 24, resize to 24x24
    where = folder / "preprocessor_config.json"
    cases = [
        ({"size": 32}, "images come out 32x32 but config.json's image_size is 24"),
        ({"do_center_crop": True, "crop_size": 20}, "images come out 20x20 but"),
        ({"do_resize": False, "do_center_crop": True, "crop_size": 32}, "come out 32x32 but"),
        ({"do_center_crop": True, "crop_size": {"height": 24, "width": 30}},
         "crop_size 24x30 is larger than the resized 24x24 images; fix size/crop_size."),
    ]  # fmt: skip
    original = where.read_text()
    for changes, message in cases:
        where.write_text(original)
        _edit_json(where, **changes)
        with pytest.raises(ValueError) as err:
            feature_encoder.FeatureEncoder(folder)
        assert _one_line(err).startswith(f"{where}: ") and message in str(err.value), changes
    # Resize then crop to the model's size is accepted.
    where.write_text(original)
    _edit_json(where, size=28, do_center_crop=True, crop_size=24)
    assert feature_encoder.FeatureEncoder(folder).preprocess.crop_size == (24, 24)


def test_audio_at_another_sampling_rate_is_refused(tmp_path):
    folder = wavlm_folder(tmp_path / "wavlm")
    _edit_json(folder / "preprocessor_config.json", sampling_rate=8000)
    with pytest.raises(ValueError) as err:
        feature_encoder.FeatureEncoder(folder)
    assert _one_line(err) == (
        f"{folder / 'preprocessor_config.json'}: sampling_rate=8000 but the audio is 16 kHz."
    )


def test_weights_that_do_not_match_the_config_are_refused(tmp_path, capsys, monkeypatch):
    folder = llama_folder(tmp_path / "llama")
    config = folder / "config.json"
    fix = "copy config.json and the weights from the same snapshot."
    _edit_json(config, intermediate_size=128)
    with pytest.raises(ValueError) as err:
        feature_encoder.FeatureEncoder(folder)
    assert _one_line(err) == (
        f"{folder}: the weights do not match config.json (checkpoint: layers.0.mlp.gate_proj."
        f"weight has shape (96, 64), expected (128, 64)); {fix}"
    )
    _edit_json(config, intermediate_size=96, num_hidden_layers=3)
    data = tmp_path / "data"
    line = extract_cli_error(
        ["--dataset", "pang_lee_polarity", "--data-dir", str(data), "--encoder", str(folder),
         "--no-progress"], capsys, tmp_path,
    )  # fmt: skip
    assert line == (
        f"error: {folder}: the weights do not match config.json (checkpoint: tensor "
        f"'layers.2.input_layernorm.weight' is missing); {fix}"
    )
    assert not data.exists()  # refused before the source dataset was built
    # What params_from_hf maps is compared with the module's own shapes (jax.eval_shape).
    _edit_json(config, num_hidden_layers=2)
    real = llama.params_from_hf
    monkeypatch.setattr(llama, "params_from_hf", lambda c, t: real(c, t) | {"norm": {}})
    with pytest.raises(ValueError) as err:
        feature_encoder.FeatureEncoder(folder)
    assert _one_line(err) == (
        f"{folder}: the weights do not match config.json (llama.params_from_hf: norm/scale is "
        f"None, the module expects (64,)); {fix}"
    )
    monkeypatch.undo()
    # Matching: accepted, nothing loaded.
    assert feature_encoder.FeatureEncoder(folder).encoder is None
