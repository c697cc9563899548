"""The Gaussian Adaptive Transformer (GAT; later DAT): the paper's decoder on frozen features."""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaam_jax import _validation as check
from gaam_jax.conv import SameConv
from gaam_jax.functional import Variance
from gaam_jax.gaussian_attention import GaussianAdaptiveAttention
from gaam_jax.gqgaam import GQGAAM
from gaam_jax.initializers import torch_default_init
from gaam_jax.mixture import GaussianBlock
from gaam_jax.sharding import AnnotatedInit, with_logical_axes

Dtype = Any
Front = Literal["gaam", "gqgaam", "mixture", "mha", "mha_bn", "none"]
FRONTS: tuple[str, ...] = get_args(Front)


def square_map_shape(width: int) -> tuple[int, int]:
    """The most nearly square ``(h, w)`` with ``h * w == width`` and ``h <= w``.

    Gives the paper's maps: 1024 -> (32, 32), 5120 -> (64, 80).
    """
    h = math.isqrt(width)
    while width % h:
        h -= 1
    return h, width // h


class GaussianAdaptiveTransformer(AnnotatedInit, nn.Module):
    """The decoder the paper trains on frozen encoder features (docs/design.md section 6).

    ``x [batch, N, d]`` (N encoder layers, each mean-pooled to d features) -> attention front
    -> each layer's features reshaped to a 2-D map ``[batch, N, H, W]`` -> Conv(N -> 512, 3x3)
    -> ReLU -> Conv(512 -> N, 3x3) -> ReLU -> flatten -> Dense(num_classes) (named
    ``classifier``). Conv and classifier kernels are Xavier-uniform (the paper); their biases
    keep PyTorch's default init, as in the authors' code.

    Fronts (``front``):

    * ``'gaam'``: :class:`GaussianAdaptiveAttention` over the layer axis with ``num_heads`` heads
      (DAAMv1: g = 8, DAAMv2: g = 1).
    * ``'gqgaam'``: :class:`~gaam_jax.gqgaam.GQGAAM`; maps are ``[N, attention_dim]``.
    * ``'mixture'``: a one-layer :class:`GaussianBlock` over the layer axis (``num_heads`` heads,
      ``num_gaussians`` each), residual included (the paper's "Mixture of DAAM").
    * ``'mha'``: multi-head self-attention over the N layer tokens (width d, ``num_heads``
      heads). This is the paper's intent; the released code passes ``[batch, N, d]`` to a
      ``batch_first=False`` ``nn.MultiheadAttention`` and so attends across the *minibatch*,
      making predictions depend on the other samples. That bug is not reproduced.
    * ``'mha_bn'``: ``'mha'`` then BatchNorm over the N layer channels (batch statistics when
      ``train=True``, running averages otherwise; ``batch_stats`` collection; momentum and eps as
      PyTorch's defaults). The released code's BatchNorm2d on a 3-D tensor cannot run.
    * ``'none'``: no attention (a conv-only baseline).

    The GAAM gate (fronts ``gaam``, ``gqgaam``, ``mixture``) is sown under ``intermediates`` in
    the ``attention`` submodule; :func:`gaam_jax.importance.find_gate` extracts it.

    Attributes:
      num_classes: output classes.
      front: attention front, see above.
      num_heads: GAAM heads g, or MHA heads for ``mha``/``mha_bn``.
      num_gaussians: Gaussians per head for ``mixture``.
      attention_dim: GQGAAM attention width (512 in the paper).
      query_heads: GQGAAM query heads (8).
      kv_heads: GQGAAM key/value heads (2).
      gqa: ``'paper_code'`` (the authors' block, default) or ``'textbook'`` GQA in GQGAAM.
      conv_features: hidden channels of the conv pair (512).
      kernel_size: conv kernel (3, 3).
      map_shape: ``(H, W)`` of each layer's map; None picks the most square factorisation of
        the width (32x32 for 1024, 64x80 for 5120; the paper's GQDAAM uses 8x64 / 64x8 for 512).
      variance: GAAM variance estimator, see :func:`gaam_jax.functional.gaussian_gate`.
      conv_impl: ``'gemm'`` (:class:`gaam_jax.conv.SameConv`: the convolutions and their
        gradients as large matrix products, 2.6x faster on XLA:CPU), ``'xla'`` (``nn.Conv``),
        or ``'auto'`` (gemm on CPU, xla elsewhere). Same parameters and results either way.
      dtype: computation dtype (GAAM statistics and softmax stay float32).
      param_dtype: parameter dtype.
      layers: encoder layers to keep (0-based indices into the N of the input) before the
        front, e.g. the paper's Importance-Factor ablation that retrains on the highest-IF
        layers; None keeps them all. Part of the model, so exported models select it too.
    """

    num_classes: int
    front: Front = "gaam"
    num_heads: int = 8
    num_gaussians: int = 4
    attention_dim: int = 512
    query_heads: int = 8
    kv_heads: int = 2
    gqa: Literal["paper_code", "textbook"] = "paper_code"
    conv_features: int = 512
    kernel_size: tuple[int, int] = (3, 3)
    map_shape: tuple[int, int] | None = None
    variance: Variance = "shifted"
    conv_impl: Literal["auto", "gemm", "xla"] = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.front not in FRONTS:
            raise ValueError(f"front must be one of {FRONTS}, got {self.front!r}.")
        check.positive_int(self.num_classes, "num_classes")
        check.positive_int(self.num_heads, "num_heads")
        check.positive_int(self.conv_features, "conv_features")
        if self.layers is not None and (
            not self.layers or len(set(self.layers)) != len(self.layers)
        ):
            raise ValueError(f"layers must be distinct indices, at least one, got {self.layers}.")
        super().__post_init__()

    def _front(self, x: jax.Array, train: bool) -> jax.Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, name="attention")
        if self.front == "gaam":
            return GaussianAdaptiveAttention(
                num_heads=self.num_heads, variance=self.variance, **common
            )(x)
        if self.front == "gqgaam":
            return GQGAAM(
                gaam_heads=self.num_heads,
                embed_dim=self.attention_dim,
                query_heads=self.query_heads,
                kv_heads=self.kv_heads,
                attention=self.gqa,
                variance=self.variance,
                **common,
            )(x)
        if self.front == "mixture":
            return GaussianBlock((-2,), (self.num_heads,), (self.num_gaussians,), **common)(x)
        if self.front in ("mha", "mha_bn"):
            xavier = nn.initializers.xavier_uniform()
            x = nn.MultiHeadDotProductAttention(
                num_heads=self.num_heads,
                kernel_init=with_logical_axes(xavier, ("embed", "heads", None)),
                bias_init=with_logical_axes(nn.initializers.zeros_init(), ("heads", None)),
                out_kernel_init=with_logical_axes(xavier, ("heads", None, "embed")),
                out_bias_init=with_logical_axes(nn.initializers.zeros_init(), ("mlp",)),
                **common,
            )(x, x)
            if self.front == "mha_bn":
                x = nn.BatchNorm(
                    use_running_average=not train,
                    axis=1,  # the N layer channels of [batch, N, d]
                    momentum=0.9,
                    epsilon=1e-5,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    scale_init=with_logical_axes(nn.initializers.ones_init(), (None,)),
                    bias_init=with_logical_axes(nn.initializers.zeros_init(), ("mlp",)),
                    name="batch_norm",
                )(x)
            return x
        return x

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Classifies a batch of stacked layer features.

        Args:
          x: ``[batch, N, d]`` float features.
          train: training mode (only BatchNorm in ``mha_bn`` depends on it).

        Returns:
          Logits ``[batch, num_classes]`` (float32 unless ``dtype`` says otherwise).
        """
        if x.ndim != 3:
            raise ValueError(f"x must be [batch, layers, features], got shape {x.shape}.")
        check.floating_input(x)
        if self.layers is not None:
            if max(self.layers) >= x.shape[1] or min(self.layers) < -x.shape[1]:
                raise ValueError(
                    f"layers {self.layers} are out of range for inputs with {x.shape[1]} layers."
                )
            x = x[:, jnp.asarray(self.layers)]
        x = self._front(x, train)
        b, n, width = x.shape
        h, w = self.map_shape or square_map_shape(width)
        if h * w != width:
            raise ValueError(f"map_shape {(h, w)} does not hold the {width} features per layer.")
        x = x.reshape(b, n, h, w).transpose(0, 2, 3, 1)  # [b, H, W, N]: layers are channels
        area = self.kernel_size[0] * self.kernel_size[1]
        impl = self.conv_impl
        if impl == "auto":
            impl = "gemm" if jax.default_backend() == "cpu" else "xla"
        if impl not in ("gemm", "xla"):
            raise ValueError(f"conv_impl must be 'auto', 'gemm' or 'xla', got {self.conv_impl!r}.")

        def conv(features: int, fan_in: int, axes: tuple[str, str], name: str) -> nn.Module:
            # axes: logical names of the (input, output) channels.
            kwargs = dict(
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=with_logical_axes(
                    nn.initializers.xavier_uniform(), (None, None, *axes)
                ),
                bias_init=with_logical_axes(torch_default_init(fan_in), (axes[1],)),
                name=name,
            )
            if impl == "gemm":
                return SameConv(features, self.kernel_size, **kwargs)
            return nn.Conv(features, self.kernel_size, padding="SAME", **kwargs)

        x = nn.relu(conv(self.conv_features, n * area, ("layers", "conv"), "conv1")(x))
        x = nn.relu(conv(n, self.conv_features * area, ("conv", "layers"), "conv2")(x))
        x = x.transpose(0, 3, 1, 2).reshape(b, n * h * w)  # PyTorch's channel-major flatten
        return nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=with_logical_axes(nn.initializers.xavier_uniform(), ("mlp", "classes")),
            bias_init=with_logical_axes(torch_default_init(n * h * w), ("classes",)),
            name="classifier",
        )(x)
