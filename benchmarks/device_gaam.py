"""GAAM on an accelerator: against the authors' package on CUDA, and against the memory roofline.

Part of ``benchmarks/device.sh``. Two tables:

1. The package's ``MultiHeadGaussianAdaptiveAttention`` (PyTorch, on the GPU when there is one)
   against ``gaam_jax``'s mixture layer (same heads and Gaussians), forward and
   forward+backward, timed alternately in this process; medians and ratios.
2. The paper-form GAAM forward (``gaam_jax.functional.gaussian_adaptive_attention``) at
   ``[8, 8192, 512]`` and ``[32, 24, 1024]``: bytes moved (input read once, output written
   once) per second, as a fraction of this card's measured device-to-device copy bandwidth.

Usage: ``python -m benchmarks.device_gaam [--quick]``.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.run import compare, machine, ms, ratio, table
from gaam_jax import MixtureGaussianAdaptiveAttention
from gaam_jax import functional as F

try:  # the peer is optional: without it the PyTorch columns read n/a
    import torch
    from gaussian_adaptive_attention import MultiHeadGaussianAdaptiveAttention as TorchMulti
except ImportError:  # pragma: no cover - exercised where torch is absent
    torch = None


def _torch_case(shape, axis, heads, gaussians):
    if torch is None:
        return None, None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = TorchMulti(axis, heads, gaussians).to(device)
    x = torch.randn(*shape, device=device, requires_grad=True)
    w = torch.randn(*shape, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def fwd():
        with torch.no_grad():
            out = layer(x)
        sync()
        return out

    def fwd_bwd():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        (layer(x) * w).sum().backward()
        sync()
        return x.grad

    return (lambda: (), fwd), (lambda: (), fwd_bwd)


def _jax_case(shape, axis, heads, gaussians):
    module = MixtureGaussianAdaptiveAttention(num_heads=heads, num_gaussians=gaussians, axis=axis)
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), shape)
    params = module.init(jax.random.key(2), x)
    fwd = jax.jit(module.apply)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply(p, x) * w), argnums=(0, 1)))
    return (lambda: (params, x), fwd), (lambda: (params, x), grad)


def package_table(quick: bool) -> str:
    """Forward and forward+backward against the authors' package."""
    cases = [((32, 24, 1024), 1, 8, 4), ((8, 8192, 512), 1, 8, 4)]
    if quick:
        cases = [((4, 16, 32), 1, 4, 2)]
    rows = []
    for shape, axis, heads, gaussians in cases:
        j_fwd, j_bwd = _jax_case(shape, axis, heads, gaussians)
        t_fwd, t_bwd = _torch_case(shape, axis, heads, gaussians)
        fwd_c, bwd_c = {"jax": j_fwd}, {"jax": j_bwd}
        if t_fwd is not None:
            fwd_c["package"], bwd_c["package"] = t_fwd, t_bwd
        repeats = 3 if quick else 20
        f, b = compare(fwd_c, repeats), compare(bwd_c, repeats)
        rows.append([
            "x".join(map(str, shape)), f"{heads}x{gaussians}",
            ms(f.get("package")), ms(f["jax"]), ratio(f.get("package"), f["jax"]),
            ms(b.get("package")), ms(b["jax"]), ratio(b.get("package"), b["jax"]),
        ])  # fmt: skip
    header = ["shape", "heads x K", "package fwd ms", "jax fwd ms", "speed-up",
              "package fwd+bwd ms", "jax fwd+bwd ms", "speed-up"]  # fmt: skip
    return table(header, rows)


def copy_bandwidth(nbytes: int) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0)
    t = compare({"copy": (lambda: (x,), copy)}, 10)["copy"]
    return 2 * nbytes / t


def bandwidth_table(quick: bool) -> str:
    """The paper-form forward's achieved bandwidth against the card's copy bandwidth."""
    shapes = [(8, 8192, 512), (32, 24, 1024)] if not quick else [(2, 64, 32)]
    peak = copy_bandwidth(1 << 28 if not quick else 1 << 20)
    rows = []
    fwd = jax.jit(lambda x, dl, xi: F.gaussian_adaptive_attention(x, dl, xi, axis=1))
    for shape in shapes:
        heads, d = 8, shape[-1]
        args = (jax.random.normal(jax.random.key(0), shape), jnp.zeros((heads, d)),
                jnp.full((heads, d), 2.0))  # fmt: skip
        t = compare({"gaam": (lambda args=args: args, fwd)}, 3 if quick else 20)["gaam"]
        moved = 2 * args[0].size * 4  # read x, write y (float32)
        rows.append(["x".join(map(str, shape)), ms(t), f"{moved / t / 1e9:.0f}",
                     f"{peak / 1e9:.0f}", f"{moved / t / peak:.2f}"])  # fmt: skip
    header = ["shape", "fwd ms", "GB/s", "copy GB/s (this card)", "fraction"]
    return table(header, rows)


def main(argv: list[str] | None = None) -> int:
    """Prints both tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args(argv)
    print(f"Machine: {machine()}; devices {jax.devices()}")
    if torch is not None:
        print(f"PyTorch device: {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print("\nGAAM mixture layer vs the authors' package (medians, alternated):\n")
    print(package_table(args.quick))
    print("\nPaper-form GAAM forward vs this card's copy bandwidth:\n")
    print(bandwidth_table(args.quick))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
