# Two commands for a fresh machine with Python 3.11:  make demo  and  make test
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build here; the Dockerfile's gpu target brings a CUDA build.
TORCH ?= torch==2.13.0+cpu

.PHONY: install demo test lint format bench render clean

$(BIN)/sitsflow: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[test,lint]"
	touch $@

install: $(BIN)/sitsflow

demo: install  ## run the Slovenia example end to end (outputs in examples/slovenia/output)
	$(BIN)/sitsflow run examples/slovenia/config.cfg
	@cat examples/slovenia/output/final/RESULTS.txt

test: install  ## the whole test suite
	$(BIN)/python -m pytest -n 2 -q

lint: install  ## ruff (pyflakes, pycodestyle, import order, bugbear, pyupgrade) and mypy; settings in pyproject.toml
	$(BIN)/ruff check services workflows
	$(BIN)/mypy

format: install  ## ruff's formatter over the code (width and style in pyproject.toml)
	$(BIN)/ruff format services workflows
	$(BIN)/ruff check --fix --select I services workflows

render: install  ## re-render the WorkflowTemplate YAML from its Hera definition
	$(BIN)/python workflows/pipeline.py

clean:
	rm -rf examples/slovenia/output
