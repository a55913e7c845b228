# Common commands. `make test` and `make demo` set up .venv on first use, from the lock.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch (a local wheel on our machines). Elsewhere: TORCH_SPEC="torch==2.11.0", or
# TORCH_SPEC="" where torch is already installed (see docs/install.md).
TORCH_SPEC ?= torch==2.13.0
# The lock: exact versions of every other package, direct and transitive (refresh with `make lock`).
# LOCK="" installs from pyproject.toml's ranges instead (a machine the lock was not made for).
LOCK ?= requirements/constraints.txt
# Every extra of pyproject.toml: the tests cover all of them (tests/unit/test_lock.py checks this list).
EXTRAS ?= dev,eval,video-backends
# pytest-xdist workers for `make test`: one per file group (`--dist loadfile` keeps a file's module fixtures,
# e.g. the trained demo model, in one worker). Each distributed test spawns up to 4 processes per worker.
TEST_WORKERS ?= 2
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q $(if $(LOCK),-c $(LOCK))

.PHONY: setup lock test test-fast test-gpu demo lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/constraints.txt requirements/lmms-eval.txt requirements/no-deps.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) pip setuptools
	if [ -n "$(TORCH_SPEC)" ]; then $(PIP) "$(TORCH_SPEC)"; fi
	$(PIP) --no-build-isolation -e ".[$(EXTRAS)]"
	$(PIP) --no-deps -r requirements/no-deps.txt
	$(PIP) -r requirements/lmms-eval.txt
	touch $@

# Resolve everything afresh in a throwaway venv (holds from requirements/holds.txt) and rewrite the lock.
lock:
	$(PYTHON) scripts/lock.py --torch "$(TORCH_SPEC)" --extras "$(EXTRAS)"

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# The CUDA suite (skips without a GPU): run on a GPU machine, e.g. `make test-gpu TORCH_SPEC="" LOCK=""`.
test-gpu: setup
	$(BIN)/python -m pytest -q tests/gpu

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
