"""LoRA on any ``nn.Dense`` of a Flax model, chosen by a regular expression over module paths.

A LoRA adds a trainable low-rank update to a frozen ``Dense``: ``y = x W + b + s * (x A) B``
with ``A`` ``[in, r]``, ``B`` ``[r, out]`` and the scale ``s`` of :attr:`LoRA.scale`. The
update is attached by method interception (``nn.intercept_methods``) rather than by rewriting
the model: every ``Dense.__call__`` inside :func:`applied` whose module path (``'layers/query'``,
``'layers/self_attn/q_proj'``) matches :attr:`LoRA.targets` gets its ``A`` and ``B`` as the
variables ``lora_a`` / ``lora_b`` of the collection :data:`COLLECTION`, at that module's own
path. Inside an ``nn.scan`` over layers they are stacked ``[layers, in, r]`` like the layer's
parameters. The base parameters stay in ``params``: a fine-tuning step differentiates the
adapter collection only, so the base is never differentiated nor held in an optimiser state.

Adapters are float32 whatever the model's dtype and the update is computed in float32 (``r``
is small: the cost is ``r / in`` of the base matmul), then cast to the base output's dtype.
They are annotated with logical axes ``(None, None)``: replicated on a mesh, never split along
the rank, while the base keeps its own shardings (tensor-parallel fine-tuning).

:func:`merge` folds the adapters into the base kernels for inference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from gaam_jax import sharding

__all__ = ["COLLECTION", "LoRA", "PAPER_TARGETS", "applied", "in_call", "merge", "paths"]

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
      targets: regular expression searched in each ``Dense``'s module path (``'/'``-joined).
      scaling: ``alpha_over_r`` (peft's ``alpha / r``, the default), ``raw_alpha`` (``alpha``
        itself, the paper's scripts) or ``rslora`` (``alpha / sqrt(r)``, rank-stabilised).
      init: ``peft`` (``A`` Kaiming-uniform as ``torch.nn.init.kaiming_uniform_(a=sqrt(5))``
        on ``[r, in]``: uniform in ``+-1/sqrt(in)``) or ``paper`` (``A ~ N(0, 1/r)``);
        ``B`` is zero in both, so an adapted model starts as its base.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str = PAPER_TARGETS
    scaling: str = "alpha_over_r"
    init: str = "peft"

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
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
        """The factor on ``x A B``."""
        if self.scaling == "raw_alpha":
            return float(self.alpha)
        if self.scaling == "rslora":
            return float(self.alpha) / math.sqrt(self.rank)
        return float(self.alpha) / self.rank

    def matches(self, path: str) -> bool:
        """Whether the ``Dense`` at module path ``path`` (``'layers/query'``) is adapted."""
        return re.search(self.targets, path) is not None

    def init_a(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """``A`` ``[in, r]`` (float32)."""
        n_in = shape[-2]
        if self.init == "paper":
            return jax.random.normal(key, shape, jnp.float32) / math.sqrt(self.rank)
        bound = 1.0 / math.sqrt(n_in)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _interceptor(lora: LoRA):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        if not lora.matches(path):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        shape_a, shape_b = (x.shape[-1], lora.rank), (lora.rank, module.features)
        init_a = sharding.with_logical_axes(lora.init_a, (None, None))
        init_b = sharding.with_logical_axes(nn.initializers.zeros_init(), (None, None))
        # Lazily initialised: make_rng is only called when the variables are created.
        a = module.variable(
            COLLECTION, "lora_a", lambda: init_a(module.make_rng("params"), shape_a)
        ).value
        b = module.variable(COLLECTION, "lora_b", lambda: init_b(None, shape_b, jnp.float32)).value
        update = (x.astype(jnp.float32) @ a.astype(jnp.float32)) @ b.astype(jnp.float32)
        return y + (lora.scale * update).astype(y.dtype)

    return intercept


@contextlib.contextmanager
def applied(lora: LoRA | None) -> Iterator[None]:
    """Within this context every targeted ``Dense`` call adds its LoRA update (None: no-op).

    Use it inside a module's ``__call__`` (the encoders do, given ``adapters.lora``) or around
    ``init``/``apply``; it acts while the model is traced.
    """
    if lora is None:
        yield
        return
    with nn.intercept_methods(_interceptor(lora)):
        yield


def in_call(call: Callable) -> Callable:
    """Decorates a module's ``__call__`` to run inside :func:`applied` of ``self.adapters.lora``.

    The encoders' ``__call__`` use it (under ``@nn.compact``), so an encoder module built with
    ``adapters=Adapters(lora=...)`` is adapted wherever it is applied.
    """

    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        with applied(self.adapters.lora):
            return call(self, *args, **kwargs)

    return wrapper


def paths(adapters: Any) -> list[tuple[str, ...]]:
    """Module paths (``('layers', 'query')``) of the adapted ``Dense`` s in an adapter tree."""
    flat = flatten_dict(adapters)
    return sorted({k[:-1] for k in flat if k[-1] == "lora_a"})


def merge(params: Any, adapters: Any, lora: LoRA) -> Any:
    """``params`` with every adapted kernel replaced by ``W + scale * A B`` (in W's dtype).

    Traceable: jit it with the params' shardings as ``out_shardings`` (and the params donated)
    to merge in place on a mesh. Kernels may be stacked ``[layers, in, out]`` with adapters
    ``[layers, in, r]`` / ``[layers, r, out]``.

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
        a, b = ad[(*path, "lora_a")], ad[(*path, "lora_b")]
        delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
        flat[(*path, "kernel")] = (kernel.astype(jnp.float32) + lora.scale * delta).astype(
            kernel.dtype
        )
    return unflatten_dict(flat)
