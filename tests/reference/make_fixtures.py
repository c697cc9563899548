"""Writes the PyTorch reference fixtures that tests/gaam_jax/test_parity.py compares against.

Run it in the reference venv (PyTorch + the authors' package), never in the project venv::

    make fixtures
    # or: $(bash tests/reference/venv.sh .reference-venv) \
    #         tests/reference/make_fixtures.py tests/fixtures

Two families of fixtures:

* ``package_*.npz``: the authors' ``gaussian_adaptive_attention==0.1.5`` ``GaussianBlock``
  (mixture form), run as released. Keys: ``x``, ``w`` (the weights of the scalar loss
  ``sum(w * block(x))``), ``out``, ``grad_x``, ``sd/<state_dict key>`` and
  ``grad/<state_dict key>``, plus ``config`` (JSON).
* ``paper_*.npz``: the paper form (Algorithm 1 + 3), transcribed into PyTorch from the
  description of the authors' experiment code (``DAAM`` / ``MultiHeadDAAM``, see
  ``docs/design.md`` sections 2 and 4): one-pass population variance, ``|var| + 1e-8``, ``+1e-5``
  inside the square root, ``exp(-z^2 / (2 c))``, heads as contiguous groups of layers. Keys:
  ``x``, ``w``, ``delta``, ``xi`` (``[heads, d]``), ``out``, ``gate``, ``grad_x``,
  ``grad_delta``, ``grad_xi`` and ``config``.

Every output and gradient is also stored computed in float64 under the prefix ``f64/``: the
exact answer that both float32 implementations are measured against, which is how the parity
tolerances are justified.

The scales ``c`` of the package fixtures are drawn as ``±U(0.6, 1.6)`` (both signs, since only
``c**2`` matters) rather than the package's ``N(0, 1)``. A ``c`` near zero makes the gate
``exp(-y^2 / (2 c^2))`` ill-conditioned: with ``c = 0.01`` a float32 rounding of ``y`` moves the
gate by about 1e-3 relative in any float32 implementation, so a comparison there measures the
conditioning of the problem, not the correctness of either code.
"""

from __future__ import annotations

import copy
import json
import pathlib
import sys

import numpy as np
import torch
from gaussian_adaptive_attention import GaussianBlock

PACKAGE_CASES = {
    # The package README example: 3 layers on a (10, 128) tensor, axis 1 (the feature axis).
    "readme": dict(
        shape=(10, 128), norm_axes=[1, 1, 1], num_heads=[4, 4, 4], num_gaussians=[5, 5, 5]
    ),
    # The paper's decoder input: [batch, 24 layers, d], normalised over the layer axis.
    "decoder": dict(shape=(4, 24, 32), norm_axes=[-2], num_heads=[8], num_gaussians=[4]),
    # Uneven split: 10 positions over 3 heads -> 3, 3, 4.
    "uneven": dict(shape=(3, 10, 6), norm_axes=[1], num_heads=[3], num_gaussians=[2]),
    # Rank 4, three different axes, one of them uneven (7 over 3 heads -> 2, 2, 3).
    "rank4": dict(
        shape=(2, 6, 5, 7), norm_axes=[1, -1, 2], num_heads=[2, 3, 1], num_gaussians=[1, 3, 2]
    ),
    # Axis 0 of a 2-D input, uneven (12 over 5 heads -> 2, 2, 2, 2, 4), one Gaussian.
    "axis0": dict(shape=(12, 5), norm_axes=[0], num_heads=[5], num_gaussians=[1]),
}

PAPER_CASES = {
    # DAAMv1 on the paper's decoder input (IEMOCAP/CIFAR layout, scaled down in d).
    "v1": dict(shape=(4, 24, 16), num_heads=8, scale=1.0, shift=0.0),
    # DAAMv2: one head over all layers.
    "v2": dict(shape=(3, 24, 16), num_heads=1, scale=1.0, shift=0.0),
    # AG News layout (40 layers, 5 per head) with larger, shifted values.
    "agnews": dict(shape=(2, 40, 8), num_heads=8, scale=3.0, shift=2.0),
}


def _package_case(name: str, cfg: dict, seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = len(cfg["norm_axes"])
    block = GaussianBlock(cfg["norm_axes"], cfg["num_heads"], cfg["num_gaussians"], n, eps=1e-8)
    with torch.no_grad():
        for pname, p in block.named_parameters():
            if pname.endswith(".c"):
                sign = rng.choice([-1.0, 1.0], size=p.shape)
                p.copy_(torch.from_numpy(sign * rng.uniform(0.6, 1.6, size=p.shape)).float())
            else:
                p.copy_(torch.from_numpy(0.3 * rng.standard_normal(p.shape)).float())
    x = torch.from_numpy(1.5 * rng.standard_normal(cfg["shape"]) + 0.5).float()
    w = torch.from_numpy(rng.standard_normal(cfg["shape"])).float()
    arrays = {"x": x.numpy(), "w": w.numpy(), "config": np.array(json.dumps(cfg))}
    for pname, p in block.named_parameters():
        arrays[f"sd/{pname}"] = p.detach().numpy().copy()
    # The package as released (float32), then the same weights in float64 as the exact answer.
    for tag, dtype in (("", torch.float32), ("f64/", torch.float64)):
        blk = copy.deepcopy(block).to(dtype)
        xt = x.to(dtype).clone().requires_grad_()
        out = blk(xt)
        (out * w.to(dtype)).sum().backward()
        arrays[f"{tag}out"] = out.detach().numpy()
        arrays[f"{tag}grad_x"] = xt.grad.numpy()
        for pname, p in blk.named_parameters():
            arrays[f"{tag}grad/{pname}"] = p.grad.numpy().copy()
    return arrays


def _paper_daam(x: torch.Tensor, delta: torch.Tensor, xi: torch.Tensor, num_heads: int):
    """Paper form in PyTorch: x [B, N, d]; delta, xi [H, d]; heads split N contiguously."""
    outs, gates = [], []
    for h, chunk in enumerate(torch.chunk(x, num_heads, dim=1)):
        mean = chunk.mean(dim=1, keepdim=True)
        var = (chunk**2).mean(dim=1, keepdim=True) - mean**2
        var = var.abs() + 1e-8
        z = (chunk - (mean + delta[h])) / torch.sqrt(var + 1e-5)
        gate = torch.exp(-(z**2) / (2 * xi[h]))
        outs.append(chunk * gate)
        gates.append(gate)
    return torch.cat(outs, dim=1), torch.cat(gates, dim=1)


def _paper_case(name: str, cfg: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, n, d = cfg["shape"]
    h = cfg["num_heads"]
    x = cfg["scale"] * rng.standard_normal((b, n, d)) + cfg["shift"]
    inputs = {
        "x": torch.from_numpy(x).float(),
        "delta": torch.from_numpy(0.1 * rng.standard_normal((h, d))).float(),
        "xi": torch.from_numpy(2.0 + 0.2 * rng.standard_normal((h, d))).float(),
    }
    w = torch.from_numpy(rng.standard_normal((b, n, d))).float()
    arrays = {k: v.numpy() for k, v in inputs.items()}
    arrays.update(w=w.numpy(), config=np.array(json.dumps(cfg)))
    for tag, dtype in (("", torch.float32), ("f64/", torch.float64)):
        args = {k: v.to(dtype).clone().requires_grad_() for k, v in inputs.items()}
        out, gate = _paper_daam(args["x"], args["delta"], args["xi"], h)
        (out * w.to(dtype)).sum().backward()
        arrays[f"{tag}out"] = out.detach().numpy()
        arrays[f"{tag}gate"] = gate.detach().numpy()
        for k, v in args.items():
            arrays[f"{tag}grad_{k}"] = v.grad.numpy()
    return arrays


def main(out_dir: str) -> None:
    """Writes every fixture into ``out_dir``."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, cfg) in enumerate(PACKAGE_CASES.items()):
        np.savez(out / f"package_{name}.npz", **_package_case(name, cfg, seed=100 + i))
    for i, (name, cfg) in enumerate(PAPER_CASES.items()):
        np.savez(out / f"paper_{name}.npz", **_paper_case(name, cfg, seed=200 + i))
    count = len(PACKAGE_CASES) + len(PAPER_CASES)
    print(f"wrote {count} fixtures to {out} (torch {torch.__version__})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
