"""A Flax BEiT image encoder equal to transformers' ``BeitModel`` (eval mode) hidden states.

``BeitModel`` (transformers 5.24, ``models/beit/modeling_beit.py``) embeds an image with a
stride-``patch_size`` convolution, prepends a CLS token, optionally adds absolute position
embeddings, then runs ``num_hidden_layers`` pre-LayerNorm blocks::

    x = x + lambda_1 * attention(layernorm_before(x), bias=relative_position_bias)
    x = x + lambda_2 * fc2(gelu(fc1(layernorm_after(x))))

The key projection has no bias. The attention logits get a learned T5-style bias indexed by the
relative position of query and key patches, with three extra entries for CLS-to-token,
token-to-CLS and CLS-to-CLS; the table lives in each layer (``use_relative_position_bias``) or
once in the encoder (``use_shared_relative_position_bias``), or both. ``lambda_1``/``lambda_2``
(layer scale) exist only when ``layer_scale_init_value > 0``; otherwise they are 1.

``hidden_states`` are the embedding output followed by each layer's output: the final
``layernorm`` (only when ``use_mean_pooling`` is False) and the pooler act on
``last_hidden_state``/``pooler_output`` only, so they are not part of this encoder. The mask
token (``bool_masked_pos``), dropout and drop path do nothing at inference without masking.

:data:`ARCHITECTURE` holds what the rest of the project knows about BEiT (classes, Hugging Face
names, inputs); :class:`BeitHead` is ``BeitForImageClassification``'s head.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
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

MODEL_TYPE = "beit"
# BeitModel's attribute in the head models (BeitForImageClassification.beit, ...).
_HF_PREFIX = "beit."

Dtype = Any

# Defaults of transformers' BeitConfig, used when an older config.json omits a field.
_DEFAULTS = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "use_absolute_position_embeddings": False,
    "use_relative_position_bias": False,
    "use_shared_relative_position_bias": False,
    "layer_scale_init_value": 0.1,
}


def _square(raw: dict, name: str) -> int:
    """An ``int`` or ``[n, n]`` config field as ``n``; non-square values are rejected."""
    value = raw.get(name, _DEFAULTS[name])
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(
                f"config.json: {name}={list(value)} is not supported (only square, e.g. {name}=224)"
            )
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class BeitConfig:
    """The fields of a BEiT ``config.json`` that change the hidden states.

    Attributes:
      hidden_size: model width D.
      num_hidden_layers: number of transformer blocks L.
      num_attention_heads: attention heads H.
      intermediate_size: feed-forward width.
      head_dim: width of one head (``hidden_size // num_attention_heads`` unless given).
      layer_norm_eps: LayerNorm epsilon.
      image_size: side of the (square) input image in pixels.
      patch_size: side of a (square) patch in pixels.
      num_channels: input channels.
      use_absolute_position_embeddings: add learned position embeddings after the CLS token.
      use_relative_position_bias: a relative position bias table in every layer.
      use_shared_relative_position_bias: one table in the encoder, added in every layer.
      layer_scale_init_value: > 0 means the blocks have per-channel ``lambda_1``/``lambda_2``.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    head_dim: int = 64
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    use_absolute_position_embeddings: bool = False
    use_relative_position_bias: bool = False
    use_shared_relative_position_bias: bool = False
    layer_scale_init_value: float = 0.1

    @property
    def window(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Sequence length T: the CLS token plus one token per patch."""
        return self.window**2 + 1

    @property
    def num_relative_distance(self) -> int:
        """Rows of a relative position bias table: (2W-1)^2 offsets plus 3 CLS entries."""
        return (2 * self.window - 1) ** 2 + 3

    @property
    def layer_scale(self) -> bool:
        """Whether the blocks carry ``lambda_1``/``lambda_2``."""
        return self.layer_scale_init_value > 0

    @classmethod
    def from_hf(cls, raw: dict) -> BeitConfig:
        """Builds the config from a parsed BEiT ``config.json`` (transformers 4 or 5).

        Raises:
          ValueError: for a model type other than ``beit``, an activation other than exact
            ``gelu``, or a non-square image or patch size.
        """
        if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(
                f"config.json: model_type={raw['model_type']!r} is not supported here (only 'beit')"
            )
        get = lambda name: raw.get(name, _DEFAULTS[name])  # noqa: E731
        if get("hidden_act") != "gelu":
            raise ValueError(
                f"config.json: hidden_act={get('hidden_act')!r} is not supported (only 'gelu')"
            )
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        return cls(
            hidden_size=hidden,
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=heads,
            intermediate_size=int(get("intermediate_size")),
            # BeitAttention reads getattr(config, "head_dim", hidden_size // heads).
            head_dim=int(raw.get("head_dim") or hidden // heads),
            layer_norm_eps=float(get("layer_norm_eps")),
            image_size=_square(raw, "image_size"),
            patch_size=_square(raw, "patch_size"),
            num_channels=int(get("num_channels")),
            use_absolute_position_embeddings=bool(get("use_absolute_position_embeddings")),
            use_relative_position_bias=bool(get("use_relative_position_bias")),
            use_shared_relative_position_bias=bool(get("use_shared_relative_position_bias")),
            layer_scale_init_value=float(get("layer_scale_init_value")),
        )


@functools.lru_cache(maxsize=8)
def relative_position_index(window: int) -> np.ndarray:
    """Index into a relative position bias table for every (query, key) token pair.

    Mirrors ``BeitRelativePositionBias.generate_relative_position_index`` for a square window.

    Args:
      window: patches per side W.

    Returns:
      int32 ``[W*W + 1, W*W + 1]``; row/column 0 is the CLS token. Patch pairs index
      ``(dy + W - 1) * (2W - 1) + (dx + W - 1)``; CLS-to-token (row 0) is ``R - 3``,
      token-to-CLS (column 0) ``R - 2`` and CLS-to-CLS ``R - 1``, with ``R = (2W-1)^2 + 3``.
    """
    num_relative_distance = (2 * window - 1) ** 2 + 3
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    coords = coords.reshape(2, -1)  # 2, W*W in row-major patch order
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    rel[:, :, 0] += window - 1
    rel[:, :, 1] += window - 1
    rel[:, :, 0] *= 2 * window - 1
    index = np.zeros((window * window + 1,) * 2, dtype=np.int32)
    index[1:, 1:] = rel.sum(-1)
    # The same order of writes as transformers: the last one wins at [0, 0].
    index[0, 0:] = num_relative_distance - 3
    index[0:, 0] = num_relative_distance - 2
    index[0, 0] = num_relative_distance - 1
    return index


def _init(init: Any, names: tuple[str | None, ...]) -> Any:
    return sharding.with_logical_axes(init, names)


_ZEROS = nn.initializers.zeros_init()


class _RelativePositionBias(nn.Module):
    """A learned ``[R, H]`` table gathered into an additive attention bias ``[H, T, T]``."""

    config: BeitConfig

    @nn.compact
    def __call__(self) -> jax.Array:
        cfg = self.config
        table = self.param(
            "relative_position_bias_table",
            _init(_ZEROS, (None, None)),
            (cfg.num_relative_distance, cfg.num_attention_heads),
        )
        bias = jnp.asarray(table, jnp.float32)[relative_position_index(cfg.window)]  # T, T, H
        return bias.transpose(2, 0, 1)


class _Layer(nn.Module):
    """One pre-LayerNorm BEiT block (``BeitLayer``); scanned over the depth."""

    config: BeitConfig
    dtype: Dtype = jnp.float32
    options: stack.EncoderOptions = stack.EncoderOptions()
    collect: stack.Collect = pooling.identity

    @nn.compact
    def __call__(
        self, x: jax.Array, shared_bias: jax.Array | None, pool_mask: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """Runs the block.

        Args:
          x: float32 ``[B, T, D]``, the residual stream.
          shared_bias: float32 ``[1, H, T, T]`` (the encoder's shared relative position bias)
            or None.
          pool_mask: bool ``[B, T]`` positions a pooling uses, or None (every position).

        Returns:
          float32 ``[B, T, D]`` and what ``collect`` emits for it.
        """
        cfg = self.config
        b, t, d = x.shape
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim
        inner = heads * head_dim

        def dense(n: int, names: tuple, name: str, use_bias: bool = True) -> nn.Dense:
            return nn.Dense(
                n,
                use_bias=use_bias,
                dtype=self.dtype,
                kernel_init=_init(nn.initializers.lecun_normal(), names),
                # A bias is split with its output dim when that is sharded; "embed" stays whole.
                bias_init=_init(_ZEROS, (names[1] if names[1] != "embed" else None,)),
                name=name,
            )

        def norm(y: jax.Array, name: str) -> jax.Array:
            layer = nn.LayerNorm(
                epsilon=cfg.layer_norm_eps,
                dtype=jnp.float32,
                scale_init=_init(nn.initializers.ones_init(), (None,)),
                bias_init=_init(_ZEROS, (None,)),
                name=name,
            )
            return layer(y.astype(jnp.float32)).astype(self.dtype)

        def scale(name: str) -> jax.Array | float:
            if not cfg.layer_scale:
                return 1.0
            init = nn.initializers.constant(cfg.layer_scale_init_value)
            lam = self.param(name, _init(init, (None,)), (d,))
            return jnp.asarray(lam, jnp.float32).reshape(1, 1, d)  # explicit rank for broadcasting

        # Attention logits get the shared and/or this layer's relative position bias, one
        # [1, H, T, T] array for the whole batch.
        bias = shared_bias
        if cfg.use_relative_position_bias:
            own = _RelativePositionBias(cfg, name="relative_position_bias")()[None]
            bias = own if bias is None else bias + own

        h = norm(x, "layernorm_before")
        split = lambda y: y.reshape(b, t, heads, head_dim)  # noqa: E731
        q = split(dense(inner, ("embed", "heads"), "query")(h))
        k = split(dense(inner, ("embed", "kv_heads"), "key", use_bias=False)(h))
        v = split(dense(inner, ("embed", "kv_heads"), "value")(h))
        # No padding in an image: every key is real (key_mask None); scale is head_dim**-0.5.
        ctx = dot_product_attention(
            q,
            k,
            v,
            bias=bias,
            implementation=self.options.attention,
            block_size=self.options.block_size,
        ).reshape(b, t, inner)
        attn = dense(d, ("heads", "embed"), "attention_output")(ctx)
        # The residual stream stays float32 whatever the compute dtype.
        x = x + scale("lambda_1") * attn.astype(jnp.float32)

        h = norm(x, "layernorm_after")
        h = jax.nn.gelu(dense(cfg.intermediate_size, ("embed", "mlp"), "fc1")(h), approximate=False)
        h = dense(d, ("mlp", "embed"), "fc2")(h)
        x = x + scale("lambda_2") * h.astype(jnp.float32)
        x = stack.LayerOutput(name="layer_output")(x, None)
        return x, self.collect(x, pool_mask)


class BeitEncoder(nn.Module):
    """BEiT image encoder returning the embedding output and every layer's output.

    Attributes:
      config: the model configuration.
      dtype: computation dtype of the convolution and matmuls; LayerNorm, softmax and the
        residual stream are float32.
      options: attention implementation, block size and remat policy.
    """

    config: BeitConfig
    dtype: Dtype = jnp.float32
    options: stack.EncoderOptions = stack.EncoderOptions()
    adapters: Adapters = Adapters()

    @nn.compact
    @adapters_lib.in_call
    def __call__(
        self,
        pixel_values: jax.Array,
        *,
        collect: stack.Collect = pooling.identity,
        pool_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Encodes a batch of images.

        Args:
          pixel_values: float ``[B, num_channels, image_size, image_size]`` (NCHW, as
            transformers takes it).
          collect: what each layer emits (:mod:`gaam_jax.encoders.pooling`); default its hidden
            states.
          pool_mask: bool ``[B, T]`` positions a pooling uses; default None, every position.

        Returns:
          float32 ``[B, num_hidden_layers + 1, ...]`` of what ``collect`` emits, by default
          ``[B, L + 1, T, hidden_size]`` with ``T = (image_size // patch_size)**2 + 1``: the
          embedding output, then each layer's output, as
          ``torch.stack(BeitModel(...).hidden_states, 1)`` (no final ``layernorm``: transformers
          applies it to ``last_hidden_state`` only).

        Raises:
          ValueError: if pixel_values is not ``[B, num_channels, image_size, image_size]``.
        """
        cfg = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1] != cfg.num_channels:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}, expected "
                f"[batch, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}]"
            )
        if pixel_values.shape[2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"pixel_values are {pixel_values.shape[2]}x{pixel_values.shape[3]} but image_size "
                f"is {cfg.image_size}: resize the images (position interpolation is not supported)"
            )
        if pool_mask is not None:
            pool_mask = pool_mask.astype(bool)
        d = cfg.hidden_size
        p = cfg.patch_size
        patches = nn.Conv(
            d,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=_init(nn.initializers.lecun_normal(), (None, None, None, "embed")),
            bias_init=_init(_ZEROS, (None,)),
            name="patch_embeddings",
        )(jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype))
        b = patches.shape[0]
        # Row-major over (patch row, patch column), as torch's flatten(2) of NCHW.
        patches = patches.reshape(b, -1, d).astype(jnp.float32)
        cls = self.param("cls_token", _init(_ZEROS, (None, None, None)), (1, 1, d))
        cls = jnp.broadcast_to(jnp.asarray(cls, jnp.float32), (b, 1, d))
        x = jnp.concatenate([cls, patches], axis=1)
        if cfg.use_absolute_position_embeddings:
            pos = self.param(
                "position_embeddings", _init(_ZEROS, (None, None, None)), (1, cfg.num_tokens, d)
            )
            x = x + jnp.asarray(pos, jnp.float32)

        # The shared table is gathered once and broadcast to every scanned layer.
        shared = None
        if cfg.use_shared_relative_position_bias:
            shared = _RelativePositionBias(cfg, name="shared_relative_position_bias")()[None]
        layers = stack.scanned(_Layer, cfg.num_hidden_layers, 2, self.options)
        first = collect(x, pool_mask)
        _, emitted = layers(cfg, self.dtype, self.options, collect, name="layers")(
            x, shared, pool_mask
        )
        return stack.with_layer_axis(first, emitted)


# Names as checkpoints store them (transformers 4 and 5 save_pretrained), each followed by the
# name of the same tensor inside a transformers 5 module (state_dict of BeitModel).
def _layer_names(i: int) -> dict[str, tuple[str, ...]]:
    old, new = f"encoder.layer.{i}.", f"layers.{i}."
    return {
        "query": (old + "attention.attention.query", new + "attention.q_proj"),
        "key": (old + "attention.attention.key", new + "attention.k_proj"),
        "value": (old + "attention.attention.value", new + "attention.v_proj"),
        "attention_output": (old + "attention.output.dense", new + "attention.o_proj"),
        "fc1": (old + "intermediate.dense", new + "mlp.fc1"),
        "fc2": (old + "output.dense", new + "mlp.fc2"),
        "layernorm_before": (old + "layernorm_before", new + "layernorm_before"),
        "layernorm_after": (old + "layernorm_after", new + "layernorm_after"),
        "lambda_1": (old + "lambda_1", new + "lambda_1"),
        "lambda_2": (old + "lambda_2", new + "lambda_2"),
        "relative_position_bias": (
            old + "attention.attention.relative_position_bias",
            new + "relative_position_bias",
        ),
    }


def params_from_hf(config: BeitConfig, tensors: Mapping[str, np.ndarray]) -> dict:
    """Maps checkpoint tensors onto the :class:`BeitEncoder` params tree (views, no copies).

    Args:
      config: the model configuration.
      tensors: name -> array as stored, from ``BeitModel`` (``embeddings.cls_token``,
        ``encoder.layer.0.attention.attention.query.weight``, ...) or a head model with the
        ``beit.`` prefix (``BeitForMaskedImageModeling``, ``BeitForImageClassification``); head
        tensors (``lm_head.*``, ``layernorm.*``, ``classifier.*``, ``pooler.*``), the mask token
        and stored ``relative_position_index`` buffers are ignored.

    Returns:
      The params tree without the ``{'params': ...}`` wrapper; arrays keep their stored dtype.
      ``params['layers']`` holds the blocks as lazy ``[layers, ...]``
      :class:`~gaam_jax.encoders.stack.StackedTensor` views of the per-layer tensors.

    Raises:
      ValueError: if a tensor is missing or has an unexpected shape.
    """
    prefix = _HF_PREFIX if any(name.startswith(_HF_PREFIX) for name in tensors) else ""

    def get(names: Sequence[str], shape: tuple[int, ...]) -> np.ndarray:
        for name in names:
            if prefix + name in tensors:
                value = tensors[prefix + name]
                if tuple(value.shape) != shape:
                    raise ValueError(
                        f"checkpoint tensor {prefix + name} has shape {tuple(value.shape)}, "
                        f"expected {shape}"
                    )
                return value
        raise ValueError(f"checkpoint is missing tensor {prefix + names[0]}")

    def suffixed(names: Sequence[str], suffix: str) -> list[str]:
        return [f"{n}.{suffix}" for n in names]

    def dense(names: Sequence[str], n_in: int, n_out: int, use_bias: bool = True) -> dict:
        # torch Linear stores [out, in]; Flax Dense wants [in, out].
        out = {"kernel": get(suffixed(names, "weight"), (n_out, n_in)).T}
        if use_bias:
            out["bias"] = get(suffixed(names, "bias"), (n_out,))
        return out

    def norm(names: Sequence[str]) -> dict:
        d = config.hidden_size
        return {
            "scale": get(suffixed(names, "weight"), (d,)),
            "bias": get(suffixed(names, "bias"), (d,)),
        }

    def table(names: Sequence[str]) -> dict:
        shape = (config.num_relative_distance, config.num_attention_heads)
        return {
            "relative_position_bias_table": get(
                suffixed(names, "relative_position_bias_table"), shape
            )
        }

    d, ff, c, p = (
        config.hidden_size,
        config.intermediate_size,
        config.num_channels,
        config.patch_size,
    )
    inner = config.num_attention_heads * config.head_dim
    proj = ["embeddings.patch_embeddings.projection"]
    params: dict[str, Any] = {
        "patch_embeddings": {
            # torch Conv2d stores [out, in, kh, kw]; Flax Conv wants [kh, kw, in, out].
            "kernel": get(suffixed(proj, "weight"), (d, c, p, p)).transpose(2, 3, 1, 0),
            "bias": get(suffixed(proj, "bias"), (d,)),
        },
        "cls_token": get(["embeddings.cls_token"], (1, 1, d)),
    }
    if config.use_absolute_position_embeddings:
        params["position_embeddings"] = get(
            ["embeddings.position_embeddings"], (1, config.num_tokens, d)
        )
    if config.use_shared_relative_position_bias:
        params["shared_relative_position_bias"] = table(
            ["encoder.relative_position_bias", "shared_position_bias"]
        )

    def layer(i: int) -> dict:
        names = _layer_names(i)
        out = {
            "layernorm_before": norm(names["layernorm_before"]),
            "query": dense(names["query"], d, inner),
            "key": dense(names["key"], d, inner, use_bias=False),
            "value": dense(names["value"], d, inner),
            "attention_output": dense(names["attention_output"], inner, d),
            "layernorm_after": norm(names["layernorm_after"]),
            "fc1": dense(names["fc1"], d, ff),
            "fc2": dense(names["fc2"], ff, d),
        }
        if config.layer_scale:
            out["lambda_1"] = get(names["lambda_1"], (d,))
            out["lambda_2"] = get(names["lambda_2"], (d,))
        if config.use_relative_position_bias:
            out["relative_position_bias"] = table(names["relative_position_bias"])
        return out

    # One lazy [layers, ...] array per parameter: read slice by slice when placed on devices.
    params["layers"] = stack.stack_layers([layer(i) for i in range(config.num_hidden_layers)])
    return params


def example_inputs(config_json: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract inputs of batch 1 for ``jax.eval_shape``: float32 ``pixel_values``.

    Their shape is ``[1, num_channels, image_size, image_size]`` (defaults 3 and 224, as
    transformers').
    """
    size = config_json.get("image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    shape = (1, config_json.get("num_channels", 3), h, w)
    return {"pixel_values": jax.ShapeDtypeStruct(shape, jnp.float32)}


def peft_module_names(path: tuple[str, ...], layer: int | None) -> tuple[str, ...]:
    """``BeitModel``'s module names of our Dense at ``path`` in layer ``layer`` (none on top).

    Transformers 5's name first, then transformers 4's: the checkpoint loader's table.
    """
    if layer is None:
        return ()
    names = _layer_names(layer).get("/".join(path[1:]))
    return () if names is None else tuple(reversed(names))


class BeitHead(nn.Module):
    """``BeitForImageClassification``'s head: a LayerNorm on the pooled token, classifier.

    With ``use_mean_pooling`` (BEiT's default), the mean of the last layer's patch tokens (pool
    mask: every token but the class token) -> ``pooler_norm`` (``beit.pooler.layernorm``) ->
    ``classifier``; without it, the last layer's class token -> ``final_norm``
    (``beit.layernorm``, the final LayerNorm transformers applies to ``last_hidden_state``; per
    token, so applying it to the class token alone is the same) -> ``classifier``.

    Attributes:
      num_classes: C.
      use_mean_pooling: the mean of the patch tokens and ``pooler_norm``; False: the class token
        and ``final_norm``.
      layer_norm_eps: the norm's epsilon (``config.layer_norm_eps``).
      init_std: std of the fresh classifier kernel.
    """

    num_classes: int
    use_mean_pooling: bool = True
    layer_norm_eps: float = 1e-12
    init_std: float = head_parts.DEFAULT_STD

    @nn.compact
    def __call__(self, features: jax.Array, *, train: bool = False) -> jax.Array:
        """Classifies.

        Args:
          features: float32 ``[B, L+1, H]``: every layer's mean over the patch tokens (pooling
            ``mean``, class token masked out), or its class token (``first``).
          train: unused (no dropout in this head).

        Returns:
          float32 logits ``[B, C]``.
        """
        del train
        name = "pooler_norm" if self.use_mean_pooling else "final_norm"
        x = head_parts.layer_norm(self.layer_norm_eps, name)(head_parts.last_state(features))
        classifier = head_parts.dense(
            self.num_classes, self.init_std, "classifier", ("embed", "classes")
        )
        return classifier(x)


def head_options_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`BeitHead`'s options in ``config.json`` (transformers' defaults if absent)."""
    return {
        "use_mean_pooling": bool(config.get("use_mean_pooling", True)),
        "layer_norm_eps": float(config.get("layer_norm_eps", 1e-12)),
        "init_std": head_parts.init_std(config),
    }


def head_params_from_hf(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> dict:
    """:class:`BeitHead`'s parameters in a checkpoint, those it holds.

    ``[beit.]pooler.layernorm.*`` -> ``pooler_norm`` (``use_mean_pooling``) or
    ``[beit.]layernorm.*`` -> ``final_norm``; ``classifier.*`` (any number of labels).
    """
    read = head_parts.HeadTensors(tensors)
    d = int(config.get("hidden_size", 768))
    out = {}
    if config.get("use_mean_pooling", True):
        out["pooler_norm"] = read.norm([f"{_HF_PREFIX}pooler.layernorm", "pooler.layernorm"], d)
    else:
        out["final_norm"] = read.norm([f"{_HF_PREFIX}layernorm", "layernorm"], d)
    out["classifier"] = read.dense(["classifier"], d, None)
    return out


def _head_pooling(options: Mapping[str, Any]) -> str:
    return "mean" if options.get("use_mean_pooling", True) else "first"


def head_pool_mask(
    options: Mapping[str, Any], encoder: nn.Module, inputs: Mapping[str, jax.Array]
) -> jax.Array | None:
    """Every token but the class token, bool ``[B, T]``, with ``use_mean_pooling``; else None.

    Raises:
      ValueError: no ``pixel_values``.
    """
    if not options.get("use_mean_pooling", True):
        return None
    pixels = head_parts.required_input(MODEL_TYPE, inputs, "pixel_values")
    t = encoder.config.num_tokens
    return jnp.broadcast_to(jnp.arange(t)[None, :] >= 1, (pixels.shape[0], t))


ARCHITECTURE = Architecture(
    model_type=MODEL_TYPE,
    config_cls=BeitConfig,
    encoder_cls=BeitEncoder,
    # Looked up when called, so that a replaced module function (a test's) is the one used.
    params_from_hf=lambda config, tensors: params_from_hf(config, tensors),
    modality="image",
    example_inputs=example_inputs,
    hf_base_class="BeitModel",
    hf_prefix=_HF_PREFIX,
    peft_module_names=peft_module_names,
    head=HfHead(
        module=BeitHead,
        options_from_hf=head_options_from_hf,
        params_from_hf=head_params_from_hf,
        hf_modules={
            "pooler_norm": f"{_HF_PREFIX}pooler.layernorm",
            "final_norm": f"{_HF_PREFIX}layernorm",
            "classifier": "classifier",
        },
        pooling=_head_pooling,
        pool_mask=head_pool_mask,
    ),
)
