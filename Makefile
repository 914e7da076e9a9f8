# Two commands on a fresh machine: `make demo` and `make test`. Everything else is installed here.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel that lies on this machine's disk; users with GPUs override, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PEERS := $(VENV)/.peers
CONSTRAINTS := $(VENV)/constraints.txt

.PHONY: demo credit test test-browser bench peers fmnist lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	echo "$(TORCH_SPEC)" | tr ' ' '\n' | grep '^torch' > $(CONSTRAINTS)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[test,transformers,report,lora]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/datacredit demo

# Credit by data source: five generated outputs paid to the documents of the bundled public-domain text (about a minute).
credit: $(STAMP)
	$(BIN)/datacredit attribute --train examples/credit/train.jsonl --outputs examples/credit/outputs.jsonl \
		--out runs/credit

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The report in a real browser: Debian's chromium (root and the Debian registry needed), then the browser test.
test-browser: $(STAMP)
	command -v chromium >/dev/null 2>&1 || (apt-get update && apt-get install -y --no-install-recommends chromium)
	$(BIN)/python -m pytest -q -rs tests/test_report_browser.py

# Peers for side-by-side benchmarks, kept on our CPU torch: kronfluence's metadata asks for torchvision (which would
# pull another torch), so dattri and kronfluence go in with --no-deps plus their runtime deps, under the torch pin.
# dattri-llm needs only torch and tqdm (and transformers, here already). bergson pulls torchvision and torchaudio,
# whose builds break its import on our torch; it never imports them, so they are removed again.
$(PEERS): $(STAMP)
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) --no-deps dattri kronfluence dattri-llm
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) traker accelerate einops einconv opt-einsum safetensors pyyaml tqdm
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) bergson
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio
	touch $(PEERS)

peers: $(PEERS)

# Debian's Fashion-MNIST (IDX files under /usr/share/datasets/fashion-mnist) for the fmnist benchmark cases.
fmnist:
	test -d /usr/share/datasets/fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist)

# Slow checks and benchmarks: side-by-side ratios, tables in benchmarks/*.md. The benchmark package (benchmarks/bench)
# is not in the wheel: the scripts, the tests and `datacredit bench` import it from this checkout.
bench: $(PEERS) fmnist
	$(BIN)/python benchmarks/capture.py
	$(BIN)/python benchmarks/inrun_overhead.py
	$(BIN)/python benchmarks/inrun_quality.py
	$(BIN)/python benchmarks/lds.py
	$(BIN)/python benchmarks/ensembles.py
	$(BIN)/python benchmarks/source_credit.py --case digits-classes --seeds 10 --halves 40 \
		--out runs/source-credit-s10 --results benchmarks/results/source-credit-digits-classes.json
	$(BIN)/python benchmarks/source_credit.py --case text-documents
	$(BIN)/python benchmarks/source_credit.py --case text-styles --seeds 12 --seed-offset 100 --halves 24 \
		--halves-seed 2 --model-seeds 5 --methods inrun-1,grad-dot,influence-ekfac,trak,tracin,source \
		--out runs/source-credit-styles-prereg --results benchmarks/results/source-credit-text-styles-prereg.json
	$(BIN)/python benchmarks/inrun_demo_overhead.py
	$(BIN)/python benchmarks/gradstore_methods.py --out benchmarks/results/gradstore_methods.json
	$(BIN)/python benchmarks/gradstore_scale.py --n-train 1000 10000 --queries 1000 --threads 1
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check datacredit tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache
