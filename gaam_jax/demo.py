"""A short, real demonstration of the library: ``python -m gaam_jax.demo`` (``make demo``).

It builds the paper's multi-head GAAM on a decoder-sized input, times the jitted forward and
backward passes, runs the authors' package example (``GaussianBlock`` on a 10 x 128 tensor), and
recovers known Gaussian parameters by gradient descent from the gate alone.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from gaam_jax import GaussianAdaptiveAttention, GaussianBlock


def _median_ms(fn, *args, repeats: int = 20) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    """Runs the three demonstrations and prints what they show."""
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")

    # 1. The paper's decoder input: 24 encoder layers x 1024 features, batch 32, 8 heads.
    x = jax.random.normal(jax.random.key(0), (32, 24, 1024))
    layer = GaussianAdaptiveAttention(num_heads=8)
    variables = layer.init(jax.random.key(1), x)
    n_params = sum(p.size for p in jax.tree.leaves(variables))
    forward = jax.jit(layer.apply)
    grad = jax.jit(jax.grad(lambda v, x: jnp.sum(layer.apply(v, x) ** 2)))
    y, state = layer.apply(variables, x, mutable=["intermediates"])
    (gate,) = state["intermediates"]["gate"]
    print("\n[1] GaussianAdaptiveAttention(num_heads=8) on [32, 24, 1024]")
    print(f"    parameters: {n_params:,} (paper: 2 * H * d = {2 * 8 * 1024:,})")
    print(f"    gate range: [{float(gate.min()):.3f}, {float(gate.max()):.3f}], output {y.shape}")
    print(f"    jitted forward {_median_ms(forward, variables, x):.2f} ms, ", end="")
    print(f"forward+backward {_median_ms(grad, variables, x):.2f} ms (median of 20)")

    # 2. The authors' package README example.
    x2 = jax.random.normal(jax.random.key(2), (10, 128))
    block = GaussianBlock(norm_axes=(1, 1, 1), num_heads=(4, 4, 4), num_gaussians=(5, 5, 5))
    vb = block.init(jax.random.key(3), x2)
    y2, gates = block.apply(vb, x2, return_gates=True)
    sums = jnp.sum(gates["layer_0"][:, :32], axis=1)  # the first head's gate sums to 1
    print("\n[2] GaussianBlock(norm_axes=(1,1,1), num_heads=(4,4,4), num_gaussians=(5,5,5))")
    lo, hi = float(sums.min()), float(sums.max())
    print(f"    output {y2.shape}; head-0 gate sums to {lo:.4f}..{hi:.4f}")

    # 3. Recover delta and xi from gates produced with known values (plain gradient descent).
    small = GaussianAdaptiveAttention(num_heads=2)
    xs = jax.random.normal(jax.random.key(4), (64, 8, 4))
    true = {"delta": jnp.array([[0.3, -0.2, 0.0, 0.1]] * 2), "xi": jnp.full((2, 4), 1.0)}
    _, target = small.apply({"params": true}, xs, return_gate=True)
    params = small.init(jax.random.key(5), xs)["params"]  # delta = 0, xi = 2

    @jax.jit
    def step(params):
        def loss(p):
            return jnp.mean((small.apply({"params": p}, xs, return_gate=True)[1] - target) ** 2)

        value, g = jax.value_and_grad(loss)(params)
        return jax.tree.map(lambda p, g: p - 3.0 * g, params, g), value

    print("\n[3] Fitting delta, xi to gates made with delta=(0.3,-0.2,0,0.1), xi=1")
    for i in range(1001):
        params, value = step(params)
        if i % 250 == 0:
            print(f"    step {i:3d}: gate MSE {float(value):.2e}")
    fmt = lambda v: "(" + ", ".join(f"{float(a):.3f}" for a in v) + ")"  # noqa: E731
    print(f"    learned delta[0] = {fmt(params['delta'][0])}, xi[0] = {fmt(params['xi'][0])}")


if __name__ == "__main__":
    main()
