"""A Flax Llama encoder that returns every hidden state of transformers' ``LlamaModel``.

It mirrors transformers 5.24's PyTorch ``LlamaModel`` in evaluation mode with its default (sdpa)
attention: token embeddings, then ``num_hidden_layers`` pre-RMSNorm decoder layers (causal
self-attention with rotary position embeddings and grouped key/value heads, then a SwiGLU MLP),
then a final RMSNorm. ``hidden_states`` stacks the embedding output and every layer's output, the
last one after the final RMSNorm, as ``output_hidden_states=True`` does.

Positions are ``arange(T)`` for every row (``LlamaModel`` without ``position_ids`` or cache), so a
left-padded row's first real token sits at position > 0, exactly as in transformers. Query rows
whose keys are all masked (the padding positions of a left-padded row) get a zero attention output,
as torch's sdpa gives them.

:data:`ARCHITECTURE` holds what the rest of the project knows about Llama (classes, Hugging Face
names, inputs); :class:`LlamaHead` is ``LlamaForSequenceClassification``'s head.
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

Dtype = Any

MODEL_TYPE = "llama"
# LlamaModel's attribute in the head models (LlamaForCausalLM.model, ...).
_HF_PREFIX = "model."

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of a Llama ``config.json`` that change the hidden states.

    ``rope_type`` is ``"default"``, ``"linear"`` (frequencies divided by ``rope_factor``) or
    ``"llama3"`` (Llama 3.1 band-wise scaling by ``rope_factor``, ``rope_low_freq_factor``,
    ``rope_high_freq_factor`` and ``rope_original_max_position_embeddings``).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config.json: num_attention_heads={self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads={self.num_key_value_heads}."
            )
        if self.head_dim % 2:
            raise ValueError(f"config.json: head_dim={self.head_dim} must be even for RoPE.")
        if self.rope_type not in _ROPE_TYPES:
            raise ValueError(
                f"config.json: rope_type={self.rope_type!r} is not supported "
                f"(only {', '.join(map(repr, _ROPE_TYPES))})."
            )

    @classmethod
    def from_hf(cls, raw: dict) -> LlamaConfig:
        """Reads a parsed ``config.json`` written by transformers 4 or 5.

        RoPE parameters come, as transformers 5 resolves them, from ``rope_scaling`` (transformers
        4) or else ``rope_parameters`` (transformers 5), with ``rope_theta`` falling back to the
        top-level field and then 10000. A missing ``head_dim`` is ``hidden_size //
        num_attention_heads``; a missing ``num_key_value_heads`` is ``num_attention_heads``.
        ``pretraining_tp`` and ``tie_word_embeddings`` are accepted and ignored: neither changes
        transformers 5's hidden states.

        Raises:
          ValueError: for a value the port cannot reproduce (one line naming the field).
        """
        if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(
                f"config.json: model_type={raw.get('model_type')!r} is not {MODEL_TYPE!r}."
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if key not in raw:
                raise ValueError(f"config.json: {key} is missing.")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json: hidden_act={act!r} is not supported (only 'silu').")
        heads = raw.get("num_attention_heads", 32)
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
        rope = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
        if any(isinstance(v, dict) for v in rope.values()):
            raise ValueError("config.json: per-layer-type rope_parameters are not supported.")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise ValueError(
                f"config.json: rope_type={rope_type!r} is not supported "
                f"(only {', '.join(map(repr, _ROPE_TYPES))})."
            )
        partial = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            raise ValueError(
                f"config.json: partial_rotary_factor={partial} is not supported (only 1.0)."
            )
        extra: dict[str, Any] = {}
        if rope_type in ("linear", "llama3"):
            if "factor" not in rope:
                raise ValueError(f"config.json: rope type {rope_type!r} needs a 'factor'.")
            extra["rope_factor"] = float(rope["factor"])
        if rope_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor"):
                if key not in rope:
                    raise ValueError(f"config.json: rope type 'llama3' needs {key!r}.")
                extra[f"rope_{key}"] = float(rope[key])
            # transformers 5 takes a top-level original_max_position_embeddings first.
            original = raw.get(
                "original_max_position_embeddings",
                rope.get("original_max_position_embeddings", raw.get("max_position_embeddings")),
            )
            if original is None:
                raise ValueError(
                    "config.json: rope type 'llama3' needs original_max_position_embeddings."
                )
            extra["rope_original_max_position_embeddings"] = int(original)
        theta = rope.get("rope_theta") or raw.get("rope_theta") or 10000.0
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_type=rope_type,
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            **extra,
        )


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """The rotary inverse frequencies ``[head_dim // 2]`` (float32), as transformers computes them.

    Computed in float32 like torch's ``base ** (arange(0, dim, 2).float() / dim)``, then scaled for
    the ``linear`` and ``llama3`` rope types.
    """
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    factor = np.float32(config.rope_factor)
    if config.rope_type == "linear":
        inv_freq = inv_freq / factor
    elif config.rope_type == "llama3":
        old = config.rope_original_max_position_embeddings
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in float32, cast back to the input dtype, then scale.

    Attributes:
      eps: added to the mean square.
      dtype: dtype of the normalised values before scaling (the compute dtype).
    """

    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., d]`` any float dtype -> ``[..., d]`` in ``dtype``."""
        scale = self.param(
            "scale", sharding.with_logical_axes(nn.initializers.ones, (None,)), (x.shape[-1],)
        )
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        scale = scale.reshape((1,) * (x.ndim - 1) + scale.shape).astype(self.dtype)
        return scale * x.astype(self.dtype)


def _dense(features: int, axes: tuple[str | None, str | None], bias: bool, dtype: Dtype, name: str):
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=dtype,
        kernel_init=sharding.with_logical_axes(nn.initializers.lecun_normal(), axes),
        # A bias is split with its output dim when that dim is sharded; "embed" biases stay whole.
        bias_init=sharding.with_logical_axes(
            nn.initializers.zeros, (axes[1] if axes[1] != "embed" else None,)
        ),
        name=name,
    )


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention with rotary embeddings (``LlamaAttention``)."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    options: stack.EncoderOptions = stack.EncoderOptions()

    @nn.compact
    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, key_mask: jax.Array
    ) -> jax.Array:
        """Attends.

        Args:
          x: ``[B, T, hidden]`` in ``dtype`` (normalised input).
          cos: ``[T, head_dim]`` float32 rotary cosines.
          sin: ``[T, head_dim]`` float32 rotary sines.
          key_mask: bool ``[B, T]``, True for real tokens (the causal mask is added here).

        Returns:
          ``[B, T, hidden]`` in ``dtype``.
        """
        cfg = self.config
        b, t, _ = x.shape
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        q = _dense(h * d, ("embed", "heads"), bias, self.dtype, "q_proj")(x)
        k = _dense(kv * d, ("embed", "kv_heads"), bias, self.dtype, "k_proj")(x)
        v = _dense(kv * d, ("embed", "kv_heads"), bias, self.dtype, "v_proj")(x)

        def rotate(y: jax.Array, n: int) -> jax.Array:
            y = y.reshape(b, t, n, d).astype(jnp.float32)
            rotated = y * cos[None, :, None] + _rotate_half(y) * sin[None, :, None]
            return rotated.astype(self.dtype)

        # Query head j uses KV head j // (h // kv), as transformers' repeat_kv; a query whose
        # keys are all masked gets zeros, as torch's sdpa gives it.
        ctx = dot_product_attention(
            rotate(q, h),
            rotate(k, kv),
            v.reshape(b, t, kv, d),
            key_mask=key_mask,
            causal=True,
            scale=1.0 / math.sqrt(d),
            implementation=self.options.attention,
            block_size=self.options.block_size,
        )
        return _dense(cfg.hidden_size, ("heads", "embed"), bias, self.dtype, "o_proj")(
            ctx.reshape(b, t, h * d)
        )


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, T, hidden]`` -> ``[B, T, hidden]`` in ``dtype``."""
        cfg = self.config
        ff, bias = cfg.intermediate_size, cfg.mlp_bias
        gate = _dense(ff, ("embed", "mlp"), bias, self.dtype, "gate_proj")(x)
        up = _dense(ff, ("embed", "mlp"), bias, self.dtype, "up_proj")(x)
        return _dense(cfg.hidden_size, ("mlp", "embed"), bias, self.dtype, "down_proj")(
            jax.nn.silu(gate) * up
        )


class LlamaDecoderLayer(nn.Module):
    """Pre-norm decoder layer; the residual stream stays float32. Scanned over the depth."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    options: stack.EncoderOptions = stack.EncoderOptions()
    collect: stack.Collect = pooling.identity

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        key_mask: jax.Array,
        pool_mask: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array]:
        """``[B, T, hidden]`` float32 -> (the same, what the layer emits)."""
        eps = self.config.rms_norm_eps
        h = RMSNorm(eps, self.dtype, name="input_layernorm")(x)
        attn = LlamaAttention(self.config, self.dtype, self.options, name="self_attn")
        x = x + attn(h, cos, sin, key_mask)
        h = RMSNorm(eps, self.dtype, name="post_attention_layernorm")(x)
        x = x + LlamaMLP(self.config, self.dtype, name="mlp")(h).astype(jnp.float32)
        x = stack.LayerOutput(name="layer_output")(x, key_mask)
        return x, self.collect(x, pool_mask)


class LlamaEncoder(nn.Module):
    """Llama returning every hidden state (or every layer's pooled state).

    Attributes:
      config: the model configuration.
      dtype: computation dtype of the matmuls; norms, softmax, RoPE and the residual stream are
        float32, and the output is float32.
      options: attention implementation, block size and remat policy.
    """

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    options: stack.EncoderOptions = stack.EncoderOptions()
    adapters: Adapters = Adapters()

    @nn.compact
    @adapters_lib.in_call
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        collect: stack.Collect = pooling.identity,
        pool_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Encodes a (padded) batch.

        Args:
          input_ids: int ``[B, T]``.
          attention_mask: ``[B, T]``, 1/True for real tokens; all ones if None. Left or right
            padding both work; positions are ``arange(T)`` regardless, as in transformers.
          collect: what each layer emits (:mod:`gaam_jax.encoders.pooling`); default its hidden
            states.
          pool_mask: bool ``[B, T]`` positions a pooling uses; default ``attention_mask``.

        Returns:
          float32 ``[B, num_hidden_layers + 1, ...]`` of what ``collect`` emits (by default
          ``[B, L + 1, T, hidden_size]``): for the embedding output, then each layer's output,
          the last one after the final RMSNorm.
        """
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}.")
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        if attention_mask.shape != (b, t):
            raise ValueError(
                f"attention_mask {attention_mask.shape} must match input_ids {input_ids.shape}."
            )
        key_mask = attention_mask.astype(bool)
        pool_mask = key_mask if pool_mask is None else pool_mask.astype(bool)
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=sharding.with_logical_axes(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
            name="embed_tokens",
        )
        x = embed(input_ids).astype(jnp.float32)

        inv_freq = rope_inverse_frequencies(cfg)[None, :]
        angles = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq
        angles = jnp.concatenate([angles, angles], axis=-1)
        cos, sin = jnp.cos(angles), jnp.sin(angles)

        layers = stack.scanned(LlamaDecoderLayer, cfg.num_hidden_layers, 4, self.options)
        first = collect(x, pool_mask)
        x, emitted = layers(cfg, self.dtype, self.options, collect, name="layers")(
            x, cos, sin, key_mask, pool_mask
        )
        last = RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(x).astype(jnp.float32)
        return stack.with_layer_axis(first, emitted, collect(last, pool_mask))


def params_from_hf(config: LlamaConfig, tensors: Mapping[str, np.ndarray]) -> dict:
    """Maps a ``LlamaModel`` or ``LlamaForCausalLM`` state dict onto :class:`LlamaEncoder` params.

    Args:
      config: the model configuration.
      tensors: name -> array as stored (``layers.0.self_attn.q_proj.weight`` or
        ``model.layers.0...``; ``lm_head.*`` is ignored). Arrays are used through views only (no
        cast, no copy), so memory-mapped or bfloat16 arrays stay cheap.

    Returns:
      The params tree (no ``{'params': ...}`` wrapper) matching ``LlamaEncoder.init``.

    Raises:
      ValueError: a tensor is missing or has the wrong shape.
    """
    prefix = _HF_PREFIX if f"{_HF_PREFIX}embed_tokens.weight" in tensors else ""
    d, ff = config.hidden_size, config.intermediate_size
    h, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        key = prefix + name
        if key not in tensors:
            raise ValueError(f"checkpoint: tensor {key!r} is missing.")
        value = tensors[key]
        if tuple(value.shape) != shape:
            raise ValueError(f"checkpoint: {key} has shape {tuple(value.shape)}, expected {shape}.")
        return value

    def dense(name: str, n_in: int, n_out: int, bias: bool) -> dict:
        out = {"kernel": get(f"{name}.weight", (n_out, n_in)).T}
        if bias:
            out["bias"] = get(f"{name}.bias", (n_out,))
        return out

    def norm(name: str) -> dict:
        return {"scale": get(f"{name}.weight", (d,))}

    ab, mb = config.attention_bias, config.mlp_bias
    params: dict[str, Any] = {
        "embed_tokens": {"embedding": get("embed_tokens.weight", (config.vocab_size, d))}
    }

    def layer(i: int) -> dict:
        p = f"layers.{i}"
        return {
            "input_layernorm": norm(f"{p}.input_layernorm"),
            "self_attn": {
                "q_proj": dense(f"{p}.self_attn.q_proj", d, h * hd, ab),
                "k_proj": dense(f"{p}.self_attn.k_proj", d, kv * hd, ab),
                "v_proj": dense(f"{p}.self_attn.v_proj", d, kv * hd, ab),
                "o_proj": dense(f"{p}.self_attn.o_proj", h * hd, d, ab),
            },
            "post_attention_layernorm": norm(f"{p}.post_attention_layernorm"),
            "mlp": {
                "gate_proj": dense(f"{p}.mlp.gate_proj", d, ff, mb),
                "up_proj": dense(f"{p}.mlp.up_proj", d, ff, mb),
                "down_proj": dense(f"{p}.mlp.down_proj", ff, d, mb),
            },
        }

    # One lazy [layers, ...] array per parameter: read slice by slice when placed on devices.
    params["layers"] = stack.stack_layers([layer(i) for i in range(config.num_hidden_layers)])
    params["norm"] = norm("norm")
    return params


def example_inputs(config_json: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract inputs of batch 1 for ``jax.eval_shape``: int32 ``input_ids`` ``[1, 8]``."""
    del config_json
    return {"input_ids": jax.ShapeDtypeStruct((1, 8), jnp.int32)}


def peft_module_names(path: tuple[str, ...], layer: int | None) -> tuple[str, ...]:
    """``LlamaModel``'s module name of our Dense at ``path`` in layer ``layer`` (none on top).

    The layer's modules mirror transformers' (``layers/self_attn/q_proj`` is
    ``layers.{i}.self_attn.q_proj``).
    """
    if layer is None:
        return ()
    return (f"layers.{layer}." + ".".join(path[1:]),)


class LlamaHead(nn.Module):
    """``LlamaForSequenceClassification``'s head: ``score`` (no bias) on the last non-pad token.

    Attributes:
      num_classes: C.
      pad_token_id: the pad id whose positions are skipped (``config.pad_token_id``); None: the
        last position, batch size 1 only (as transformers).
      init_std: std of the fresh kernel.
    """

    num_classes: int
    pad_token_id: int | None = None
    init_std: float = head_parts.DEFAULT_STD

    @nn.compact
    def __call__(self, features: jax.Array, *, train: bool = False) -> jax.Array:
        """Classifies.

        Args:
          features: float32 ``[B, L+1, H]``, every layer's state at the last non-pad token
            (pooling ``last`` over ``input_ids != pad_token_id``).
          train: unused (no dropout in this head).

        Returns:
          float32 logits ``[B, C]``.
        """
        del train
        axes = ("embed", "classes")
        score = head_parts.dense(self.num_classes, self.init_std, "score", axes, False)
        return score(head_parts.last_state(features))


def head_options_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`LlamaHead`'s options in ``config.json``: ``pad_token_id``, ``init_std``."""
    pad = config.get("pad_token_id")
    pad = None if pad is None else int(pad)
    return {"pad_token_id": pad, "init_std": head_parts.init_std(config)}


def head_params_from_hf(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> dict:
    """:class:`LlamaHead`'s parameters in a checkpoint: ``score.weight`` -> ``score/kernel``."""
    d = int(config.get("hidden_size", 768))
    return {"score": head_parts.HeadTensors(tensors).dense(["score"], d, None, use_bias=False)}


def head_pool_mask(
    options: Mapping[str, Any], encoder: nn.Module, inputs: Mapping[str, jax.Array]
) -> jax.Array:
    """The last non-pad token: bool ``[B, T]`` ``input_ids != pad_token_id``.

    That is the last real token with right padding, the last position with left padding and
    position 0 for a row of pads, whatever ``attention_mask`` says. With ``pad_token_id`` None,
    the last position.

    Raises:
      ValueError: no ``input_ids``, or no ``pad_token_id`` and a batch of more than one row
        (transformers refuses it too).
    """
    del encoder
    ids = head_parts.required_input(MODEL_TYPE, inputs, "input_ids")
    pad = options.get("pad_token_id")
    if pad is None:
        if ids.shape[0] != 1:
            raise ValueError(
                "llama head: pad_token_id is None, so the last real token of a padded row is "
                f"unknown; transformers refuses batch size {ids.shape[0]} > 1 (set "
                "head_kwargs pad_token_id)."
            )
        return jnp.ones(ids.shape, bool)  # the last position, whatever attention_mask says
    return ids != int(pad)


ARCHITECTURE = Architecture(
    model_type=MODEL_TYPE,
    config_cls=LlamaConfig,
    encoder_cls=LlamaEncoder,
    # Looked up when called, so that a replaced module function (a test's) is the one used.
    params_from_hf=lambda config, tensors: params_from_hf(config, tensors),
    modality="text",
    example_inputs=example_inputs,
    hf_base_class="LlamaModel",
    hf_prefix=_HF_PREFIX,
    peft_module_names=peft_module_names,
    head=HfHead(
        module=LlamaHead,
        options_from_hf=head_options_from_hf,
        params_from_hf=head_params_from_hf,
        hf_modules={"score": "score"},
        pooling=lambda options: "last",
        pool_mask=head_pool_mask,
        # Llama's score has no "classifier" in its name: the paper's scripts never train it.
        paper_trainable="classifier",
    ),
)
