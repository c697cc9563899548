"""Experiment configs: one ml_collections file with get_config() per experiment."""
