"""gaam_jax: Gaussian (Density) Adaptive Attention in JAX and Flax (arXiv 2401.11143).

Public API:
  * :mod:`gaam_jax.functional`: the pure-JAX core (paper form and mixture form).
  * :class:`GaussianAdaptiveAttention`: multi-head GAAM, paper form (Linen).
  * :class:`MixtureGaussianAdaptiveAttention`, :class:`GaussianBlock`: the authors' package form.
  * :mod:`gaam_jax.interop`: load weights trained with the authors' PyTorch package.
"""

from gaam_jax import functional, interop
from gaam_jax.gaussian_attention import GaussianAdaptiveAttention
from gaam_jax.mixture import GaussianBlock, MixtureGaussianAdaptiveAttention, lognormal_init

__all__ = [
    "GaussianAdaptiveAttention",
    "GaussianBlock",
    "MixtureGaussianAdaptiveAttention",
    "functional",
    "interop",
    "lognormal_init",
]

__version__ = "0.1.0"
