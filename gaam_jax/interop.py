"""Interoperability with the authors' PyTorch package ``gaussian-adaptive-attention``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gaam_jax import _validation as check

__all__ = ["gaussian_block_variables_from_torch"]


def gaussian_block_variables_from_torch(
    state_dict: Mapping[str, Any],
    norm_axes: Sequence[int],
    num_heads: Sequence[int],
    num_gaussians: Sequence[int],
    *,
    prefix: str = "",
) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Converts a package ``GaussianBlock.state_dict()`` into variables for our ``GaussianBlock``.

    The package stores, per layer ``i`` and head ``h``, ``layers.{i}.attention_heads.{h}.
    mean_offsets`` and ``...c``, each of shape ``[num_gaussians]``. Ours stacks the heads:
    ``params/layer_{i}/{mean_offsets,c}`` of shape ``[num_heads, num_gaussians]``. The paper's
    ``DensityBlock`` uses the same names, so its weights convert too (pass e.g.
    ``prefix='daam.'`` for a model that holds the block as ``self.daam``).

    Build the JAX block with the same ``norm_axes``, ``num_heads``, ``num_gaussians`` and
    ``eps=1e-8`` (the package's heads always use 1e-8, whatever eps it was given).

    Args:
      state_dict: names to arrays (numpy arrays, or anything ``np.asarray`` accepts, such as
        detached CPU torch tensors).
      norm_axes: the block's ``norm_axes`` (one per layer; only the count is used).
      num_heads: heads per layer.
      num_gaussians: Gaussians per head, per layer.
      prefix: prefix of the block's keys inside ``state_dict``.

    Returns:
      ``{'params': {'layer_i': {'mean_offsets': f32[H, K], 'c': f32[H, K]}}}`` for
      ``GaussianBlock.apply``.

    Raises:
      ValueError: if the layer lists disagree, a key is missing or unexpected, or an array has
        the wrong shape.
    """
    if not len(norm_axes) == len(num_heads) == len(num_gaussians):
        raise ValueError(
            "norm_axes, num_heads and num_gaussians must have one entry per layer; got lengths "
            f"{len(norm_axes)}, {len(num_heads)} and {len(num_gaussians)}."
        )
    own = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    used = set()
    params: dict[str, dict[str, np.ndarray]] = {}
    for i, (heads, k) in enumerate(zip(num_heads, num_gaussians, strict=True)):
        check.positive_int(heads, f"num_heads[{i}]")
        check.positive_int(k, f"num_gaussians[{i}]")
        layer = {}
        for name in ("mean_offsets", "c"):
            rows = []
            for h in range(heads):
                key = f"{prefix}layers.{i}.attention_heads.{h}.{name}"
                if key not in own:
                    raise ValueError(f"state_dict has no entry {key!r}.")
                value = np.asarray(own[key], dtype=np.float32)
                if value.shape != (k,):
                    raise ValueError(
                        f"state_dict[{key!r}] has shape {value.shape}, expected ({k},)."
                    )
                rows.append(value)
                used.add(key)
            layer[name] = np.stack(rows)
        params[f"layer_{i}"] = layer
    unexpected = sorted(set(own) - used)
    if unexpected:
        raise ValueError(
            f"state_dict has entries that the given layer configuration does not use: "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    return {"params": params}
