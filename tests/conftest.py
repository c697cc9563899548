"""Test configuration: 8 fake CPU devices (set before jax is imported) and strict numerics."""

import os

# Sharding tests need several devices; XLA reads this flag once, when jax is first imported.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()


def _xla_has_option(name, value):
    """Whether this XLA has the debug option ``name``. Options come and go between releases and
    an unknown one in XLA_FLAGS aborts the process, so a subprocess tries it (as a flag and as a
    compile option), once per test session: the answer is kept in the environment for the xdist
    workers and the subprocesses the tests start."""
    key = f"GAAM_TEST_HAS_{name.upper()}"
    if key not in os.environ:
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
        env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--{name}={str(value).lower()}"}
        probe = f"import jax; jax.jit(lambda x: x).lower(1.0).compile({{{name!r}: {value!r}}})"
        found = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True)
        os.environ[key] = "1" if found.returncode == 0 else "0"
    return os.environ[key] == "1"


# Tests are dominated by compiling many small programs, not by running them, so they compile
# without LLVM optimisation (-O0) and, where XLA still has them (jaxlib 0.10; gone by 0.12), with
# XLA:CPU's classic loop emitters instead of the MLIR fusion emitters: the toy training program
# compiles in 2.4 s instead of 9.3 s at -O1 (11 s at the default -O3) and runs 4x slower (4 ms a
# step), and the suite on 2 cores drops by about a third. XLA's graph passes are the same and
# floating point is not relaxed (no fast-math): code generation differs only in rounding and the
# order of a few float sums. Checked: every test passes with its stated tolerances under these
# flags as under -O1 and -O3; tests that compare two results bit for bit compile both sides under
# the same flags (subprocesses inherit them), and tests about what users' default compile gives
# (tests/train/test_train.py's -O1 init) pass their options explicitly. A flag already in
# XLA_FLAGS is left as it is. tests/arrays.py and tests/test_notebook.py read ``GAAM_TEST_HAS_*``
# too.
_TEST_FLAGS = {"xla_backend_optimization_level": "0"}
if _xla_has_option("xla_cpu_use_fusion_emitters", False):
    _TEST_FLAGS["xla_cpu_use_fusion_emitters"] = "false"
for _flag, _value in _TEST_FLAGS.items():
    if f"--{_flag}" not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += f" --{_flag}={_value}"

# One XLA compilation cache per test session, shared by the xdist workers and every subprocess
# the tests start (the CLI runs, the notebook's kernel, reproduce's workers): the same small
# programs are compiled by many tests, and a cache hit skips XLA. Results are unchanged.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gaam-jax-test-xla-")
    os.environ["GAAM_TEST_OWNS_XLA_CACHE"] = "1"
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

# Implicit rank promotion hides broadcasting bugs in mask and statistics code: make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402

# train.steps compiles the initial states with compiler options of its own (-O1 on CPU, bit
# identical to the default -O3), which override the flags above: 1.5 s a program, ~40 programs
# in the suite. In the test processes they compile under the test flags (0.3 s; values differ
# from -O1's in rounding, the same in every test process); the command-line runs the tests start
# keep the library's options, and test_train.py checks those (fixture ``library_init_options``).
_LIBRARY_INIT_OPTIONS: dict = {}


@pytest.fixture(scope="session", autouse=True)
def _init_states_under_the_test_flags():
    from train import steps

    _LIBRARY_INIT_OPTIONS.update(steps.INIT_COMPILER_OPTIONS)
    steps.INIT_COMPILER_OPTIONS = {}
    yield
    steps.INIT_COMPILER_OPTIONS = dict(_LIBRARY_INIT_OPTIONS)


@pytest.fixture
def library_init_options(monkeypatch):
    """train.steps' own initial-state compiler options, restored for one test."""
    from train import steps

    monkeypatch.setattr(steps, "INIT_COMPILER_OPTIONS", dict(_LIBRARY_INIT_OPTIONS))
    return steps.INIT_COMPILER_OPTIONS


@pytest.fixture(scope="session")
def gcs():
    """A local GCS emulator with an empty bucket (:mod:`gcs_emulator`), this process's clients
    pointed at it; yields ``{'url': ..., 'env': ...}`` (``env`` for subprocesses)."""
    import gcs_emulator

    with gcs_emulator.start() as found:
        yield found


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """One tfds data folder per test session, so offline datasets are built once per worker."""
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture
def mocked_sources(monkeypatch):
    """tfds' ag_news_subset and cifar100 builders on mock examples (read once, kept in memory).

    ``mock_data`` also turns every other builder's ``download_and_prepare`` into a no-op, so
    only the reading of the source happens inside it; the features are built for real.
    """
    import tensorflow_datasets as tfds

    from data.datasets import registry

    real = registry.load_examples

    def load(name, data_dir, split="train", **kwargs):
        with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
            records, info = real(name, data_dir, split, **kwargs)
            return [records[i] for i in range(len(records))], info

    monkeypatch.setattr(registry, "load_examples", load)


def pytest_addoption(parser):
    parser.addoption(
        "--one-case",
        action="store_true",
        help="run each test function once, with its first parameters (make test-fast)",
    )


def pytest_collection_modifyitems(config, items):
    """Runs the tests marked slow first, so pytest-xdist packs the short ones around them.

    With ``--one-case``, every test function runs with its first parameters only: the edit
    loop's quick check that nothing is broken, while ``make test`` runs every case.
    """
    if config.getoption("--one-case"):
        seen, keep, drop = set(), [], []
        for item in items:
            key = (item.nodeid.split("::")[0], getattr(item, "originalname", item.name))
            (drop if key in seen else keep).append(item)
            seen.add(key)
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session, exitstatus):
    """The session's compilation cache goes with it (in the process that made it)."""
    if os.environ.get("GAAM_TEST_OWNS_XLA_CACHE") and not hasattr(session.config, "workerinput"):
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The training tests' learnable 2-class features ``[80, 4, 16]``, built once per worker."""
    from train_helpers import toy_features

    return toy_features(tmp_path_factory.mktemp("toy"))
