"""Parameter counts of a model, with and without its classifier, without allocating it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays (or of ``jax.ShapeDtypeStruct``)."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(tree))


def decoder_param_counts(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    classifier: str = "classifier",
    attention: str = "attention",
) -> dict[str, int]:
    """Counts the trainable parameters of a decoder from abstract shapes (``jax.eval_shape``).

    Only the ``params`` collection counts (BatchNorm running statistics are not parameters, as
    in PyTorch's ``parameters()``). Nothing is allocated, so the 106 M-parameter AG News MHA
    decoder costs nothing to count.

    Args:
      model: a Linen module whose ``init(key, x)`` builds its parameters.
      input_shape: the input shape, e.g. ``(1, 24, 1024)``.
      classifier: name of the top-level classifier submodule.
      attention: name of the top-level attention submodule.

    Returns:
      ``{'total', 'without_classifier', 'attention'}``. The paper mostly reports the count
      without the classifier; the authors' code comments mix both (docs/design.md section 6).
    """
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    params: Mapping[str, Any] = variables["params"]
    total = count_params(params)
    head = count_params(params.get(classifier, {}))
    return {
        "total": total,
        "without_classifier": total - head,
        "attention": count_params(params.get(attention, {})),
    }
