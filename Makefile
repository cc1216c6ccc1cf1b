# srum: one-command set-up, run and test. Every target creates .venv (and installs the project) if needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.srum-installed
# The vLLM judge tests need a separate venv with vLLM's CPU packaging; SRUM_SKIP_VLLM=1 skips its set-up
# (the tests marked `vllm` are then skipped with a reason).
SRUM_SKIP_VLLM ?= 0

.PHONY: setup vllm-env test test-all run bench lint clean
# extra dotted overrides for `make run`, e.g. make run ARGS="run.max_steps=20 learner.lambda_c=0.3"
ARGS ?=

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps 'nemo-automodel==0.7.0' 'einops>=0.8'  # Bagel's modelling code (pyproject: bagel extra)
	@touch $(STAMP)

vllm-env:
	@if [ "$(SRUM_SKIP_VLLM)" = "1" ]; then echo "SRUM_SKIP_VLLM=1: not setting up .venv-vllm"; \
	else bash scripts/setup_vllm_env.sh; fi

test: setup vllm-env
	$(BIN)/python -m pytest

test-all: setup vllm-env
	$(BIN)/python -m pytest -m ''

run: setup
	$(BIN)/python -m srum.main --config configs/default.yaml $(ARGS)

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# ruff on every package, then the import-linter contracts (pyproject.toml: layers, no cycles in a package)
lint: setup
	$(BIN)/ruff check core rewards learner actors cluster shapes bagel srum tests bench
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .venv-vllm .pytest_cache
