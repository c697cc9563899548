"""Datasets, frozen encoders, feature extraction and input pipelines for gaam_jax experiments.

Nothing here downloads at run time: the offline datasets read files that ship inside installable
packages, and the paper's datasets (CIFAR-100, AG News, IEMOCAP) use tfds' own builders or a
manual download folder.
"""
