"""gaam_jax: Gaussian (Density) Adaptive Attention in JAX and Flax (arXiv 2401.11143).

Public API:
  * :mod:`gaam_jax.functional`: the pure-JAX core (paper form and mixture form).
  * :class:`GaussianAdaptiveAttention`: multi-head GAAM, paper form (Linen).
  * :class:`MixtureGaussianAdaptiveAttention`, :class:`GaussianBlock`: the authors' package form.
  * :class:`DensityGate`, :class:`DensityResidualGate`: the authors' newest form (a mean of
    normalised Gaussians, in a residual gate).
  * :class:`GroupedQueryAttention`, :class:`PaperCodeGroupedQueryAttention`, :class:`GQGAAM`.
  * :class:`GaussianAdaptiveTransformer`: the paper's decoder on frozen encoder features.
  * :mod:`gaam_jax.importance`: the Importance Factor.
  * :func:`decoder_param_counts`, :func:`count_params`: parameter counts.
  * :mod:`gaam_jax.interop`: load weights trained with the authors' PyTorch package.
  * :data:`COMPUTE_DTYPES`: the compute dtypes by the names configs use.

Subpackages imported on their own: :mod:`gaam_jax.nnx` (the same layers in ``flax.nnx``),
:mod:`gaam_jax.adapters` (LoRA and DAAM adapters for any Flax model), :mod:`gaam_jax.encoders`.
"""

from gaam_jax import functional, importance, interop
from gaam_jax._validation import COMPUTE_DTYPES
from gaam_jax.density import DensityGate, DensityResidualGate
from gaam_jax.gaussian_attention import GaussianAdaptiveAttention
from gaam_jax.gqa import GroupedQueryAttention, PaperCodeGroupedQueryAttention
from gaam_jax.gqgaam import GQGAAM
from gaam_jax.mixture import GaussianBlock, MixtureGaussianAdaptiveAttention, lognormal_init
from gaam_jax.param_count import count_params, decoder_param_counts
from gaam_jax.transformer import GaussianAdaptiveTransformer

__all__ = [
    "COMPUTE_DTYPES",
    "GQGAAM",
    "DensityGate",
    "DensityResidualGate",
    "GaussianAdaptiveAttention",
    "GaussianAdaptiveTransformer",
    "GaussianBlock",
    "GroupedQueryAttention",
    "MixtureGaussianAdaptiveAttention",
    "PaperCodeGroupedQueryAttention",
    "count_params",
    "decoder_param_counts",
    "functional",
    "importance",
    "interop",
    "lognormal_init",
]

__version__ = "0.1.0"
