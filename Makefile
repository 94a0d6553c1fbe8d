# The README's two commands: `make demo` and `make test`. Each creates .venv when missing and installs
# everything on a fresh machine. torch is installed first, pinned, so that a CPU-only machine takes the
# local CPU wheel and never pulls the multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
DEMO_OUT ?= demo_out
MM_OUT ?= demo_multimodal
PYTEST_ARGS ?=
BENCH_OUT ?= benchmark.json

.PHONY: demo demo-multimodal test test-all bench lint typecheck bundle-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pipelines.demo --out $(DEMO_OUT)

# the second demo: image, clinical and fusion malignancy models side by side (README "Image + clinical data")
demo-multimodal: $(STAMP)
	$(PY) -m pipelines.multimodal_demo --out $(MM_OUT)

test: $(STAMP)
	$(VENV)/bin/ruff check -q volcnn tests tools pipelines
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the performance benchmark (python -m pipelines.benchmark): table on stdout, JSON in $(BENCH_OUT); about 11 min on 2 CPU cores
bench: $(STAMP)
	$(PY) -m pipelines.benchmark --out $(BENCH_OUT)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check volcnn tests tools pipelines
	$(VENV)/bin/ruff format --check volcnn tests tools pipelines

typecheck: $(STAMP)
	$(VENV)/bin/mypy volcnn

bundle-check: $(STAMP)
	$(VENV)/bin/volcnn verify-bundle bundles/lung_nodule_ct_classification

clean:
	rm -rf $(DEMO_OUT) $(BENCH_OUT) .pytest_cache .ruff_cache .mypy_cache
