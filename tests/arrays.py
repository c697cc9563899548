"""Test inputs drawn with numpy, and compiled initialisation: helpers shared by the test files.

Eager ``jax.random`` compiles a program for every new shape (~0.4 s each on CPU, more than most
of the tests it feeds), so test data comes from numpy's generator instead: the same kind of
random inputs, at no compilation cost. Parameters still come from the modules' own initialisers
(``jax.random`` under ``init``), compiled as one program by :func:`init`.
"""

import jax
import jax.numpy as jnp
import numpy as np


def normal(shape, seed=0, scale=1.0, shift=0.0, dtype=np.float32):
    """``scale * N(0, 1) + shift`` of ``shape`` as a jax array (float32 unless ``dtype``)."""
    x = np.random.default_rng(seed).standard_normal(shape)
    return jnp.asarray((scale * x + shift).astype(dtype))


def uniform(shape, seed=0):
    """U[0, 1) of ``shape`` as a float32 jax array."""
    return jnp.asarray(np.random.default_rng(seed).random(shape).astype(np.float32))


def bernoulli(shape, seed=0, p=0.5):
    """Booleans of ``shape``, each True with probability ``p``."""
    return jnp.asarray(np.random.default_rng(seed).random(shape) < p)


def init(module, seed, *args, **kwargs):
    """``module.init(jax.random.key(seed), *args, **kwargs)`` compiled: one program instead of
    one per initialiser (each a threefry draw of its own shape when run eagerly)."""
    return jax.jit(module.init)(jax.random.key(seed), *args, **kwargs)
