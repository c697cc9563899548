"""Stride-1 'SAME' 2-D convolution computed as large matrix products (fast on XLA:CPU).

XLA:CPU computes the decoder's 3x3 convolutions slowly when one side is wide: on this
project's 2-core machine the kernel gradient of Conv(24 -> 512) took 725 ms of a 1.3 s
training step, against 139 ms as matrix products (benchmarks/README.md). Here:

* the kernel gradient is a sum over taps of ``dW[i, j] = x[.., h+i-p, w+j-p, :]^T dy`` (one
  GEMM per tap, contracting over batch and space), shifting whichever operand has fewer
  channels so the shifted copies stay small;
* a convolution with more input than output channels (Conv(512 -> N), and the input gradient
  of Conv(N -> 512)) is one GEMM over all taps followed by shifted sums of the narrow outputs;
* the rest stays XLA's convolution.

Gradients equal XLA's to float32 rounding (tests/gaam_jax/test_conv.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DIMS)


def _conv_gemm(x: jax.Array, w: jax.Array) -> jax.Array:
    """The same convolution; with more input than output channels, as one matrix product.

    Every tap's product is computed from the unshifted input in one matrix product
    ``[B*H*W, Cin] @ [Cin, kh*kw*Cout]`` and the narrow per-tap outputs are shifted and summed.
    With fewer input channels XLA's own convolution is as fast (measured), so it is used.
    """
    kh, kw, cin, cout = w.shape
    ph, pw = kh // 2, kw // 2
    h, wd = x.shape[1], x.shape[2]
    if cin <= cout:
        return _conv(x, w)
    z = x @ w.transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout)  # every tap at once
    zp = jnp.pad(z, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    out = 0.0
    for i in range(kh):
        for j in range(kw):
            tap = (i * kw + j) * cout
            # y[h] += (x @ W[i, j])[h + i - ph]
            out = out + zp[:, i : i + h, j : j + wd, tap : tap + cout]
    return out


def _kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
    kh, kw = kernel_shape[:2]
    ph, pw = kh // 2, kw // 2
    h, w = x.shape[1], x.shape[2]
    taps = []
    if x.shape[-1] <= dy.shape[-1]:  # shift x (fewer channels): x[h + i - ph] against dy[h]
        xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
        for i in range(kh):
            for j in range(kw):
                taps.append(jnp.einsum("bhwc,bhwd->cd", xp[:, i : i + h, j : j + w], dy))
    else:  # shift dy instead: x[h'] against dy[h' - i + ph]
        dp = jnp.pad(dy, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
        for i in range(kh):
            for j in range(kw):
                shifted = dp[:, kh - 1 - i : kh - 1 - i + h, kw - 1 - j : kw - 1 - j + w]
                taps.append(jnp.einsum("bhwc,bhwd->cd", x, shifted))
    return jnp.stack(taps).reshape(kernel_shape)


@jax.custom_vjp
def conv_same(x: jax.Array, w: jax.Array) -> jax.Array:
    """Convolves ``x [B, H, W, Cin]`` with ``w [kh, kw, Cin, Cout]``: stride 1, SAME, odd kernel."""
    return _conv_gemm(x, w)


def _fwd(x, w):
    return _conv_gemm(x, w), (x, w)


def _bwd(res, dy):
    x, w = res
    # The input gradient is the same convolution of dy with the flipped, transposed kernel.
    dx = _conv_gemm(dy, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
    dw = _kernel_grad(x, dy, w.shape).astype(w.dtype)
    return dx.astype(x.dtype), dw


conv_same.defvjp(_fwd, _bwd)


class SameConv(nn.Module):
    """Like ``nn.Conv(features, kernel_size, padding="SAME")`` (stride 1, odd kernel), GEMM-based.

    Parameters are named and shaped as ``nn.Conv``'s (``kernel [kh, kw, in, out]``, ``bias``).

    Attributes:
      features: output channels.
      kernel_size: odd ``(kh, kw)``.
      dtype: computation dtype.
      param_dtype: parameter dtype.
      kernel_init: kernel initialiser.
      bias_init: bias initialiser.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``[batch, H, W, in] -> [batch, H, W, features]``."""
        kh, kw = self.kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"kernel_size must be odd for 'SAME' padding, got {self.kernel_size}.")
        shape = (kh, kw, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, kernel)
        y = conv_same(x.astype(dtype), kernel.astype(dtype))
        return y + bias.astype(dtype)[None, None, None, :]
