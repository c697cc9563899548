"""The pieces the classification heads are made of, shared by every architecture's.

A float32 ``Dense`` and ``LayerNorm`` initialised as transformers' ``_init_weights``
(N(0, ``initializer_range``) kernels, zero biases, unit scales), the last layer's pooled state,
:class:`HeadTensors`, which finds a head's tensors in a checkpoint under the names a base model
or a head model stores them, and the check of a head's option names. Each architecture module
builds its head from these.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gaam_jax.sharding import with_logical_axes

__all__ = [
    "DEFAULT_STD",
    "HIGHEST",
    "HeadTensors",
    "check_option_names",
    "dense",
    "init_std",
    "last_state",
    "layer_norm",
    "required_input",
]

DEFAULT_STD = 0.02  # transformers' initializer_range default
HIGHEST = jax.lax.Precision.HIGHEST  # the heads are tiny: exact float32 products cost nothing
_ZEROS = nn.initializers.zeros_init()
_ONES = nn.initializers.ones_init()


def dense(
    features: int,
    std: float,
    name: str,
    axes: tuple[str | None, str | None] = ("embed", None),
    use_bias: bool = True,
) -> nn.Dense:
    """A float32 Dense initialised as transformers' ``_init_weights`` (N(0, std), zero bias)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=jnp.float32,
        precision=HIGHEST,
        kernel_init=with_logical_axes(nn.initializers.normal(std), axes),
        bias_init=with_logical_axes(_ZEROS, (axes[1],)),
        name=name,
    )


def layer_norm(eps: float, name: str) -> nn.LayerNorm:
    """A float32 LayerNorm with PyTorch's two-pass variance (unit scale, zero bias)."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=jnp.float32,
        use_fast_variance=False,  # two-pass variance, as PyTorch
        scale_init=with_logical_axes(_ONES, (None,)),
        bias_init=with_logical_axes(_ZEROS, (None,)),
        name=name,
    )


def last_state(features: jax.Array) -> jax.Array:
    """The last layer's pooled state: float32 ``[B, H]`` of ``[B, L+1, H]``.

    Raises:
      ValueError: ``features`` is not 3-D.
    """
    if features.ndim != 3:
        raise ValueError(
            f"head input must be pooled states [batch, layers, hidden], got {features.shape}."
        )
    return features[:, -1].astype(jnp.float32)


def check_option_names(
    kind: str, module: type[nn.Module], options: Mapping[str, Any], extra: Sequence[str] = ()
) -> None:
    """Checks that every option is a field of the head ``module`` (or one of ``extra``).

    Raises:
      ValueError: one line naming the first unknown option and the ones the head takes.
    """
    allowed = tuple(
        f.name
        for f in dataclasses.fields(module)
        if f.name not in ("num_classes", "parent", "name")
    )
    unknown = sorted(set(options) - set(allowed) - set(extra))
    if unknown:
        takes = ", ".join((*allowed, *extra))
        raise ValueError(f"{kind} head: unknown option {unknown[0]!r} (it takes {takes}).")


def required_input(kind: str, inputs: Mapping[str, jax.Array], name: str) -> jax.Array:
    """``inputs[name]``, which the ``kind`` head reads.

    Raises:
      ValueError: one line, when the inputs do not have it.
    """
    if name not in inputs:
        raise ValueError(f"{kind} head: inputs need {name!r}, got {sorted(inputs)}.")
    return inputs[name]


def init_std(config: Mapping[str, Any]) -> float:
    """The std of fresh head kernels: ``config.json``'s ``initializer_range``, else 0.02."""
    return float(config.get("initializer_range") or DEFAULT_STD)


class HeadTensors:
    """Looks checkpoint tensors up under alternative names (views only, as ``params_from_hf``).

    Args:
      tensors: the checkpoint's tensors by stored name (e.g. ``checkpoint.open_tensors``).
    """

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.tensors = tensors

    def find(self, names: Sequence[str]) -> str | None:
        """The first of ``names`` the checkpoint holds, or None."""
        return next((n for n in names if n in self.tensors), None)

    def get(self, names: Sequence[str], shape: tuple[int | None, ...]) -> np.ndarray | None:
        """The first of ``names`` found (None: any size on that axis), or None if none is.

        Raises:
          ValueError: one line, for a stored tensor of another shape.
        """
        key = self.find(names)
        if key is None:
            return None
        value = self.tensors[key]
        got = tuple(value.shape)
        if len(got) != len(shape) or any(
            s is not None and g != s for g, s in zip(got, shape, strict=True)
        ):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"checkpoint: {key} has shape {got}, expected {want}.")
        return value

    def dense(
        self, names: Sequence[str], n_in: int, n_out: int | None, use_bias: bool = True
    ) -> dict:
        """Flax ``Dense`` leaves (kernel ``[in, out]``) of the stored torch ``Linear``s found."""
        out = {}
        weight = self.get([f"{n}.weight" for n in names], (n_out, n_in))
        if weight is not None:
            out["kernel"] = weight.T  # torch Linear stores [out, in]
            n_out = weight.shape[0]
        if use_bias:
            bias = self.get([f"{n}.bias" for n in names], (n_out,))
            if bias is not None:
                out["bias"] = bias
        return out

    def norm(self, names: Sequence[str], d: int) -> dict:
        """Flax ``LayerNorm`` leaves of the stored ``LayerNorm`` found."""
        out = {}
        for torch_name, leaf in (("weight", "scale"), ("bias", "bias")):
            value = self.get([f"{n}.{torch_name}" for n in names], (d,))
            if value is not None:
                out[leaf] = value
        return out
