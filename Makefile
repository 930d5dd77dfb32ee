# Every target that needs the environment builds it first: `make demo` and `make test`
# both work as the first command on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CIFAR_ARCHIVE ?= ../shared/data/cifar10-jpeg-train.tar.gz

.PHONY: install demo test test-quick lint format train tensorboard bench accuracy screenshots clean

install: $(STAMP)

# Reinstall only when the package metadata changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## train offline on built-in synthetic data (seconds on a CPU)
	$(BIN)/cifar-bp train --config configs/smoke.yaml

test: $(STAMP)  ## the whole suite, as CI runs it
	$(BIN)/python -m pytest -q

test-quick: $(STAMP)  ## the suite without the slow end-to-end cases
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

screenshots: $(STAMP)  ## TensorBoard pages and terminal outputs as PNGs in docs/images (needs chromium)
	$(BIN)/python scripts/screenshots.py

train: $(STAMP)  ## real CIFAR-10 with configs/default.yaml (downloads on first use)
	$(BIN)/cifar-bp train

tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir runs

bench: $(STAMP)  ## throughput: tutorial loop vs this engine, side by side
	$(BIN)/python benchmarks/throughput.py

accuracy: $(STAMP)  ## accuracy on the real JPEG training images (needs the shared archive)
	$(BIN)/python benchmarks/accuracy.py --archive $(CIFAR_ARCHIVE)

clean:
	rm -rf runs .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
