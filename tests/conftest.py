"""Test configuration: 8 fake CPU devices (set before jax is imported) and strict numerics."""

import os

# Sharding tests need several devices; XLA reads this flag once, when jax is first imported.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402

# Implicit rank promotion hides broadcasting bugs in mask and statistics code: make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """One tfds data folder per test session, so offline datasets are built once per worker."""
    return tmp_path_factory.mktemp("tfds")


def pytest_collection_modifyitems(config, items):
    """Runs the tests marked slow first, so pytest-xdist packs the short ones around them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
