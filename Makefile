# patchmosaic: `make demo` runs the main job on bundled data, `make test` runs the tests.
# Both create/use the local virtualenv .venv and install the Python packages they need (pip only);
# `make browser` installs the system Chromium for the browser test (apt-get; asked for explicitly).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ifndef DEMO_OUT
DEMO_OUT := runs/demo-$(shell date +%Y%m%d-%H%M%S)
endif

.PHONY: install browser test demo bench clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# System Chromium for the report's browser test: Debian's chromium and its dependencies (about 25
# packages, ~400 MB) with apt-get as root or passwordless sudo; the script lists them first. Never
# `playwright install`: that downloads a browser. Not a prerequisite of `make test`.
browser:
	bash scripts/install_chromium.sh

# Every test; without Chromium the browser test of tests/test_report.py is skipped (`make browser`).
test: install
	@[ -x "$${PATCHMOSAIC_CHROMIUM:-/usr/bin/chromium}" ] || echo "make test: no Chromium at" \
		"$${PATCHMOSAIC_CHROMIUM:-/usr/bin/chromium}, so the report's browser test will be skipped;" \
		"'make browser' installs it (apt-get, ~400 MB)."
	$(PY) -m pytest -q -n 2

# ELS machine, zero padding, published MNIST schedule, 8 seeds, 1,000 bundled digits, with provenance;
# then the patch-mosaic metrics (explain) and the HTML report with the mosaic explorer.
demo: install
	$(VENV)/bin/patchmosaic sample --dataset mnist --machine els --padding zeros \
		--patch-sizes mnist-resnet-zeros --n-train 1000 --seeds 0-7 --provenance --out $(DEMO_OUT)
	$(VENV)/bin/patchmosaic explain $(DEMO_OUT)
	$(VENV)/bin/patchmosaic report $(DEMO_OUT) --out $(DEMO_OUT)/report
	@echo "open $(DEMO_OUT)/report/index.html"

bench: install
	$(PY) benchmarks/bench_els.py

clean-venv:
	rm -rf $(VENV)
