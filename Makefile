# Two commands on a fresh machine: `make demo` and `make test`. Everything else is installed here.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel that lies on this machine's disk; users with GPUs override, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	echo "$(TORCH_SPEC)" | tr ' ' '\n' | grep '^torch' > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[test,transformers,report]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/datacredit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check datacredit tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/capture.py

clean:
	rm -rf $(VENV) .pytest_cache
