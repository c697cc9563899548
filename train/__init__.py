"""Training, evaluation, cross-validation, checkpoints and inference for GAAM decoders."""
