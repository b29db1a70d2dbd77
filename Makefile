# Every target sets itself up: `make demo` and `make test` work on a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RECIPE ?= recipes/digits.yaml

.PHONY: install demo test test-fast zoo bench lint clean arm-board

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The model-zoo check's architectures: timm (its pins want a newer torch, so without its dependencies, which
	# are here already) and torchvision for torch 2.13 (transformers comes with litert-torch).
	$(BIN)/python -m pip install --quiet --no-deps timm==1.0.31 torchvision==0.28.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edge-pipeline run $(RECIPE)

# Two workers, one test file each at a time (module fixtures are built once): most of a test's time is
# single-threaded export and conversion, so two cores run two files at once.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not zoo" -n 2 --dist loadfile

# The model-zoo check: timm, torchvision and transformers architectures through init and int8 on three runtimes;
# one test per worker, two at a time (each is one model's run, mostly single-threaded export and conversion).
zoo: $(STAMP)
	$(BIN)/python -m pytest -q -m zoo -n 2 --dist load

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not zoo" -n 2 --dist loadfile

# EfficientNet-Lite0 on labelled ImageNet photos where a folder of them is at hand (EDGE_PIPELINE_IMAGENET, or the
# development samples beside the project), else on the unlabelled photographs that ship in PyPI wheels.
LITE0 := $(if $(or $(EDGE_PIPELINE_IMAGENET),$(wildcard ../shared/imagenet-samples)),recipes/efficientnet-lite0-imagenet.yaml,recipes/efficientnet-lite0.yaml)

bench: $(STAMP)
	$(BIN)/edge-pipeline bench recipes/digits.yaml recipes/mobilenet32.yaml $(LITE0) recipes/efficientnet32-qat.yaml --out BENCHMARKS.md

# An emulated arm64 board (qemu-user) in .arm-board/, for tests/test_arm_board.py; needs root.
arm-board: $(STAMP)
	bash scripts/arm-board.sh

lint: $(STAMP)
	$(BIN)/ruff check edge_pipeline tests device_tests

clean:
	rm -rf runs dist .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
