# srum: one-command set-up, run and test. Every target creates .venv (and installs the project) if needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.srum-installed
# The vLLM judge tests need a separate venv with vLLM's CPU packaging; SRUM_SKIP_VLLM=1 skips its set-up
# (the tests marked `vllm` are then skipped with a reason).
SRUM_SKIP_VLLM ?= 0

.PHONY: setup vllm-env test test-all run bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

vllm-env:
	@if [ "$(SRUM_SKIP_VLLM)" = "1" ]; then echo "SRUM_SKIP_VLLM=1: not setting up .venv-vllm"; \
	else bash scripts/setup_vllm_env.sh; fi

test: setup vllm-env
	$(BIN)/python -m pytest

test-all: setup vllm-env
	$(BIN)/python -m pytest -m ''

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

lint: setup
	$(BIN)/ruff check actors learner rewards cluster tests bench

clean:
	rm -rf $(VENV) .venv-vllm .pytest_cache
