"""Frozen pretrained encoders whose per-layer hidden states become GAAM decoder inputs."""
