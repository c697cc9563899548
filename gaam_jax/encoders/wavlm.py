"""A Flax WavLM encoder equal to transformers 5.24 ``WavLMModel`` (eval) hidden states.

Pipeline (as ``modeling_wavlm.py``): a convolutional feature encoder over the raw waveform
(group norm on the first conv only, or layer norm on every conv), a feature projection
(LayerNorm + Dense), frames zeroed under the frame-level mask, a grouped, weight-normed
convolutional positional embedding, then ``num_hidden_layers`` Transformer layers (one scanned
layer, parameters stacked under ``params['layers']``) with a gated relative position bias: the
bucket table (layer 0's ``rel_attn_embed`` in the checkpoint, a top-level parameter here) gives one
``[1, H, T, T]`` bias, computed once, that every layer gates with its own ``gru_rel_pos_*``
parameters.

``do_stable_layer_norm=False`` (WavLM-Base/-Base+): the encoder LayerNorm follows the positional
embedding and the layers are post-norm. ``True`` (WavLM-Large): pre-norm layers and a final
LayerNorm after them. transformers 5 records the hidden states as the layers' outputs, so its last
hidden state is WITHOUT that final LayerNorm; transformers 4 (and the WavLM paper's features)
applied it. :attr:`WavLMEncoder.final_norm_on_last_state` selects the transformers 4 behaviour.

:data:`ARCHITECTURE` holds what the rest of the project knows about WavLM (classes, Hugging Face
names, inputs); :class:`WavLMHead` is ``WavLMForSequenceClassification``'s head.
"""

from __future__ import annotations

import dataclasses
import math
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

MODEL_TYPE = "wavlm"
# WavLMModel's attribute in the head models (WavLMForSequenceClassification.wavlm, ...).
_HF_PREFIX = "wavlm."
# Each Dense: its module in WavLMModel ("{i}": the layer index), which the checkpoint names its
# weights after and peft its adapters; in the layer stack, then outside it.
_HF_LAYER_LINEARS = {
    "q_proj": "encoder.layers.{i}.attention.q_proj",
    "k_proj": "encoder.layers.{i}.attention.k_proj",
    "v_proj": "encoder.layers.{i}.attention.v_proj",
    "out_proj": "encoder.layers.{i}.attention.out_proj",
    "gru_rel_pos_linear": "encoder.layers.{i}.attention.gru_rel_pos_linear",
    "intermediate_dense": "encoder.layers.{i}.feed_forward.intermediate_dense",
    "output_dense": "encoder.layers.{i}.feed_forward.output_dense",
}
_HF_TOP_LINEARS = {"feature_projection": "feature_projection.projection"}

Dtype = Any

# Feature-extractor norms use PyTorch's default eps, not config.layer_norm_eps.
_CONV_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class WavLMConfig:
    """The fields of a WavLM ``config.json`` that change the eval-mode hidden states."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "group"
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    num_buckets: int = 320
    max_bucket_distance: int = 800
    do_stable_layer_norm: bool = False
    layer_norm_eps: float = 1e-5
    # transformers' capture_outputs replaces hidden_states[-1] by last_hidden_state when the
    # config sets this (default off for WavLM).
    tie_last_hidden_states: bool = False

    @classmethod
    def from_hf(cls, raw: dict) -> WavLMConfig:
        """Reads a parsed transformers 4 or 5 WavLM ``config.json``.

        Raises:
          ValueError: (one line) for a value this module does not implement.
        """
        if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"config.json: model_type={raw.get('model_type')!r} is not 'wavlm'")
        for key in ("hidden_act", "feat_extract_activation"):
            if raw.get(key, "gelu") != "gelu":
                raise ValueError(
                    f"config.json: {key}={raw[key]!r} is not supported (only 'gelu', exact erf)"
                )
        if raw.get("feat_extract_norm", "group") not in ("group", "layer"):
            raise ValueError(
                f"config.json: feat_extract_norm={raw['feat_extract_norm']!r} is not supported "
                "(only 'group' or 'layer')"
            )
        if raw.get("tie_last_hidden_states") and raw.get("add_adapter"):
            raise ValueError(
                "config.json: tie_last_hidden_states=True with add_adapter=True makes the last "
                "hidden state the adapter's output, which is not supported"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names and v is not None}
        for key in ("conv_dim", "conv_kernel", "conv_stride"):
            if key in kwargs:
                kwargs[key] = tuple(int(v) for v in kwargs[key])
        config = cls(**kwargs)
        n = len(config.conv_dim)
        if len(config.conv_kernel) != n or len(config.conv_stride) != n:
            raise ValueError(
                f"config.json: conv_dim, conv_kernel, conv_stride have lengths {n}, "
                f"{len(config.conv_kernel)}, {len(config.conv_stride)}; they must be equal"
            )
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"config.json: hidden_size={config.hidden_size} is not divisible by "
                f"num_attention_heads={config.num_attention_heads}"
            )
        if config.hidden_size % config.num_conv_pos_embedding_groups:
            raise ValueError(
                f"config.json: hidden_size={config.hidden_size} is not divisible by "
                f"num_conv_pos_embedding_groups={config.num_conv_pos_embedding_groups}"
            )
        return config

    def frame_lengths(self, lengths: jax.Array) -> jax.Array:
        """Frame counts for waveform lengths (transformers' ``_get_feat_extract_output_lengths``).

        Args:
          lengths: int array of waveform lengths (any shape).

        Returns:
          int array of frame counts, same shape.
        """
        for kernel, stride in zip(self.conv_kernel, self.conv_stride, strict=True):
            lengths = (lengths - kernel) // stride + 1
        return lengths


def _init(names: tuple[str | None, ...], init: Any = None) -> Any:
    """An initializer that carries logical axis names for the sharding rules."""
    return sharding.with_logical_axes(init or nn.initializers.lecun_normal(), names)


_ZEROS = nn.initializers.zeros_init()
_ONES = nn.initializers.ones_init()


def _dense(
    features: int, names: tuple[str | None, str | None], dtype: Dtype, name: str
) -> nn.Dense:
    """Dense layer whose kernel is ``names`` and whose bias follows the output axis."""
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=_init(names),
        bias_init=_init((names[1],), _ZEROS),
        name=name,
    )


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    """A float32 LayerNorm (two-pass variance, like PyTorch)."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=_init((None,), _ONES),
        bias_init=_init((None,), _ZEROS),
        name=name,
    )


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """WavLM's bucket of ``key - query`` positions (``_relative_positions_bucket``), in numpy.

    Computed at trace time in float32 like PyTorch, so the bucket boundaries agree.

    Returns:
      int32 ``[length, length]`` (query, key).
    """
    positions = np.arange(length, dtype=np.int64)
    relative = positions[None, :] - positions[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half  # the sign: keys after the query
    relative = np.abs(relative)
    max_exact = half // 2
    is_small = relative < max_exact
    scaled = np.log(np.maximum(relative, 1).astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact))
    scaled = scaled * np.float32(half - max_exact)
    large = np.minimum((np.float32(max_exact) + scaled).astype(np.int64), half - 1)
    return (buckets + np.where(is_small, relative, large)).astype(np.int32)


class _FeatureEncoder(nn.Module):
    """Strided convs over the waveform: ``[B, T]`` -> float32 ``[B, frames, conv_dim[-1]]``."""

    config: WavLMConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, input_values: jax.Array) -> jax.Array:
        cfg = self.config
        x = input_values[:, :, None]
        for i, (dim, kernel, stride) in enumerate(
            zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride, strict=True)
        ):
            x = nn.Conv(
                dim,
                (kernel,),
                strides=(stride,),
                padding="VALID",
                use_bias=cfg.conv_bias,
                dtype=self.dtype,
                kernel_init=_init((None, "conv_in", "conv_out")),
                bias_init=_init(("conv_out",), _ZEROS),
                name=f"conv_{i}",
            )(x.astype(self.dtype))
            if cfg.feat_extract_norm == "layer":
                x = _layer_norm(_CONV_NORM_EPS, f"conv_norm_{i}")(x)
            elif i == 0:
                # GroupNorm with one group per channel: each channel normalised over time.
                x = nn.GroupNorm(
                    num_groups=dim,
                    epsilon=_CONV_NORM_EPS,
                    dtype=jnp.float32,
                    use_fast_variance=False,
                    scale_init=_init((None,), _ONES),
                    bias_init=_init((None,), _ZEROS),
                    name="conv_norm_0",
                )(x)
            x = _gelu(x)
        return x.astype(jnp.float32)


class _PositionalConv(nn.Module):
    """Grouped convolution with weight norm over all axes but the kernel axis (``dim=2``)."""

    config: WavLMConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        k, d, groups = (
            cfg.num_conv_pos_embeddings,
            cfg.hidden_size,
            cfg.num_conv_pos_embedding_groups,
        )
        # weight_v in Flax layout [kernel, in/groups, out]; weight_g one gain per kernel tap.
        v = self.param("weight_v", _init((None, None, "conv_out")), (k, d // groups, d))
        g = self.param("weight_g", _init((None,), _ONES), (k,))
        bias = self.param("bias", _init(("conv_out",), _ZEROS), (d,))
        v32 = v.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(v32 * v32, axis=(1, 2), keepdims=True))
        kernel = (g.astype(jnp.float32)[:, None, None] * v32 / norm).astype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel,
            window_strides=(1,),
            padding=[(k // 2, k // 2)],
            dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=groups,
            preferred_element_type=jnp.float32,
        )
        # An even kernel yields one frame too many: PyTorch's WavLMSamePadLayer drops the last.
        y = y[:, : x.shape[1]] + bias.astype(jnp.float32)[None, None, :]
        return _gelu(y)


class _Layer(nn.Module):
    """One Transformer layer with the gated relative position bias (post- or pre-norm).

    Scanned over the depth; the residual stream stays float32.
    """

    config: WavLMConfig
    dtype: Dtype = jnp.float32
    options: stack.EncoderOptions = stack.EncoderOptions()
    collect: stack.Collect = pooling.identity

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        position_bias: jax.Array,
        key_mask: jax.Array | None,
        pool_mask: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array]:
        """Runs the layer.

        Args:
          x: float32 ``[B, T, hidden]``.
          position_bias: float32 ``[1, heads, T, T]`` (query, key), shared by every layer.
          key_mask: bool ``[B, T]``, True for real frames; None when every frame is real.
          pool_mask: bool ``[B, T]`` or None, passed to ``collect``.

        Returns:
          (float32 ``[B, T, hidden]``, what ``collect`` emits for it).
        """
        cfg = self.config
        b, t, d = x.shape
        heads = cfg.num_attention_heads
        hd = d // heads
        stable = cfg.do_stable_layer_norm
        attn_norm = _layer_norm(cfg.layer_norm_eps, "layer_norm")
        ff_norm = _layer_norm(cfg.layer_norm_eps, "final_layer_norm")

        h = attn_norm(x) if stable else x
        hc = h.astype(self.dtype)
        split = lambda y: y.reshape(b, t, heads, hd)  # noqa: E731
        q = split(_dense(d, ("embed", "heads"), self.dtype, "q_proj")(hc))
        k = split(_dense(d, ("embed", "heads"), self.dtype, "k_proj")(hc))
        v = split(_dense(d, ("embed", "heads"), self.dtype, "v_proj")(hc))

        # Gate of the position bias from this layer's (normed) input, per head and query.
        gate = _dense(8, (None, None), self.dtype, "gru_rel_pos_linear")(split(hc))
        gate = jax.nn.sigmoid(gate.astype(jnp.float32).reshape(b, t, heads, 2, 4).sum(-1))
        const = self.param("gru_rel_pos_const", _init((None,), _ONES), (heads,))
        gate = gate[..., 0] * (gate[..., 1] * const.astype(jnp.float32)[None, None, :] - 1.0) + 2.0
        bias = gate.transpose(0, 2, 1)[..., None] * position_bias  # [B, H, T, T]

        # PyTorch scales q before the product (hence scale=1.0).
        q = q * jnp.asarray(hd**-0.5, q.dtype)
        ctx = dot_product_attention(
            q,
            k,
            v,
            bias=bias,
            key_mask=key_mask,
            scale=1.0,
            implementation=self.options.attention,
            block_size=self.options.block_size,
        )
        attn = _dense(d, ("heads", "embed"), self.dtype, "out_proj")(ctx.reshape(b, t, d))
        x = x + attn.astype(jnp.float32)

        def feed_forward(y: jax.Array) -> jax.Array:
            y = _dense(cfg.intermediate_size, ("embed", "mlp"), self.dtype, "intermediate_dense")(
                y.astype(self.dtype)
            )
            y = _gelu(y)
            return _dense(d, ("mlp", "embed"), self.dtype, "output_dense")(y).astype(jnp.float32)

        if stable:
            x = x + feed_forward(ff_norm(x))
        else:
            x = attn_norm(x)
            x = ff_norm(x + feed_forward(x))
        x = stack.LayerOutput(name="layer_output")(x, key_mask)
        return x, self.collect(x, pool_mask)


class WavLMEncoder(nn.Module):
    """WavLM returning every hidden state, as transformers 5.24 ``WavLMModel`` in eval mode.

    Attributes:
      config: the model configuration.
      dtype: computation dtype of convolutions and matmuls; norms, softmax and the residual
        stream are float32.
      final_norm_on_last_state: apply the stable-layer-norm encoder's final LayerNorm to the last
        hidden state, as transformers 4 did (the WavLM paper's features). transformers 5 leaves it
        out (the default). Has no effect when ``do_stable_layer_norm`` is False (no final norm).
      options: attention implementation, block size and remat policy.
    """

    config: WavLMConfig
    dtype: Dtype = jnp.float32
    final_norm_on_last_state: bool = False
    options: stack.EncoderOptions = stack.EncoderOptions()
    adapters: Adapters = Adapters()

    @nn.compact
    @adapters_lib.in_call
    def __call__(
        self,
        input_values: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        collect: stack.Collect = pooling.identity,
        pool_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Encodes a padded batch of waveforms.

        Args:
          input_values: float ``[batch, samples]`` waveforms.
          attention_mask: optional ``[batch, samples]``, 1/True for real samples.
          collect: what each layer emits (:mod:`gaam_jax.encoders.pooling`); default its hidden
            states.
          pool_mask: bool ``[batch, frames]`` frames a pooling uses; default the frames of the
            real samples when ``attention_mask`` is given, else None (every frame).

        Returns:
          float32 ``[batch, num_hidden_layers + 1, ...]`` of what ``collect`` emits (by default
          ``[batch, L + 1, frames, hidden_size]``): for the encoder input (after the positional
          embedding, and after the encoder LayerNorm when not stable), then every layer's output.
        """
        cfg = self.config
        if input_values.ndim != 2:
            raise ValueError(f"input_values must be [batch, samples], got {input_values.shape}")
        if attention_mask is not None and attention_mask.shape != input_values.shape:
            raise ValueError(
                f"attention_mask {attention_mask.shape} must have input_values' shape "
                f"{input_values.shape}"
            )
        feats = _FeatureEncoder(cfg, self.dtype, name="feature_extractor")(input_values)
        frames = feats.shape[1]
        if frames < 1:
            raise ValueError(f"{input_values.shape[1]} samples are too few for one frame")
        feats = _layer_norm(cfg.layer_norm_eps, "feature_projection_norm")(feats)
        x = _dense(cfg.hidden_size, ("conv_in", "embed"), self.dtype, "feature_projection")(
            feats.astype(self.dtype)
        ).astype(jnp.float32)

        key_mask = None
        if attention_mask is not None:
            key_mask = _frame_mask(cfg, attention_mask, frames)
            x = jnp.where(key_mask[:, :, None], x, 0.0)
        pool_mask = key_mask if pool_mask is None else pool_mask.astype(bool)

        x = x + _PositionalConv(cfg, self.dtype, name="pos_conv")(x)
        encoder_norm = _layer_norm(cfg.layer_norm_eps, "encoder_layer_norm")
        if not cfg.do_stable_layer_norm:
            x = encoder_norm(x)

        # The bucket table is layer 0's (rel_attn_embed); every layer gates the same bias.
        table = self.param(
            "rel_attn_embed",
            _init((None, None), nn.initializers.normal(1.0)),
            (cfg.num_buckets, cfg.num_attention_heads),
        )
        buckets = relative_position_buckets(frames, cfg.num_buckets, cfg.max_bucket_distance)
        position_bias = table.astype(jnp.float32)[buckets].transpose(2, 0, 1)[None]

        layers = stack.scanned(_Layer, cfg.num_hidden_layers, 3, self.options)
        first = collect(x, pool_mask)
        x, emitted = layers(cfg, self.dtype, self.options, collect, name="layers")(
            x, position_bias, key_mask, pool_mask
        )
        last = None
        if cfg.do_stable_layer_norm:
            normed = encoder_norm(x)  # created always, so the params match the checkpoint
            if self.final_norm_on_last_state or cfg.tie_last_hidden_states:
                last = collect(normed, pool_mask)
        return stack.with_layer_axis(first, emitted, last).astype(jnp.float32)


def _frame_mask(cfg: WavLMConfig, attention_mask: jax.Array, frames: int) -> jax.Array:
    """Frame-level mask as transformers' ``_get_feature_vector_attention_mask``.

    It marks frame ``length - 1`` and everything before it, where ``length`` comes from the conv
    formula on the number of real samples; a non-positive length indexes from the end, as
    PyTorch's negative indexing does.
    """
    lengths = cfg.frame_lengths(jnp.sum(attention_mask.astype(jnp.int32), axis=-1))
    last = lengths - 1
    last = jnp.where(last < 0, last + frames, last)
    return jnp.arange(frames)[None, :] <= last[:, None]


_WEIGHT_NORM_NAMES = (
    ("parametrizations.weight.original0", "parametrizations.weight.original1"),
    ("weight_g", "weight_v"),
)


def params_from_hf(config: WavLMConfig, tensors: Mapping[str, np.ndarray]) -> dict:
    """Maps a transformers WavLM checkpoint onto :class:`WavLMEncoder` params (views, no copies).

    Args:
      config: the model configuration.
      tensors: checkpoint tensors by stored name, from ``WavLMModel`` or a head model
        (``wavlm.`` prefix; head tensors such as ``lm_head``, ``projector``, ``classifier``,
        ``adapter`` and ``masked_spec_embed`` are ignored). The positional conv's weight norm may be
        stored under the new parametrization names (``original0``/``original1``) or the old ones
        (``weight_g``/``weight_v``).

    Returns:
      The params tree (no ``{'params': ...}`` wrapper); ``params['layers']`` holds the layers'
      parameters as lazy ``[layers, ...]`` :class:`~gaam_jax.encoders.stack.StackedTensor` views.

    Raises:
      ValueError: (one line) for a missing tensor or a wrong shape.
    """
    prefix = _HF_PREFIX if any(k.startswith(_HF_PREFIX) for k in tensors) else ""

    def has(name: str) -> bool:
        return prefix + name in tensors

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if not has(name):
            raise ValueError(f"checkpoint: missing tensor {prefix + name!r}")
        value = tensors[prefix + name]
        if tuple(value.shape) != shape:
            raise ValueError(
                f"checkpoint: {prefix + name} has shape {tuple(value.shape)}, expected {shape}"
            )
        return value

    def dense(name: str, n_in: int, n_out: int) -> dict:
        return {
            "kernel": get(f"{name}.weight", (n_out, n_in)).T,
            "bias": get(f"{name}.bias", (n_out,)),
        }

    def norm(name: str, n: int) -> dict:
        return {"scale": get(f"{name}.weight", (n,)), "bias": get(f"{name}.bias", (n,))}

    cfg = config
    d, ff, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    params: dict[str, Any] = {}
    fe: dict[str, Any] = {}
    in_dim = 1
    for i, (dim, kernel) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel, strict=True)):
        p = f"feature_extractor.conv_layers.{i}"
        conv = {"kernel": get(f"{p}.conv.weight", (dim, in_dim, kernel)).transpose(2, 1, 0)}
        if cfg.conv_bias:
            conv["bias"] = get(f"{p}.conv.bias", (dim,))
        fe[f"conv_{i}"] = conv
        if cfg.feat_extract_norm == "layer" or i == 0:
            fe[f"conv_norm_{i}"] = norm(f"{p}.layer_norm", dim)
        in_dim = dim
    params["feature_extractor"] = fe
    params["feature_projection_norm"] = norm("feature_projection.layer_norm", cfg.conv_dim[-1])
    params["feature_projection"] = dense(_HF_TOP_LINEARS["feature_projection"], cfg.conv_dim[-1], d)

    k, groups = cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups
    conv = "encoder.pos_conv_embed.conv"
    found = [names for names in _WEIGHT_NORM_NAMES if has(f"{conv}.{names[0]}")]
    if not found:
        raise ValueError(
            f"checkpoint: missing tensor {prefix + conv}.parametrizations.weight.original0 "
            "(or the old name weight_g)"
        )
    g_name, v_name = found[0]
    params["pos_conv"] = {
        "weight_v": get(f"{conv}.{v_name}", (d, d // groups, k)).transpose(2, 1, 0),
        "weight_g": get(f"{conv}.{g_name}", (1, 1, k)).reshape(k),
        "bias": get(f"{conv}.bias", (d,)),
    }
    params["encoder_layer_norm"] = norm("encoder.layer_norm", d)
    params["rel_attn_embed"] = get(
        "encoder.layers.0.attention.rel_attn_embed.weight", (cfg.num_buckets, heads)
    )

    def layer(i: int) -> dict:
        p = f"encoder.layers.{i}"
        a = f"{p}.attention"
        name = {k: v.format(i=i) for k, v in _HF_LAYER_LINEARS.items()}
        return {
            "layer_norm": norm(f"{p}.layer_norm", d),
            "final_layer_norm": norm(f"{p}.final_layer_norm", d),
            "q_proj": dense(name["q_proj"], d, d),
            "k_proj": dense(name["k_proj"], d, d),
            "v_proj": dense(name["v_proj"], d, d),
            "out_proj": dense(name["out_proj"], d, d),
            "gru_rel_pos_linear": dense(name["gru_rel_pos_linear"], d // heads, 8),
            "gru_rel_pos_const": get(f"{a}.gru_rel_pos_const", (1, heads, 1, 1)).reshape(heads),
            "intermediate_dense": dense(name["intermediate_dense"], d, ff),
            "output_dense": dense(name["output_dense"], ff, d),
        }

    # One lazy [layers, ...] array per parameter: read slice by slice when placed on devices.
    params["layers"] = stack.stack_layers([layer(i) for i in range(cfg.num_hidden_layers)])
    return params


def example_inputs(config_json: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract inputs of batch 1 for ``jax.eval_shape``: 1 s of audio at 16 kHz.

    ``input_values`` is float32 ``[1, 16000]``.
    """
    del config_json
    return {"input_values": jax.ShapeDtypeStruct((1, 16000), jnp.float32)}


def peft_module_names(path: tuple[str, ...], layer: int | None) -> tuple[str, ...]:
    """``WavLMModel``'s module name of our Dense at ``path`` (in layer ``layer``, or on top)."""
    if layer is None:
        name = _HF_TOP_LINEARS.get("/".join(path))
        return () if name is None else (name,)
    name = _HF_LAYER_LINEARS.get("/".join(path[1:]))
    return () if name is None else (name.format(i=layer),)


class WavLMHead(nn.Module):
    """``WavLMForSequenceClassification``'s head on frame-mean states: projector, classifier.

    The last hidden state (or, with ``use_weighted_layer_sum``, the softmax(``layer_weights``)-
    weighted sum of all ``L+1``) -> mean over the real frames (the frame mask of
    ``attention_mask``; every frame without one) -> ``projector`` (Dense H->
    ``classifier_proj_size``) -> ``classifier``. transformers projects every frame and then takes
    the masked mean; the projector is affine and the mean's weights sum to one, so projecting
    the mean is the same up to rounding, and no ``[B, T, proj]`` array is built. With
    ``do_stable_layer_norm`` (WavLM-Large) transformers pools ``last_hidden_state``, which
    carries the final LayerNorm, so the encoder must have ``final_norm_on_last_state=True``; the
    weighted sum uses ``hidden_states``, whose last entry has none, so then it must be False
    (:func:`head_fit_encoder` sets it, :func:`head_check_encoder` checks it).

    Attributes:
      num_classes: C.
      classifier_proj_size: the projector's width P.
      use_weighted_layer_sum: classify the softmax(``layer_weights``)-weighted sum of all ``L+1``
        states (``layer_weights`` start at ``1 / (L+1)``, as transformers'), not the last one.
      init_std: std of the fresh kernels.
    """

    num_classes: int
    classifier_proj_size: int = 256
    use_weighted_layer_sum: bool = False
    init_std: float = head_parts.DEFAULT_STD

    @nn.compact
    def __call__(self, features: jax.Array, *, train: bool = False) -> jax.Array:
        """Classifies.

        Args:
          features: float32 ``[B, L+1, H]``, every layer's mean over the real frames (pooling
            ``mean``). Mean and weighted sum are linear and the projector affine, so this
            equals transformers' project-every-frame-then-mean up to rounding.
          train: unused (no dropout in this head).

        Returns:
          float32 logits ``[B, C]``.
        """
        del train
        x = head_parts.last_state(features)
        if self.use_weighted_layer_sum:
            n = features.shape[1]
            weights = self.param(
                "layer_weights",
                sharding.with_logical_axes(nn.initializers.constant(1.0 / n), (None,)),
                (n,),
            )
            norm = jax.nn.softmax(jnp.asarray(weights, jnp.float32))
            x = jnp.einsum(
                "bnh,n->bh", features.astype(jnp.float32), norm, precision=head_parts.HIGHEST
            )
        std = self.init_std
        x = head_parts.dense(self.classifier_proj_size, std, "projector", ("embed", None))(x)
        return head_parts.dense(self.num_classes, std, "classifier", (None, "classes"))(x)


def head_options_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`WavLMHead`'s options in ``config.json`` (transformers' defaults if absent).

    Raises:
      ValueError: ``add_adapter`` (transformers' classifier refuses it too).
    """
    if config.get("add_adapter"):
        raise ValueError(
            "config.json: add_adapter=True: transformers' WavLMForSequenceClassification does "
            "not support WavLM adapters either."
        )
    return {
        "classifier_proj_size": int(config.get("classifier_proj_size", 256)),
        "use_weighted_layer_sum": bool(config.get("use_weighted_layer_sum", False)),
        "init_std": head_parts.init_std(config),
    }


def head_params_from_hf(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> dict:
    """:class:`WavLMHead`'s parameters in a checkpoint, those it holds.

    ``projector.*``, ``classifier.*`` (any number of labels), ``layer_weights``
    (``use_weighted_layer_sum``).
    """
    read = head_parts.HeadTensors(tensors)
    d = int(config.get("hidden_size", 768))
    proj = int(config.get("classifier_proj_size", 256))
    out: dict[str, Any] = {
        "projector": read.dense(["projector"], d, proj),
        "classifier": read.dense(["classifier"], proj, None),
    }
    if config.get("use_weighted_layer_sum", False):
        n = int(config.get("num_hidden_layers", 12)) + 1
        weights = read.get(["layer_weights"], (n,))
        if weights is not None:
            out["layer_weights"] = weights
    return out


def head_fit_encoder(encoder: nn.Module, options: Mapping[str, Any]) -> nn.Module:
    """The encoder module whose last state is what transformers' head reads.

    With ``do_stable_layer_norm``: the final LayerNorm on the last state exactly when the head
    reads ``last_hidden_state`` (no weighted layer sum).
    """
    if not encoder.config.do_stable_layer_norm:
        return encoder
    weighted = bool(options.get("use_weighted_layer_sum", False))
    return encoder.clone(final_norm_on_last_state=not weighted)


def head_check_encoder(encoder: nn.Module, options: Mapping[str, Any]) -> None:
    """The last state must carry the final LayerNorm exactly when transformers' does.

    Raises:
      ValueError: one line, for an encoder that does otherwise.
    """
    weighted = bool(options.get("use_weighted_layer_sum", False))
    cfg = getattr(encoder, "config", None)
    if not getattr(cfg, "do_stable_layer_norm", False) or getattr(
        cfg, "tie_last_hidden_states", False
    ):
        return  # no final norm, or the encoder applies it whatever the flag says
    normed = bool(getattr(encoder, "final_norm_on_last_state", False))
    if not weighted and not normed:
        raise ValueError(
            "wavlm head: with do_stable_layer_norm, transformers classifies last_hidden_state, "
            "which carries the final LayerNorm: use an encoder with final_norm_on_last_state=True "
            "(classifier_from_encoder sets it)."
        )
    if weighted and normed:
        raise ValueError(
            "wavlm head: use_weighted_layer_sum weighs transformers' hidden_states, whose last has "
            "no final LayerNorm: use an encoder with final_norm_on_last_state=False."
        )


ARCHITECTURE = Architecture(
    model_type=MODEL_TYPE,
    config_cls=WavLMConfig,
    encoder_cls=WavLMEncoder,
    # Looked up when called, so that a replaced module function (a test's) is the one used.
    params_from_hf=lambda config, tensors: params_from_hf(config, tensors),
    modality="audio",
    example_inputs=example_inputs,
    hf_base_class="WavLMModel",
    hf_prefix=_HF_PREFIX,
    peft_module_names=peft_module_names,
    head=HfHead(
        module=WavLMHead,
        options_from_hf=head_options_from_hf,
        params_from_hf=head_params_from_hf,
        # layer_weights is a bare parameter of the torch model, no module: not listed.
        hf_modules={"projector": "projector", "classifier": "classifier"},
        pooling=lambda options: "mean",
        fit_encoder=head_fit_encoder,
        check_encoder=head_check_encoder,
    ),
)
