# difftune: `make demo` and `make test` are all a new machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ASSETS := work_dirs/tiny_assets
DEMO := work_dirs/demo
export HF_HUB_OFFLINE := 1

.PHONY: venv assets demo test test-fast lint clean bench-real mutation-check mutation-auto

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	# Only for the CLIP vocabulary file it ships (tiny assets); its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps open-clip-torch==3.3.0
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

assets: $(ASSETS)/.done

$(ASSETS)/.done: $(VENV)/.installed scripts/make_tiny_assets.py $(wildcard scripts/tiny_assets/*.py)
	$(BIN)/python scripts/make_tiny_assets.py $(ASSETS)
	touch $@

demo: venv assets
	bash scripts/demo.sh $(ASSETS) $(DEMO)

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf work_dirs .pytest_cache

# Real-size SDXL: floor vs peft LoKr vs factored LoKr (minutes, ~20 GB; parts: ARGS="--only layers");
# Stable Cascade stage C: ARGS="--only cascade" (3.6 B and lite, ~20 GB) or ARGS="--only cascade-lite".
bench-real: venv
	PYTHONPATH=src $(BIN)/python benchmarks/bench_real_size.py $(ARGS)

# Realistic one-line bugs, each in a temporary copy, against the tests that should catch them (tens of minutes;
# not part of `make test`). Some only: ARGS="--only export"; snippets still found after a merge: ARGS="--check".
mutation-check: venv
	$(BIN)/python tools/mutation_check.py $(ARGS)

# mutmut over whole modules, each against the fast tests that coverage says run it, one worker (minutes per
# module; not part of `make test`); survivors and their diffs in work_dirs/mutation/report.md. Dev tools from
# requirements-dev.txt, installed for this target only. Example: MODULES="src/difftune/data/captions.py".
MODULES ?= src/difftune/data/captions.py
mutation-auto: $(VENV)/.installed-dev
	$(BIN)/python tools/mutation_auto.py $(MODULES) $(ARGS)

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@
