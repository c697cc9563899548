r"""Gaussian Adaptive Attention as pure JAX functions (no Flax).

Three forms are provided; ``docs/design.md`` sections 2-4 and 15 say where they come from.

**Paper form** (Algorithm 1 + 3 of the paper and the authors' experiment code; every reported
DAAMv1/DAAMv2/GQDAAM number was produced by it). Along ``axis`` the input is split into ``H``
contiguous equal groups (the heads). Within each group, for every other index (sample, feature,
...), with population statistics over the group:

.. math::

    \mu = \mathrm{mean}(x), \quad \sigma^2 = |\mathrm{var}(x)| + 10^{-8}, \quad
    z = \frac{x - (\mu + \delta_{h,f})}{\sqrt{\sigma^2 + 10^{-5}}}, \quad
    G = \exp\!\left(-\frac{z^2}{2\,\xi_{h,f}}\right), \quad y = x \odot G

with a learnable mean offset :math:`\delta` and scaled variance :math:`\xi` of shape
``[heads, features]`` (features index ``feature_axis``). Note ``2 xi``, not ``2 xi^2``: xi is a
variance, initialised to 2 in the paper.

**Mixture form** (the authors' package ``gaussian-adaptive-attention==0.1.5``). Heads split
``axis`` into chunks of ``size // H`` with the last head taking the remainder. Each head has ``K``
scalar pairs :math:`(m_k, c_k)` and computes, with the unbiased variance
:math:`s^2 = \mathrm{var}_{ddof=1}(x) + \epsilon`,

.. math::

    P = \prod_{k=1}^{K} \frac{1}{\sqrt{2\pi c_k^2}}
        \exp\!\left(-\frac{(x - \mu - m_k)^2}{2 c_k^2 s^2}\right), \qquad
    G = \frac{P}{\max(\sum_{\text{axis}} P, \epsilon)}, \qquad y = x \odot G.

The product of Gaussians is one Gaussian (the paper's :math:`\sigma_{prod}, \mu_{prod}`
identity): with :math:`w_k = c_k^{-2}`, :math:`W = \sum_k w_k`, :math:`M = \sum_k w_k m_k / W`
and :math:`C = \sum_k w_k (m_k - M)^2`,

.. math::

    \log P = -\tfrac{1}{2}\left(W \frac{(x - \mu - M)^2}{s^2} + \frac{C}{s^2}\right)
             - \tfrac{1}{2}\sum_k \log(2\pi c_k^2),

so the cost does not grow with ``K``. The normalisation is done in log space (logsumexp), so
no K-fold product of densities is ever formed and none can underflow or overflow.

**Density gate** (the authors' newest form, from their Density-Adaptive-JEPA code;
``docs/design.md`` section 15). ``K`` scalar pairs :math:`(m_k, \ell_k)` (``mean_offsets``,
``log_sigma``) shared by every feature and position (no heads). With population statistics
along ``axis``, :math:`s = \sqrt{\max(\mathrm{var}(x), 10^{-6})}` and
:math:`\sigma_k = \mathrm{softplus}(\ell_k) + 10^{-3}`,

.. math::

    z_k = \frac{x - (\mu + m_k)}{s\,\sigma_k + 10^{-8}}, \qquad
    G = \frac{1}{K} \sum_{k=1}^{K} \frac{1}{\sigma_k \sqrt{2\pi}}
        \exp\!\left(-\frac{z_k^2}{2}\right), \qquad y = x \odot G,

the mean of K normalised densities, evaluated in the log domain (a log-sum-exp over k, shifted
by the largest normalising constant so that no term can overflow). It is not normalised along
the axis.

All forms compute statistics and exponentials in float32 whatever the input dtype and cast the
output back. An optional boolean ``mask`` (True = valid, broadcastable to ``x``) excludes
elements from counts, means, variances and the normalisation sum; masked elements pass through
unchanged (their gate is 1) and their values never reach the valid outputs or the gradients.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from gaam_jax import _validation as check

__all__ = [
    "gaussian_gate",
    "gaussian_adaptive_attention",
    "mixture_gate",
    "mixture_gaussian_adaptive_attention",
    "density_gate",
    "density_mean_gate",
    "head_sizes",
]

Variance = Literal["shifted", "one_pass"]

# Epsilons of the paper's Algorithm 1 and the experiment code.
PAPER_VAR_EPS = 1e-8
PAPER_NORM_EPS = 1e-5


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def head_sizes(size: int, num_heads: int, *, even: bool) -> tuple[int, ...]:
    """Returns the number of positions each head takes along the split axis.

    Args:
      size: length of the axis that the heads split.
      num_heads: number of heads.
      even: if True (paper form), ``size`` must be divisible by ``num_heads``. If False (package
        form), every head takes ``size // num_heads`` and the last one also takes the remainder.

    Returns:
      A tuple of ``num_heads`` positive ints that sum to ``size``.

    Raises:
      ValueError: if the split is impossible.
    """
    check.positive_int(num_heads, "num_heads")
    if even:
        if size % num_heads:
            raise ValueError(
                f"the axis of size {size} cannot be split into {num_heads} equal heads "
                f"({size} is not divisible by {num_heads})."
            )
        return (size // num_heads,) * num_heads
    chunk = size // num_heads
    if chunk == 0:
        raise ValueError(f"the axis of size {size} is smaller than num_heads={num_heads}.")
    return (chunk,) * (num_heads - 1) + (size - chunk * (num_heads - 1),)


# --------------------------------------------------------------------------------------------
# Shared statistics
# --------------------------------------------------------------------------------------------


def _centred_moments(
    xf: jax.Array, mask: jax.Array | None, red: int, *, ddof: int, variance: Variance
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Statistics of float32 ``xf`` over axis ``red``, optionally masked.

    Returns ``(pivot, mean_c, var)`` with ``x - mean(x) = (x - pivot) - mean_c`` (all three
    keep the reduced axis as size 1; ``pivot`` may be a scalar 0). Masked elements must already
    be replaced by finite values; they are excluded from the count. A slice with no valid
    element gets mean 0 and variance 0.

    ``"shifted"`` takes the moments of ``x - pivot`` (the shifted-data algorithm): one pass over
    the data, and accurate for inputs of magnitude 1e4, where E[x^2] - E[x]^2 on the raw values
    cancels catastrophically (and even a float32 mean is off by ulp(1e4) = 1e-3). The pivot is
    the slice's first element, or with a mask its masked mean (one more pass, so a masked-out
    value is never used). It is a constant for autodiff: the result does not depend on it.
    ``"one_pass"`` is the experiment code's E[x^2] - E[x]^2 on the raw values.
    """

    def masked_sum(v: jax.Array) -> jax.Array:
        if mask is not None:
            v = jnp.where(mask, v, 0.0)
        return jnp.sum(v, axis=red, keepdims=True)

    if mask is None:
        count = jnp.asarray(xf.shape[red], jnp.float32)
    else:
        count = jnp.sum(mask, axis=red, keepdims=True, dtype=jnp.float32)
    safe_count = jnp.maximum(count, 1.0)
    if variance == "shifted":
        if mask is None:
            pivot = jax.lax.slice_in_dim(xf, 0, 1, axis=red)
        else:
            pivot = masked_sum(xf) / safe_count
        pivot = jax.lax.stop_gradient(pivot)
        xc = xf - pivot
    elif variance == "one_pass":
        if ddof:
            raise ValueError("variance='one_pass' is only defined for the population variance.")
        pivot = jnp.zeros((), jnp.float32)
        xc = xf
    else:
        raise ValueError(f"variance must be 'shifted' or 'one_pass', got {variance!r}.")
    mean_c = masked_sum(xc) / safe_count
    # sum((xc - mean_c)^2) = sum(xc^2) - count * mean_c^2: after the shift mean_c is of the
    # order of the spread, so this does not cancel (for one_pass it is the code's formula).
    var = (masked_sum(jnp.square(xc)) - count * jnp.square(mean_c)) / jnp.maximum(count - ddof, 1.0)
    return pivot, mean_c, var


def _split_axis(x: jax.Array, ax: int, heads: int) -> jax.Array:
    # [..., n, ...] -> [..., heads, n // heads, ...]
    return x.reshape(x.shape[:ax] + (heads, x.shape[ax] // heads) + x.shape[ax + 1 :])


# --------------------------------------------------------------------------------------------
# Paper form
# --------------------------------------------------------------------------------------------


def gaussian_gate(
    x: jax.Array,
    delta: jax.Array,
    xi: jax.Array,
    *,
    axis: int = -2,
    feature_axis: int | None = -1,
    mask: jax.Array | None = None,
    variance: Variance = "shifted",
    var_eps: float = PAPER_VAR_EPS,
    norm_eps: float = PAPER_NORM_EPS,
) -> jax.Array:
    """Gaussian gate ``G`` of the paper form (Algorithm 1 + 3).

    Args:
      x: input of any floating dtype, e.g. ``[batch, layers, features]``.
      delta: mean offsets, ``[heads, features]``; ``features`` is ``x.shape[feature_axis]``, or 1
        when ``feature_axis`` is None (one scalar per head).
      xi: scaled variances, same shape as ``delta``. Not constrained to be positive (as in the
        paper's code); a non-positive ``xi`` makes the gate grow instead of decay.
      axis: the axis the statistics are taken over and the heads split (contiguous equal groups).
      feature_axis: the axis that indexes the per-feature parameters; must differ from ``axis``.
      mask: optional boolean, broadcastable to ``x``, True = valid.
      variance: ``"shifted"`` (default; moments of the data shifted by a pivot, accurate for
        large inputs such as Llama hidden states) or ``"one_pass"`` (E[x^2] - E[x]^2 on the raw
        values, the experiment code's estimator). Both are the population variance; they differ
        only in rounding.
      var_eps: added to ``|var|`` (1e-8 in the paper's code).
      norm_eps: added inside the square root (1e-5 in the paper's code).

    Returns:
      The gate, float32, with the shape of ``x``; 1 at masked positions.

    Raises:
      ValueError: on a bad axis, parameter shape, head split or mask.
    """
    check.floating_input(x)
    ax = check.canonical_axis(axis, x.ndim, "axis")
    delta = jnp.asarray(delta)
    xi = jnp.asarray(xi)
    if delta.ndim != 2:
        raise ValueError(f"delta must have shape [heads, features], got {delta.shape}.")
    heads = delta.shape[0]
    if feature_axis is None:
        fax, features = None, 1
    else:
        fax = check.canonical_axis(feature_axis, x.ndim, "feature_axis")
        if fax == ax:
            raise ValueError(
                f"feature_axis ({feature_axis}) must differ from axis ({axis}); use "
                "feature_axis=None for one parameter per head."
            )
        features = x.shape[fax]
    if delta.shape != (heads, features) or xi.shape != (heads, features):
        raise ValueError(
            f"delta and xi must both have shape [heads, features] = [{heads}, {features}] for an "
            f"input of shape {x.shape}; got delta {delta.shape} and xi {xi.shape}."
        )
    head_sizes(x.shape[ax], heads, even=True)
    mask = check.broadcast_mask(mask, x.shape)

    xs = _split_axis(x, ax, heads)  # head axis at ax, group axis at ax + 1
    red = ax + 1
    pshape = [1] * xs.ndim
    pshape[ax] = heads
    delta32, xi32 = delta.astype(jnp.float32), xi.astype(jnp.float32)
    if fax is not None:
        fpos = fax if fax < ax else fax + 1
        pshape[fpos] = features
        if fpos < ax:  # parameters are [heads, features]; the feature axis comes first here
            delta32, xi32 = delta32.T, xi32.T
    delta_b, xi_b = delta32.reshape(pshape), xi32.reshape(pshape)

    xf = xs.astype(jnp.float32)
    ms = None
    if mask is not None:
        ms = _split_axis(mask, ax, heads)
        xf = jnp.where(ms, xf, 0.0)  # masked values never reach statistics or gradients
    pivot, mean_c, var = _centred_moments(xf, ms, red, ddof=0, variance=variance)
    var = jnp.abs(var) + var_eps
    # Per-slice and per-parameter factors first, so the elementwise pass multiplies only.
    shift, inv_std, coef = mean_c + delta_b, jax.lax.rsqrt(var + norm_eps), -0.5 / xi_b
    z = ((xf - pivot) - shift) * inv_std
    gate = jnp.exp(coef * jnp.square(z))
    if ms is not None:
        gate = jnp.where(ms, gate, 1.0)
    return gate.reshape(x.shape)


def gaussian_adaptive_attention(
    x: jax.Array,
    delta: jax.Array,
    xi: jax.Array,
    *,
    axis: int = -2,
    feature_axis: int | None = -1,
    mask: jax.Array | None = None,
    variance: Variance = "shifted",
    var_eps: float = PAPER_VAR_EPS,
    norm_eps: float = PAPER_NORM_EPS,
    return_gate: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Multi-head GAAM, paper form: ``y = x * G``.

    Args and the gate are as in :func:`gaussian_gate`.

    Returns:
      ``y`` with the shape and dtype of ``x`` (masked elements are ``x`` unchanged); with
      ``return_gate=True``, ``(y, gate)`` where ``gate`` is float32.
    """
    gate = gaussian_gate(
        x,
        delta,
        xi,
        axis=axis,
        feature_axis=feature_axis,
        mask=mask,
        variance=variance,
        var_eps=var_eps,
        norm_eps=norm_eps,
    )
    y = (x.astype(jnp.float32) * gate).astype(x.dtype)
    return (y, gate) if return_gate else y


# --------------------------------------------------------------------------------------------
# Mixture form (the authors' package)
# --------------------------------------------------------------------------------------------


def _product_of_gaussians(
    mean_offsets: jax.Array, c: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Collapses K scalar Gaussians per head into one: returns (W, M, C, log_const), each [H]."""
    m = mean_offsets.astype(jnp.float32)
    c2 = jnp.square(c.astype(jnp.float32))
    w = 1.0 / c2  # precision of each Gaussian, in units of the standardised input
    big_w = jnp.sum(w, axis=-1)
    big_m = jnp.sum(w * m, axis=-1) / big_w
    big_c = jnp.sum(w * jnp.square(m - big_m[:, None]), axis=-1)
    log_const = -0.5 * jnp.sum(jnp.log(2.0 * math.pi * c2), axis=-1)
    return big_w, big_m, big_c, log_const


def _mixture_gate_even(
    xs: jax.Array,
    ms: jax.Array | None,
    ax: int,
    mean_offsets: jax.Array,
    c: jax.Array,
    eps: float,
) -> jax.Array:
    """Mixture gate for ``xs`` already split as ``[..., H, n, ...]`` (head axis ``ax``)."""
    red = ax + 1
    pshape = [1] * xs.ndim
    pshape[ax] = mean_offsets.shape[0]
    big_w, big_m, big_c, log_const = (
        p.reshape(pshape) for p in _product_of_gaussians(mean_offsets, c)
    )
    xf = xs.astype(jnp.float32)
    if ms is not None:
        xf = jnp.where(ms, xf, 0.0)
    pivot, mean_c, var = _centred_moments(xf, ms, red, ddof=1, variance="shifted")
    # torch.var is non-negative; the guard only matters for rounding in constant slices.
    var = jnp.maximum(var, 0.0) + eps
    # log P = bound + q with bound = -C / (2 var) + log_const (constant along the axis) and
    # q = -W (x - mean - M)^2 / (2 var) <= 0. So exp(q) <= 1 cannot overflow, and the
    # logsumexp needs no max pass: one reduction instead of two.
    bound = -0.5 * big_c / var + log_const
    shift, coef = mean_c + big_m, -0.5 * big_w / var
    q = coef * jnp.square((xf - pivot) - shift)
    e = jnp.exp(q)
    if ms is not None:
        e = jnp.where(ms, e, 0.0)
    total = jnp.sum(e, axis=red, keepdims=True)
    # An empty (fully masked) or underflowed sum gives log 0 = -inf, which the eps floor below
    # replaces; the inner where keeps the gradient of log finite there.
    positive = total > 0
    log_sum = jnp.where(positive, bound + jnp.log(jnp.where(positive, total, 1.0)), -jnp.inf)
    # P / max(sum P, eps), in log space.
    gate = jnp.exp(q + bound - jnp.maximum(log_sum, math.log(eps)))
    if ms is not None:
        gate = jnp.where(ms, gate, 1.0)
    return gate


def mixture_gate(
    x: jax.Array,
    mean_offsets: jax.Array,
    c: jax.Array,
    *,
    axis: int,
    mask: jax.Array | None = None,
    eps: float = 1e-8,
) -> jax.Array:
    """Gate ``G`` of the mixture form (the authors' package, closed-form product).

    Args:
      x: input of any floating dtype and rank >= 1.
      mean_offsets: ``[heads, num_gaussians]`` offsets ``m`` (in units of ``x``).
      c: ``[heads, num_gaussians]`` scales; only ``c**2`` matters. Must be non-zero.
      axis: the axis normalised over and split by the heads (``size // heads`` each, the last
        head takes the remainder).
      mask: optional boolean, broadcastable to ``x``, True = valid.
      eps: added to the unbiased variance and used as the floor of the normalising sum (the
        package's heads always use 1e-8).

    Returns:
      The gate, float32, shape of ``x``; it sums to 1 over each head's valid positions along
      ``axis`` (unless the floor ``eps`` applies); 1 at masked positions.

    Raises:
      ValueError: on a bad axis, parameter shape, head split or mask.
    """
    check.floating_input(x)
    ax = check.canonical_axis(axis, x.ndim, "axis")
    mean_offsets = jnp.asarray(mean_offsets)
    c = jnp.asarray(c)
    if mean_offsets.ndim != 2 or c.shape != mean_offsets.shape:
        raise ValueError(
            "mean_offsets and c must both have shape [heads, num_gaussians]; got "
            f"{mean_offsets.shape} and {c.shape}."
        )
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}.")
    heads = mean_offsets.shape[0]
    sizes = head_sizes(x.shape[ax], heads, even=False)
    mask = check.broadcast_mask(mask, x.shape)

    # All heads but the last have equal chunks: one vectorised call covers them, and a second
    # call covers the last head, which may be longer. No Python loop over heads.
    n_even = heads if sizes[-1] == sizes[0] else heads - 1
    split = sizes[0] * n_even
    parts = []
    for lo, hi, h0, h1 in ((0, split, 0, n_even), (split, x.shape[ax], n_even, heads)):
        if h1 == h0:
            continue
        xp = jax.lax.slice_in_dim(x, lo, hi, axis=ax)
        mp = None if mask is None else jax.lax.slice_in_dim(mask, lo, hi, axis=ax)
        xs = _split_axis(xp, ax, h1 - h0)
        ms = None if mp is None else _split_axis(mp, ax, h1 - h0)
        gate = _mixture_gate_even(xs, ms, ax, mean_offsets[h0:h1], c[h0:h1], eps)
        parts.append(gate.reshape(xp.shape))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=ax)


def mixture_gaussian_adaptive_attention(
    x: jax.Array,
    mean_offsets: jax.Array,
    c: jax.Array,
    *,
    axis: int,
    mask: jax.Array | None = None,
    eps: float = 1e-8,
    return_gate: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Multi-head mixture GAAM (the package's ``MultiHeadGaussianAdaptiveAttention``).

    Args and the gate are as in :func:`mixture_gate`. No residual: see ``GaussianBlock``.

    Returns:
      ``y = x * G`` with the shape and dtype of ``x``; with ``return_gate=True``,
      ``(y, gate)`` where ``gate`` is float32.
    """
    gate = mixture_gate(x, mean_offsets, c, axis=axis, mask=mask, eps=eps)
    y = (x.astype(jnp.float32) * gate).astype(x.dtype)
    return (y, gate) if return_gate else y


# --------------------------------------------------------------------------------------------
# Density gate (the authors' Density-Adaptive-JEPA code)
# --------------------------------------------------------------------------------------------

# Constants of the authors' density gate: variance floor under the square root, floor of the
# relative width sigma_k = softplus(log_sigma_k) + floor, and the denominator's epsilon.
DENSITY_VAR_FLOOR = 1e-6
DENSITY_SIGMA_FLOOR = 1e-3
DENSITY_EPS = 1e-8
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def density_gate(
    x: jax.Array,
    mean_offsets: jax.Array,
    log_sigma: jax.Array,
    *,
    axis: int,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Gate ``G`` of the density form: the mean of K normalised Gaussian densities.

    Along ``axis``, with the population statistics ``mean`` and ``var`` (shifted one-pass
    moments, as everywhere in this module), ``std = sqrt(max(var, 1e-6))`` and
    ``sigma_k = softplus(log_sigma_k) + 1e-3``::

        z_k    = (x - (mean + mean_offsets_k)) / (std * sigma_k + 1e-8)
        log g_k = -z_k^2 / 2 - log sigma_k - log sqrt(2 pi)
        G      = exp(logsumexp_k(log g_k) - log K)

    The K pairs are shared by every feature and position (no heads), and ``G`` is not
    normalised along ``axis``: at ``z_k = 0`` it is ``1 / (sigma sqrt(2 pi))`` (0.98 at init),
    not 1.

    Args:
      x: input of any floating dtype and rank >= 1, e.g. ``[batch, time, features]``.
      mean_offsets: ``[K]`` offsets ``m_k``, in units of ``x`` (init 0).
      log_sigma: ``[K]`` width parameters; despite the name (the authors'),
        ``sigma_k = softplus(log_sigma_k) + 1e-3`` (init ``log 0.5``, so ``sigma_k = 0.4065``).
      axis: the axis the statistics are taken over (time in the authors' residual gate).
      mask: optional boolean, broadcastable to ``x``, True = valid. Masked elements are left out
        of the counts, means and variances; their gate is 1.

    Returns:
      The gate, float32, with the shape of ``x``; 1 at masked positions.

    Raises:
      ValueError: on a bad axis, parameter shape or mask.
    """
    check.floating_input(x)
    red = check.canonical_axis(axis, x.ndim, "axis")
    mean_offsets = jnp.asarray(mean_offsets)
    log_sigma = jnp.asarray(log_sigma)
    k = mean_offsets.shape[0] if mean_offsets.ndim == 1 else 0
    if k == 0 or log_sigma.shape != mean_offsets.shape:
        raise ValueError(
            "mean_offsets and log_sigma must both have shape [num_gaussians] with "
            f"num_gaussians >= 1; got {mean_offsets.shape} and {log_sigma.shape}."
        )
    mask = check.broadcast_mask(mask, x.shape)

    xf = x.astype(jnp.float32)
    if mask is not None:
        xf = jnp.where(mask, xf, 0.0)  # masked values never reach statistics or gradients
    pivot, mean_c, var = _centred_moments(xf, mask, red, ddof=0, variance="shifted")
    # The floor keeps std >= 1e-3, so a constant slice (var ~ 0, or a negative rounding
    # residue) gives finite values and a zero, not infinite, gradient through the variance.
    std = jnp.sqrt(jnp.maximum(var, DENSITY_VAR_FLOOR))

    # Per-Gaussian factors, shaped [1, ..., 1, K] against x's new trailing axis.
    kshape = (1,) * x.ndim + (k,)
    sigma = jax.nn.softplus(log_sigma.astype(jnp.float32)) + DENSITY_SIGMA_FLOOR
    offsets = mean_offsets.astype(jnp.float32).reshape(kshape)
    log_norm = -jnp.log(sigma) - _LOG_SQRT_2PI  # log g_k <= log_norm_k (at z_k = 0)
    # The log-sum-exp is shifted by the bound max_k log_norm_k instead of the data's max over
    # k: every exp(log g_k - bound) <= 1 whatever z is, so nothing can overflow, and one
    # reduction suffices. The usual max shift needs two passes over log g, which XLA may fuse
    # separately and recompute with different rounding: at |log g| ~ 1e5 (a constant slice,
    # where std is floored at 1e-3) the two differed by hundreds and exp overflowed to inf
    # (seen on XLA:CPU, jaxlib 0.10 at -O0 with the classic emitters). Precision is lost only
    # for gates below ~1e-35, where the terms become subnormal. The shift cancels in the
    # result, so its gradient is not needed.
    bound = jax.lax.stop_gradient(jnp.max(log_norm))
    # Per-slice, per-Gaussian reciprocal widths ([..., 1, ..., K]), so the elementwise pass
    # multiplies only.
    inv_width = 1.0 / (std[..., None] * sigma.reshape(kshape) + DENSITY_EPS)
    centred = ((xf - pivot) - mean_c)[..., None]  # x - mean, [..., 1]
    z = (centred - offsets) * inv_width  # [..., K]
    terms = jnp.exp(-0.5 * jnp.square(z) + (log_norm - bound).reshape(kshape))
    # exp(logsumexp_k(log g_k) - log K) = exp(bound - log K) * sum_k exp(log g_k - bound)
    gate = jnp.exp(bound - math.log(k)) * jnp.sum(terms, axis=-1)
    if mask is not None:
        gate = jnp.where(mask, gate, 1.0)
    return gate


def density_mean_gate(
    x: jax.Array,
    mean_offsets: jax.Array,
    log_sigma: jax.Array,
    *,
    axis: int,
    mask: jax.Array | None = None,
    return_gate: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The authors' density gate applied: ``y = x * G`` (no residual, no normalisation).

    Args and the gate are as in :func:`density_gate`.

    Returns:
      ``y`` with the shape and dtype of ``x`` (masked elements are ``x`` unchanged); with
      ``return_gate=True``, ``(y, gate)`` where ``gate`` is float32.
    """
    gate = density_gate(x, mean_offsets, log_sigma, axis=axis, mask=mask)
    y = (x.astype(jnp.float32) * gate).astype(x.dtype)
    return (y, gate) if return_gate else y
