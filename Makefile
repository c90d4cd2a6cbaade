# patchmosaic: `make demo` runs the main job on bundled data, `make test` runs the tests.
# Both create/use the local virtualenv .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install test demo bench clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n 2

# ELS machine, zero padding, published MNIST schedule, 8 seeds, 1,000 bundled digits.
demo: install
	$(VENV)/bin/patchmosaic sample --dataset mnist --machine els --padding zeros \
		--patch-sizes mnist-resnet-zeros --n-train 1000 --seeds 0-7 --out $(DEMO_OUT)

bench: install
	$(PY) benchmarks/bench_els.py

clean-venv:
	rm -rf $(VENV)
