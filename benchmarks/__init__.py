"""Benchmarks of gaam_jax against its PyTorch peers (run: python -m benchmarks.run)."""
