# mergeline: `make demo` runs the main job, `make test` the whole suite. Both set up .venv first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python -m flows.demo

bench: setup
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

bench-setup:
	test -x .bench/mergekit-venv/bin/python || $(PYTHON) -m venv .bench/mergekit-venv
	.bench/mergekit-venv/bin/python -m pip install --quiet --upgrade pip
	.bench/mergekit-venv/bin/python -m pip install --quiet -r benchmarks/mergekit-requirements.txt -c benchmarks/mergekit-requirements.txt

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
