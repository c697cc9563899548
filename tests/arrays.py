"""Test inputs drawn with numpy, and compiled initialisation: helpers shared by the test files.

Eager ``jax.random`` compiles a program for every new shape (~0.4 s each on CPU, more than most
of the tests it feeds), so test data comes from numpy's generator instead: the same kind of
random inputs, at no compilation cost. Parameters still come from the modules' own initialisers
(``jax.random`` under ``init``), compiled as one program by :func:`init`.
"""

import os

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


# Initialisation programs are mostly threefry draws, which XLA's CPU backend is slow to compile
# (~0.3 s a draw): without LLVM optimisation and with the classic emitters (where XLA still has
# them: tests/conftest.py asks) they compile 2-3x faster. Only where parameters are drawn; what
# the tests check runs under conftest's flags.
_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
if os.environ.get("GAAM_TEST_HAS_XLA_CPU_USE_FUSION_EMITTERS") == "1":
    _INIT_COMPILER_OPTIONS["xla_cpu_use_fusion_emitters"] = False


def init(module, seed, *args, **kwargs):
    """``module.init(jax.random.key(seed), *args, **kwargs)`` compiled: one program instead of
    one per initialiser (each a threefry draw of its own shape when run eagerly)."""
    compiled = jax.jit(module.init, compiler_options=_INIT_COMPILER_OPTIONS)
    return compiled(jax.random.key(seed), *args, **kwargs)


def random_params(module, seed, *args, scale=0.2):
    """Parameters of ``module`` (the tree and shapes ``init`` gives, no initialiser run), each
    drawn from ``scale * N(0, 1)``: for checks that hold for any parameters, where random biases
    and norm scales also exercise what zero or one initial values would not."""
    abstract = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray((scale * rng.standard_normal(a.shape)).astype(a.dtype)), abstract
    )
