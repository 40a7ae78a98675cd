# The README's commands. `make run` and `make test` each install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build is enough for the demo and the tests; on a GPU box pick the CUDA build you need.
TORCH_SPEC ?= torch==2.13.0
# The suite runs in two processes (pytest-xdist; every test has its own database, queue names,
# data dir and ports; the outage tests stop private servers), a file at a time: 17.5 min against
# 20.5 in one process on CI's 2 cores (2026-12-07). A test at a time (--dist=loadgroup), or the
# longest files first, was slower: two trainings at once slow each other more than they gain.
# `make test PARALLEL=` runs it in one.
PARALLEL ?= --numprocesses=2 --dist=loadfile
# Installs skip compiling every package's .pyc up front (torch, transformers, mlflow: ~3 of the
# 4 minutes an install took, 2026-12-07); Python compiles what it imports, once: the suite keeps
# those files under /tmp even where PYTHONDONTWRITEBYTECODE is set, as on CI's machine
# (tests/conftest.py; without them every process it started compiled torch and transformers
# again: the suite took 28.7 min, 17.2 with them, 2026-12-07).
PIP_INSTALL := $(BIN)/pip install --quiet --no-compile

.PHONY: install run test test-fast typecheck lint clean constraints

$(BIN)/finetune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(PIP_INSTALL) "$(TORCH_SPEC)"
	$(PIP_INSTALL) -e ".[train,dev]"
	touch $@

install: $(BIN)/finetune

examples/tiny-phi2/model.safetensors: | $(BIN)/finetune
	$(BIN)/finetune demo-model

## run: install, then start the API and one worker on this machine (SQLite, no Redis needed)
run: install examples/tiny-phi2/model.safetensors
	$(BIN)/finetune dev

## test: install, then run the linter, the type checker and the whole test suite
test: install examples/tiny-phi2/model.safetensors
	$(BIN)/ruff check app worker tests
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PARALLEL)

## typecheck: mypy with the pydantic plugin (`make test` runs it too)
typecheck: install
	$(BIN)/mypy

## test-fast: the quick loop while changing code (under a minute): no service processes (e2e), no
## model runs or long searches (slow), SQLite only. `make test` runs everything.
test-fast: install examples/tiny-phi2/model.safetensors
	$(BIN)/ruff check app worker tests
	env -u FINETUNE_TEST_POSTGRES_URL -u FINETUNE_TEST_REDIS_URL $(BIN)/python -m pytest -q -m "not e2e and not slow" --durations=5

## constraints: pin the Docker image's packages to what this venv (CI's) has
constraints: install
	{ echo "# Versions the Docker image installs (the ones CI tested). Regenerate: make constraints"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -i -E '^(torch|nvidia-|triton|ruff|schemathesis|selenium|hadolint|check-jsonschema|pytest|hypothesis)'; \
	} > constraints.txt

clean:
	rm -rf $(VENV) finetune-data examples/tiny-phi2/model.safetensors
