"""``flax.nnx`` layers of gaam_jax, over the same functional core as the Linen modules.

Each layer has the parameter names, nesting, shapes, initialisers, logical axes and dtype rules of
its Linen twin, and computes the same program, so parameters move between the two with
:func:`linen_variables` and :func:`load_linen_variables`:

* :class:`GaussianAdaptiveAttention`, :class:`MixtureGaussianAdaptiveAttention`,
  :class:`GaussianBlock`: GAAM, paper and mixture forms; the gate of the latest call is an
  ``nnx.Intermediate`` in ``gate``.
* :class:`GroupedQueryAttention`, :class:`PaperCodeGroupedQueryAttention`, :class:`GQGAAM`.
* :class:`DensityGate`, :class:`DensityResidualGate`: the density gates (:mod:`gaam_jax.density`).
* :class:`GaussianAdaptiveTransformer`: the paper's decoder, the Linen module through
  ``nnx.bridge``.
* :func:`param_shardings`: ``NamedSharding`` s from the parameters' logical axes and
  :data:`gaam_jax.sharding.DEFAULT_RULES`.

Unlike Linen, NNX builds parameters in the constructor, so layers take their input widths
(``num_features``, ``in_features``, ``embed_dim``) and an ``nnx.Rngs``.
"""

from gaam_jax.nnx.attention import (
    GaussianAdaptiveAttention,
    GaussianBlock,
    MixtureGaussianAdaptiveAttention,
)
from gaam_jax.nnx.convert import linen_variables, load_linen_variables
from gaam_jax.nnx.density import DensityGate, DensityResidualGate
from gaam_jax.nnx.gqa import GroupedQueryAttention, PaperCodeGroupedQueryAttention
from gaam_jax.nnx.gqgaam import GQGAAM
from gaam_jax.nnx.sharding import logical_axes, param_shardings
from gaam_jax.nnx.transformer import GaussianAdaptiveTransformer

__all__ = [
    "GQGAAM",
    "DensityGate",
    "DensityResidualGate",
    "GaussianAdaptiveAttention",
    "GaussianAdaptiveTransformer",
    "GaussianBlock",
    "GroupedQueryAttention",
    "MixtureGaussianAdaptiveAttention",
    "PaperCodeGroupedQueryAttention",
    "linen_variables",
    "load_linen_variables",
    "logical_axes",
    "param_shardings",
]
