# Common commands. `make test` and `make demo` set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch (a local wheel on our machines); set TORCH_SPEC="" where torch is already installed.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup test test-fast demo lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/lmms-eval.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/pip install -q -e ".[dev,eval,video-backends]"
	$(BIN)/pip install -q --no-deps "lmms-eval==0.7.3"
	$(BIN)/pip install -q -r requirements/lmms-eval.txt
	touch $@

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	$(BIN)/longvila demo

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: setup
	$(BIN)/ruff format src tests benchmarks scripts
	$(BIN)/ruff check --fix src tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
