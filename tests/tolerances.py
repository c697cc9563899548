"""Tolerances used across the tests, each with the reason for its size.

Errors are measured relative to the largest magnitude of the reference array (``scaled_atol``),
because elementwise relative error is meaningless where a value crosses zero.
"""

import numpy as np

# float32 has a unit roundoff of 6e-8; GAAM is ~20 float32 operations deep (mean, variance,
# rsqrt, exp, product), so outputs and input gradients agree with an exact answer to ~1e-6 of
# their scale. 1e-5 leaves a 10x margin.
F32 = 1e-5
# Two float32 implementations may each be F32 away from the exact answer, in opposite
# directions. Measured on the fixtures: the authors' float32 package is up to 1.1e-5 of scale
# away from its own float64 run.
F32_PAIR = 3e-5
# Gradients with respect to the parameters are sums over every element of the input, with
# cancellation between positive and negative terms. Measured here: the authors' own float32
# package differs from its float64 run by up to 6e-5 of the gradient's scale, so comparing two
# float32 implementations needs about twice that.
F32_PARAM_GRAD = 2e-4
# bfloat16 keeps 8 bits of mantissa: one rounding of the input and one of the output give up to
# 2 * 2^-8 ~ 8e-3 relative error.
BF16 = 1.6e-2


def scaled_atol(reference, scale: float) -> float:
    """Absolute tolerance ``scale * max|reference|``."""
    return scale * float(np.max(np.abs(np.asarray(reference, dtype=np.float64))))
