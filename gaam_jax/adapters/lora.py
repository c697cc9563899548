"""LoRA: what it adapts, the shapes of its factors for each kind of projection, and merging.

A LoRA adds a trainable low-rank update to a frozen projection: ``y = f(x; W) + s * f(x; A B)``
with the scale ``s`` of :attr:`LoRA.scale`. The factors are float32 whatever the model's dtype,
the update is computed in float32 (``r`` is small: its cost is about ``r / in`` of the base
matmul) and cast to the base output's dtype; ``B`` starts at zero, so an adapted model starts
as its base.

Three kinds of projection are adapted, in Linen and in NNX alike (:class:`Projection` says how
the input meets ``A`` and ``B`` for each):

* ``Dense`` / ``Linear``: ``A`` ``[in, r]``, ``B`` ``[r, out]`` (peft's ``lora_A.weight.T`` and
  ``lora_B.weight.T``).
* ``DenseGeneral`` / ``LinearGeneral`` (any input ``axis`` and output ``features``; no batch
  dimensions): ``A`` ``[*in, r]``, ``B`` ``[r, *out]``, where the kernel is ``[*in, *out]``.
* ``Einsum`` (``'lhs,rhs->out'``, the kernel on the right): ``A`` has the kernel's shape with
  every dimension that is not shared with the input set to 1, then ``r``; ``B`` the kernel's
  shape with every shared dimension set to 1, then ``r``. So ``W + s * sum_r A B`` is the merged
  kernel however the kernel's dimensions are ordered (``'BTD,NDH->BTNH'``).

Stacked kernels (``nn.scan`` over layers: ``[layers, ...]``) have factors stacked the same way.
:func:`merge` folds the factors into kernels of any of these kinds.

**DoRA** (``LoRA(use_dora=True)``, peft's ``use_dora``) adds a trainable magnitude ``m`` per
output element, ``lora_magnitude``, initialised to ``||W + s A B||`` (``||W||``, as ``B = 0``),
where ``||.||`` is the L2 norm over the kernel's input dimensions for each output element. With
``f = m / stop_gradient(||W + s A B||)``, the output of a projection with bias ``b`` is

    y = (x W + b) + (f - 1) * (x W) + f * s * f(x; A B)  =  f * (x W + s * f(x; A B)) + b,

so the merged kernel is ``f * (W + s A B)``. The norm is a constant for the gradient, as in
peft (the DoRA paper, section 4.3). ``m`` is ``[out]`` for ``Dense``, the kernel's output
dimensions for ``DenseGeneral`` and, for ``Einsum``, the kernel's shape with each contracted
dimension set to 1 (stacked ``[layers, ...]`` like the factors).

**Per-module rank and alpha** (``rank_pattern``, ``alpha_pattern``, peft's options of those
names): the first key (a regular expression) that matches a ``'/'``-bounded suffix of the
module path gives that module's rank or alpha; the others take ``rank`` and ``alpha``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax.core import meta
from flax.traverse_util import flatten_dict, unflatten_dict

__all__ = [
    "COLLECTION",
    "FACTORS",
    "INITS",
    "PAPER_TARGETS",
    "SCALINGS",
    "LoRA",
    "Projection",
    "init_magnitudes",
    "merge",
    "merged_kernel",
    "weight_norm",
]

COLLECTION = "adapters"
# The query and value projections of every encoder: bert/beit name them query/value,
# llama/wavlm q_proj/v_proj (the paper's LoRA targets).
PAPER_TARGETS = r"(^|/)(query|value|q_proj|v_proj)$"
SCALINGS = ("alpha_over_r", "raw_alpha", "rslora")
INITS = ("peft", "paper")
# The LoRA variables at an adapted projection's path (lora_magnitude only with DoRA).
FACTORS = ("lora_a", "lora_b", "lora_magnitude")


def _pairs(pattern: Any, kind: type, what: str) -> tuple[tuple[str, Any], ...]:
    """A mapping or sequence of ``(regex, value)`` pairs as a tuple of pairs (hashable)."""
    items = pattern.items() if hasattr(pattern, "items") else pattern
    try:
        pairs = tuple((str(k), v) for k, v in items)
    except (TypeError, ValueError):
        raise ValueError(
            f"LoRA {what} must map regular expressions to values, got {pattern!r}."
        ) from None
    out = []
    for key, value in pairs:
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(
                f"LoRA {what} key {key!r} is not a regular expression: {err}."
            ) from None
        if kind is int:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LoRA {what}[{key!r}] must be a positive integer, got {value!r}.")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"LoRA {what}[{key!r}] must be a number, got {value!r}.")
        out.append((key, kind(value)))
    return tuple(out)


def _pattern_value(pattern: tuple[tuple[str, Any], ...], path: str) -> Any:
    # peft's get_pattern_key: the first key, in order, that matches the whole name or a suffix
    # of it that starts after a separator ('.' in torch names, '/' in module paths here).
    for key, value in pattern:
        if re.match(rf"(.*/)?({key})$", path):
            return value
    return None


@dataclasses.dataclass(frozen=True)
class LoRA:
    """What a LoRA adapts and how.

    Attributes:
      rank: ``r``, the inner dimension of ``A`` and ``B``.
      alpha: the scale's numerator.
      targets: regular expression searched in each projection's module path (``'/'``-joined,
        relative to the adapted model: ``'layers/query'``, ``'blocks/0/attn/query'``).
      scaling: ``alpha_over_r`` (peft's ``alpha / r``, the default), ``raw_alpha`` (``alpha``
        itself, the paper's scripts) or ``rslora`` (``alpha / sqrt(r)``, rank-stabilised).
      init: ``peft`` (``A`` Kaiming-uniform as ``torch.nn.init.kaiming_uniform_(a=sqrt(5))``:
        uniform in ``+-1/sqrt(fan_in)``) or ``paper`` (``A ~ N(0, 1/r)``); ``B`` is zero in both.
        With a per-module rank, ``paper`` uses that module's rank.
      use_dora: DoRA: a trainable magnitude per output element (see the module docstring).
      rank_pattern: ``(regex, rank)`` pairs (a dict is accepted and stored as pairs, in order):
        the rank of the modules whose path a key matches (:meth:`rank_for`); ``rank`` is the
        default.
      alpha_pattern: ``(regex, alpha)`` pairs, likewise (:meth:`alpha_for`); ``alpha`` is the
        default.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str = PAPER_TARGETS
    scaling: str = "alpha_over_r"
    init: str = "peft"
    use_dora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}.")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoRA use_dora must be True or False, got {self.use_dora!r}.")
        # Frozen and hashable (a field of Linen modules, a cache key): patterns become pairs.
        object.__setattr__(self, "rank_pattern", _pairs(self.rank_pattern, int, "rank_pattern"))
        object.__setattr__(
            self, "alpha_pattern", _pairs(self.alpha_pattern, float, "alpha_pattern")
        )
        if self.scaling not in SCALINGS:
            raise ValueError(f"LoRA scaling={self.scaling!r} is not one of {', '.join(SCALINGS)}.")
        if self.init not in INITS:
            raise ValueError(f"LoRA init={self.init!r} is not one of {', '.join(INITS)}.")
        try:
            re.compile(self.targets)
        except re.error as err:
            raise ValueError(
                f"LoRA targets {self.targets!r} is not a regular expression: {err}."
            ) from None

    def _scale(self, rank: int, alpha: float) -> float:
        if self.scaling == "raw_alpha":
            return float(alpha)
        if self.scaling == "rslora":
            return float(alpha) / math.sqrt(rank)
        return float(alpha) / rank

    @property
    def scale(self) -> float:
        """The factor on the update of a module that no pattern names (``rank``, ``alpha``)."""
        return self._scale(self.rank, self.alpha)

    def rank_for(self, path: str) -> int:
        """The rank of the projection at module path ``path``: ``rank_pattern``'s or ``rank``."""
        found = _pattern_value(self.rank_pattern, path)
        return self.rank if found is None else found

    def alpha_for(self, path: str) -> float:
        """The alpha of the projection at ``path``: ``alpha_pattern``'s or ``alpha``."""
        found = _pattern_value(self.alpha_pattern, path)
        return float(self.alpha) if found is None else found

    def scale_for(self, path: str) -> float:
        """The factor on the update of the projection at ``path`` (its rank and alpha)."""
        return self._scale(self.rank_for(path), self.alpha_for(path))

    def matches(self, path: str) -> bool:
        """Whether the projection at module path ``path`` (``'layers/query'``) is adapted."""
        return re.search(self.targets, path) is not None

    def init_a(self, key: jax.Array, shape: Sequence[int], fan_in: int) -> jax.Array:
        """A fresh ``A`` (float32) of the stored ``shape`` (its rank last)."""
        if self.init == "paper":
            return jax.random.normal(key, tuple(shape), jnp.float32) / math.sqrt(shape[-1])
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, tuple(shape), jnp.float32, -bound, bound)


@dataclasses.dataclass(frozen=True)
class Projection:
    """How one projection's input meets its LoRA factors.

    The update is ``einsum(mid,b->out)(einsum(lhs,a->mid)(x, A), B)`` on the factors with the
    axes ``squeeze_a`` / ``squeeze_b`` of their stored shapes removed.

    Attributes:
      lhs: the input's subscripts.
      a: the (squeezed) ``A``'s subscripts, ending with the rank's.
      mid: ``x A``'s subscripts.
      b: the (squeezed) ``B``'s subscripts.
      out: the output's subscripts.
      a_shape: the stored ``A`` shape.
      b_shape: the stored ``B`` shape.
      squeeze_a: axes of the stored ``A`` that are 1 by layout (Einsum kernels).
      squeeze_b: likewise for ``B``.
      fan_in: the number of input elements each output element sums (``A``'s init bound).
      m: the (squeezed) DoRA magnitude's subscripts: the kernel's output letters, or None
        where DoRA is not defined (an Einsum kernel axis neither contracted nor in the output).
      m_shape: the stored magnitude shape.
      squeeze_m: axes of the stored magnitude that are 1 by layout (Einsum: contracted axes).
      out_shape: the shape that broadcasts the kernel's output dimensions (the magnitude, the
        bias) against the output: their sizes at their places in ``out``, 1 elsewhere.
    """

    lhs: str
    a: str
    mid: str
    b: str
    out: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    squeeze_a: tuple[int, ...] = ()
    squeeze_b: tuple[int, ...] = ()
    fan_in: int = 1
    m: str | None = None
    m_shape: tuple[int, ...] = ()
    squeeze_m: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()

    @classmethod
    def dense_general(
        cls, x_ndim: int, axis: Sequence[int], kernel_shape: Sequence[int], rank: int
    ) -> Projection:
        """A kernel ``[*in, *out]`` contracted with the input's ``axis`` (``Dense``: ``(-1,)``).

        Raises:
          ValueError: the kernel has batch dimensions (``DenseGeneral(batch_dims=...)``).
        """
        axes = sorted(a % x_ndim for a in axis)  # Flax contracts the sorted, normalised axes
        n_in = len(axes)
        n_out = len(kernel_shape) - n_in
        if n_out < 1:
            raise ValueError(
                f"LoRA: a kernel {tuple(kernel_shape)} contracted over {n_in} input axes has no "
                "output axes (a DenseGeneral with batch_dims is not supported)."
            )
        letters = iter(string.ascii_letters)
        x_letters = [next(letters) for _ in range(x_ndim)]
        out_letters = "".join(next(letters) for _ in range(n_out))
        r = next(letters)
        in_letters = "".join(x_letters[a] for a in axes)
        free = "".join(c for i, c in enumerate(x_letters) if i not in axes)
        return cls(
            lhs="".join(x_letters),
            a=in_letters + r,
            mid=free + r,
            b=r + out_letters,
            out=free + out_letters,
            a_shape=(*kernel_shape[:n_in], rank),
            b_shape=(rank, *kernel_shape[n_in:]),
            fan_in=math.prod(kernel_shape[:n_in]),
            m=out_letters,
            m_shape=tuple(kernel_shape[n_in:]),
            out_shape=(1,) * len(free) + tuple(kernel_shape[n_in:]),
        )

    @classmethod
    def einsum(cls, equation: str, kernel_shape: Sequence[int], rank: int) -> Projection:
        """An ``Einsum`` kernel: ``equation`` is ``'lhs,rhs->out'`` with the kernel as ``rhs``.

        Raises:
          ValueError: the equation is implicit, has an ellipsis in the kernel's operand or does
            not fit the kernel's rank.
        """
        eq = equation.replace(" ", "")
        if "->" not in eq or eq.count(",") != 1:
            raise ValueError(f"LoRA: einsum {equation!r} must be explicit with two operands.")
        ins, out = eq.split("->")
        lhs, rhs = ins.split(",")
        if "." in rhs or len(rhs) != len(kernel_shape):
            raise ValueError(
                f"LoRA: einsum {equation!r} does not name the {len(kernel_shape)} axes of the "
                f"kernel {tuple(kernel_shape)} (an ellipsis on the kernel is not supported)."
            )
        r = sorted(set(string.ascii_letters) - set(eq))[0]
        shared = [c in lhs for c in rhs]
        sizes = dict(zip(rhs, kernel_shape, strict=True))
        # DoRA's norm runs over the contracted axes; every other kernel axis must be an output
        # axis (an axis summed over in the kernel alone has no per-output magnitude).
        contracted = [c in lhs and c not in out for c in rhs]
        dora_ok = all(c in lhs or c in out for c in rhs)
        m = "".join(c for c, k in zip(rhs, contracted, strict=True) if not k)
        return cls(
            lhs=lhs,
            a="".join(c for c, s in zip(rhs, shared, strict=True) if s) + r,
            mid="".join(c for c in out if c in lhs) + r,
            b="".join(c for c, s in zip(rhs, shared, strict=True) if not s) + r,
            out=out,
            a_shape=(*(k if s else 1 for k, s in zip(kernel_shape, shared, strict=True)), rank),
            b_shape=(*(1 if s else k for k, s in zip(kernel_shape, shared, strict=True)), rank),
            squeeze_a=tuple(i for i, s in enumerate(shared) if not s),
            squeeze_b=tuple(i for i, s in enumerate(shared) if s),
            fan_in=math.prod(sizes[c] for c in rhs if c in lhs and c not in out) or 1,
            m=m if dora_ok else None,
            m_shape=tuple(1 if k else n for n, k in zip(kernel_shape, contracted, strict=True)),
            squeeze_m=tuple(i for i, k in enumerate(contracted) if k),
            out_shape=tuple(sizes.get(c, 1) for c in out),
        )

    def update(self, x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
        """``scale * f(x; A B)`` in float32 (``a``, ``b`` in their stored shapes)."""
        if self.squeeze_a:
            a = jnp.squeeze(a, self.squeeze_a)
        if self.squeeze_b:
            b = jnp.squeeze(b, self.squeeze_b)
        xa = jnp.einsum(f"{self.lhs},{self.a}->{self.mid}", x.astype(jnp.float32), a)
        return scale * jnp.einsum(f"{self.mid},{self.b}->{self.out}", xa, b.astype(jnp.float32))

    def dora(
        self,
        y: jax.Array,
        x: jax.Array,
        kernel: jax.Array,
        bias: jax.Array | None,
        a: jax.Array,
        b: jax.Array,
        magnitude: jax.Array,
        scale: float,
    ) -> jax.Array:
        """The base output ``y`` with DoRA applied, as peft computes it (float32).

        ``y + (f - 1) * (y - bias) + f * scale * f(x; A B)`` with
        ``f = magnitude / stop_gradient(||W + scale * A B||)``: ``y - bias`` is ``x W``.

        Args:
          y: the base module's output (bias included), any float dtype.
          x: its input.
          kernel: ``W``, the kernel as the module holds it (not stacked).
          bias: the module's bias in its own shape, or None.
          a: ``A``, stored shape.
          b: ``B``, stored shape.
          magnitude: ``m``, stored shape (:attr:`m_shape`).
          scale: the update's factor.

        Returns:
          The adapted output, float32, ``y``'s shape.
        """
        if self.m is None:
            raise ValueError(
                "DoRA: an einsum kernel axis that is neither contracted nor an output axis."
            )
        # peft detaches the norm (and the LoRA weight inside it): no gradient flows through it.
        norm = jax.lax.stop_gradient(weight_norm(kernel, a, b, scale, magnitude.shape))
        factor = magnitude.astype(jnp.float32) / norm
        if self.squeeze_m:
            factor = jnp.squeeze(factor, self.squeeze_m)
        order = "".join(c for c in self.out if c in self.m)
        factor = jnp.einsum(f"{self.m}->{order}", factor).reshape(self.out_shape)
        base = y.astype(jnp.float32)
        xw = base if bias is None else base - bias.astype(jnp.float32).reshape(self.out_shape)
        return base + (factor - 1.0) * xw + factor * self.update(x, a, b, scale)


def kernel_delta(kernel_shape: Sequence[int], a: jax.Array, b: jax.Array) -> jax.Array:
    """``A B`` (float32) laid out like a kernel of ``kernel_shape``, from the stored factors.

    Works for every layout of :class:`Projection`, stacked or not: an Einsum layout has
    ``A.ndim == B.ndim == kernel.ndim + 1`` with the rank last in both; otherwise ``A`` is
    ``[*lead, *in, r]`` and ``B`` ``[*lead, r, *out]``.
    """
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    ndim = len(kernel_shape)
    if a.ndim == ndim + 1 and b.ndim == ndim + 1 and a.shape[-1] == b.shape[-1]:
        letters = string.ascii_letters
        a_sub = "".join(letters[i] for i in range(ndim) if a.shape[i] != 1)
        b_sub = "".join(letters[i] for i in range(ndim) if b.shape[i] != 1)
        out = "".join(letters[i] for i in range(ndim) if letters[i] in a_sub + b_sub)
        squeeze = lambda f: jnp.squeeze(f, tuple(i for i in range(ndim) if f.shape[i] == 1))  # noqa: E731
        delta = jnp.einsum(f"{a_sub}Z,{b_sub}Z->{out}", squeeze(a), squeeze(b))
        return delta.reshape(tuple(kernel_shape))
    lead = a.ndim + b.ndim - 2 - ndim
    rank = a.shape[-1]
    a2 = a.reshape((*a.shape[:lead], -1, rank))
    b2 = b.reshape((*b.shape[:lead], rank, -1))
    return jnp.matmul(a2, b2).reshape(tuple(kernel_shape))


def _norm_axes(
    kernel_shape: Sequence[int], a_ndim: int, b_ndim: int, magnitude_shape: Sequence[int]
) -> tuple[int, ...]:
    """The kernel axes a DoRA norm runs over, from the stored layouts (stacked or not)."""
    ndim = len(kernel_shape)
    if len(magnitude_shape) == ndim:  # Einsum layout: contracted axes kept as 1
        return tuple(i for i in range(ndim) if magnitude_shape[i] == 1)
    lead = a_ndim + b_ndim - 2 - ndim  # [*lead, *in, *out] against m [*lead, *out]
    return tuple(range(lead, lead + ndim - len(magnitude_shape)))


def weight_norm(
    kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float, magnitude_shape: Sequence[int]
) -> jax.Array:
    """``||W + scale * A B||`` per output element, float32, in the magnitude's stored shape.

    The L2 norm over the kernel's input (contracted) dimensions: peft's ``weight_norm`` of a
    ``Linear`` (``torch.linalg.norm(W + s * B A, dim=1)``, its weight being ``[out, in]``).
    Works for every stored layout (:class:`Projection`), stacked over layers or not.

    Args:
      kernel: ``W`` in any float dtype.
      a: ``A``, stored shape.
      b: ``B``, stored shape.
      scale: the update's factor.
      magnitude_shape: the stored DoRA magnitude's shape (it says which axes are outputs).
    """
    w = kernel.astype(jnp.float32) + scale * kernel_delta(kernel.shape, a, b)
    axes = _norm_axes(kernel.shape, a.ndim, b.ndim, magnitude_shape)
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=axes)).reshape(tuple(magnitude_shape))


def merged_kernel(
    kernel: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float,
    magnitude: jax.Array | None = None,
) -> jax.Array:
    """``W + scale * A B``, or with DoRA ``m / ||W + scale * A B|| * (W + scale * A B)``.

    Args:
      kernel: ``W`` (any layout of :class:`Projection`, stacked or not).
      a: ``A``, stored shape.
      b: ``B``, stored shape.
      scale: the update's factor.
      magnitude: DoRA's ``m`` (stored shape), or None for plain LoRA.

    Returns:
      The merged kernel, in ``W``'s dtype and shape.
    """
    w = kernel.astype(jnp.float32) + scale * kernel_delta(kernel.shape, a, b)
    if magnitude is not None:
        axes = _norm_axes(kernel.shape, a.ndim, b.ndim, magnitude.shape)
        norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
        w = magnitude.astype(jnp.float32).reshape(norm.shape) / norm * w
    return w.astype(kernel.dtype)


def paths(adapters: Any) -> list[tuple[str, ...]]:
    """Module paths (``('layers', 'query')``) of the adapted projections in an adapter tree."""
    flat = flatten_dict(adapters)
    return sorted({k[:-1] for k in flat if k[-1] == "lora_a"})


def init_magnitudes(params: Any, adapters: Any, lora: LoRA) -> Any:
    """``adapters`` with every DoRA magnitude set to ``||W + s A B||`` of ``params``' kernel.

    A Linen model's ``init`` sets each magnitude from the kernel it draws itself; adapters that
    will run on other base weights (a checkpoint) take their magnitudes from those, so that the
    adapted model starts as that base. Traceable; boxed (logically annotated) leaves stay boxed.

    Args:
      params: the base ``params`` collection the adapters will run on.
      adapters: the :data:`COLLECTION` collection (leaves without a magnitude are unchanged).
      lora: the adapters' :class:`LoRA` (the scale of each path).

    Raises:
      ValueError: a magnitude has no kernel at its path in ``params``.
    """
    flat = dict(flatten_dict(adapters))
    base = flatten_dict(params)
    for path in paths(adapters):
        key = (*path, "lora_magnitude")
        if key not in flat:
            continue
        kernel = base.get((*path, "kernel"))
        if kernel is None:
            raise ValueError(f"DoRA: no kernel at {'/'.join(path)} in params.")
        a, b, m = (meta.unbox(flat[(*path, n)]) for n in FACTORS)
        norm = weight_norm(meta.unbox(kernel), a, b, lora.scale_for("/".join(path)), m.shape)
        boxed = flat[key]
        flat[key] = boxed.replace_boxed(norm) if isinstance(boxed, meta.AxisMetadata) else norm
    return unflatten_dict(flat)


def merge(params: Any, adapters: Any, lora: LoRA) -> Any:
    """``params`` with every adapted kernel replaced by its merged kernel (in W's dtype).

    ``W + s A B``, or with DoRA ``(m / ||W + s A B||) * (W + s A B)``
    (:func:`merged_kernel`), ``s`` being the path's :meth:`LoRA.scale_for`. Every kind of
    kernel (``Dense``, ``DenseGeneral``, ``Einsum``, stacked or not) is merged. Traceable: jit
    it with the params' shardings as ``out_shardings`` (and the params donated) to merge in
    place on a mesh.

    Args:
      params: the base ``params`` collection.
      adapters: the :data:`COLLECTION` collection (``lora_a`` / ``lora_b`` leaves, and
        ``lora_magnitude`` with DoRA; other adapters, such as DAAM gates, are ignored). Paths
        are those the LoRA's patterns were matched against (relative to the adapted model).
      lora: the adapters' :class:`LoRA` (the scale of each path).

    Raises:
      ValueError: an adapter has no kernel at its path in ``params``, a rank other than
        ``lora.rank_for`` of its path, or a magnitude where ``lora.use_dora`` is off (or none
        where it is on).
    """
    flat = dict(flatten_dict(params))
    ad = flatten_dict(adapters)
    for path in paths(adapters):
        where = "/".join(path)
        kernel = flat.get((*path, "kernel"))
        if kernel is None:
            raise ValueError(f"LoRA merge: no kernel at {where} in params.")
        a, b = ad[(*path, "lora_a")], ad[(*path, "lora_b")]
        if a.shape[-1] != lora.rank_for(where):
            raise ValueError(
                f"LoRA merge: {where} has rank {a.shape[-1]}, the LoRA gives it "
                f"{lora.rank_for(where)} (its scale would be wrong)."
            )
        magnitude = ad.get((*path, "lora_magnitude"))
        if (magnitude is not None) != lora.use_dora:
            have = "a DoRA magnitude" if magnitude is not None else "no DoRA magnitude"
            raise ValueError(
                f"LoRA merge: {where} has {have} but the LoRA has use_dora={lora.use_dora}."
            )
        flat[(*path, "kernel")] = merged_kernel(kernel, a, b, lora.scale_for(where), magnitude)
    return unflatten_dict(flat)
