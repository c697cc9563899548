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
from flax.traverse_util import flatten_dict, unflatten_dict

__all__ = ["COLLECTION", "INITS", "LoRA", "PAPER_TARGETS", "SCALINGS", "Projection", "merge"]

COLLECTION = "adapters"
# The query and value projections of every encoder: bert/beit name them query/value,
# llama/wavlm q_proj/v_proj (the paper's LoRA targets).
PAPER_TARGETS = r"(^|/)(query|value|q_proj|v_proj)$"
SCALINGS = ("alpha_over_r", "raw_alpha", "rslora")
INITS = ("peft", "paper")


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
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str = PAPER_TARGETS
    scaling: str = "alpha_over_r"
    init: str = "peft"

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}.")
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

    @property
    def scale(self) -> float:
        """The factor on the update."""
        if self.scaling == "raw_alpha":
            return float(self.alpha)
        if self.scaling == "rslora":
            return float(self.alpha) / math.sqrt(self.rank)
        return float(self.alpha) / self.rank

    def matches(self, path: str) -> bool:
        """Whether the projection at module path ``path`` (``'layers/query'``) is adapted."""
        return re.search(self.targets, path) is not None

    def init_a(self, key: jax.Array, shape: Sequence[int], fan_in: int) -> jax.Array:
        """A fresh ``A`` (float32) of the stored ``shape``."""
        if self.init == "paper":
            return jax.random.normal(key, tuple(shape), jnp.float32) / math.sqrt(self.rank)
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
        )

    def update(self, x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
        """``scale * f(x; A B)`` in float32 (``a``, ``b`` in their stored shapes)."""
        if self.squeeze_a:
            a = jnp.squeeze(a, self.squeeze_a)
        if self.squeeze_b:
            b = jnp.squeeze(b, self.squeeze_b)
        xa = jnp.einsum(f"{self.lhs},{self.a}->{self.mid}", x.astype(jnp.float32), a)
        return scale * jnp.einsum(f"{self.mid},{self.b}->{self.out}", xa, b.astype(jnp.float32))


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


def paths(adapters: Any) -> list[tuple[str, ...]]:
    """Module paths (``('layers', 'query')``) of the adapted projections in an adapter tree."""
    flat = flatten_dict(adapters)
    return sorted({k[:-1] for k in flat if k[-1] == "lora_a"})


def merge(params: Any, adapters: Any, lora: LoRA) -> Any:
    """``params`` with every adapted kernel replaced by ``W + scale * A B`` (in W's dtype).

    Every kind of kernel (``Dense``, ``DenseGeneral``, ``Einsum``, stacked or not) is merged.
    Traceable: jit it with the params' shardings as ``out_shardings`` (and the params donated)
    to merge in place on a mesh.

    Args:
      params: the base ``params`` collection.
      adapters: the :data:`COLLECTION` collection (``lora_a`` / ``lora_b`` leaves; other
        adapters, such as DAAM gates, are ignored).
      lora: the adapters' :class:`LoRA` (for the scale).

    Raises:
      ValueError: an adapter has no kernel at its path in ``params``.
    """
    flat = dict(flatten_dict(params))
    ad = flatten_dict(adapters)
    for path in paths(adapters):
        kernel = flat.get((*path, "kernel"))
        if kernel is None:
            raise ValueError(f"LoRA merge: no kernel at {'/'.join(path)} in params.")
        delta = kernel_delta(kernel.shape, ad[(*path, "lora_a")], ad[(*path, "lora_b")])
        flat[(*path, "kernel")] = (kernel.astype(jnp.float32) + lora.scale * delta).astype(
            kernel.dtype
        )
    return unflatten_dict(flat)
