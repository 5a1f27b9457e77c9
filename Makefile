# Set-up and common tasks. `make demo` and `make test` create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared/data

.PHONY: setup browser demo test test-fast lint format docs docs-tables docs-check default-model calibrate-default cross-validation comparison clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a bare `torch` requirement would pull the newest CUDA build (GBs).
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup  ## locate the example photo with the embedded model
	$(VENV)/bin/geoswc locate examples/kauai.png

# Without root, `.venv/bin/python -m playwright install chromium` gives the browser test playwright's own.
browser:  ## headless Chromium for tests/test_browser.py (Debian's chromium; needs root)
	@if [ ! -x /usr/bin/chromium ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	fi

test: setup lint docs-check  ## the whole test suite (what CI runs); the browser test skips in one line without a Chromium
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup  ## ruff: lint (complexity included) and formatting
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

format: setup
	$(VENV)/bin/ruff format src tests benchmarks scripts

# The documentation site (mkdocs.yml, docs/): builds offline; its results tables come from benchmarks/results.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs
docs: setup  ## serve the documentation at http://127.0.0.1:8000 (mkdocs serve)
	$(MKDOCS) serve

docs-tables: setup  ## regenerate docs/tables/*.md from benchmarks/results/*.json
	$(PY) scripts/docs_tables.py

docs-check: setup  ## the committed tables match benchmarks/results, and the site builds with --strict
	$(PY) scripts/docs_tables.py --check
	$(MKDOCS) build --strict --quiet --site-dir site

default-model: setup  ## rebuild the embedded model from $(SHARED)
	$(PY) scripts/build_default_model.py --shared $(SHARED)

calibrate-default: setup  ## refit the embedded model's calibrator out of fold (needs work/default-model/features)
	$(VENV)/bin/geoswc calibrate --model src/geoswc/assets/default --features work/default-model/features --folds 5 \
		--report benchmarks/results/calibration

cross-validation: setup  ## docs/evaluation.md's cross-validation table (reuses the default model's feature cache if built)
	$(PY) benchmarks/cross_validation.py --recipe recipes/default.yaml \
		$(if $(wildcard work/default-model/features/features.json),--features work/default-model/features) \
		--also '[{select_km: 0}]' --out benchmarks/results/cross_validation.json

BASELINES := $(SHARED)/baselines/geoestimation-im2gps3k
comparison: setup  ## the table beside published systems (docs/evaluation.md): out-of-fold predictions, then geoswc compare
	$(PY) benchmarks/cross_validation.py --recipe recipes/default.yaml \
		$(if $(wildcard work/default-model/features/features.json),--features work/default-model/features) \
		--out benchmarks/results/geoswc-swc-cv/cross_validation.json --predictions benchmarks/results/geoswc-swc-cv
	$(VENV)/bin/geoswc compare benchmarks/results/geoswc-swc-cv $(BASELINES)/ISNs_M-fstar-S3-dev.csv \
		$(BASELINES)/base_M-fstar-dev.csv $(BASELINES)/base_M-m-dev.csv $(BASELINES)/base_L-m-dev.csv \
		$(BASELINES)/base-vgg_L-m-dev.csv $(BASELINES)/base-vgg-c_L-m-dev.csv --out benchmarks/results/compare

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .ruff_cache
