# The two commands in the README. Each sets up everything it needs on a fresh machine:
# the system library libusb-1.0-0 (tflite-support links it), a virtual environment in .venv
# with Python 3.11, and the pinned packages. Set-up reruns only when pyproject.toml changes.
#
# .venv has the tasklib extra (tflite-support, where it has wheels: x86-64) and the mediapipe
# extra (MediaPipe Tasks). make test also sets up .venv-lite, the install without tflite-support
# (as on Apple Silicon: protobuf 4, compiled; with mediapipe), and runs the tests that prove the
# chain and its TFLite metadata there (tests/test_platforms.py).

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LITE   ?= .venv-lite
LITE_STAMP := $(LITE)/.installed
DEMO   ?= build/demo
#: Test processes: pytest-xdist hands each a test as it frees up (worksteal). Two on CI's
#: 2-core machine, where one process leaves the second core idle most of the time.
WORKERS ?= 2
PYTEST := -m pytest --numprocesses $(WORKERS) --dist worksteal
#: What runs again without tflite-support: the chain, its metadata, label, install, the apps.
LITE_TESTS := tests/test_platforms.py tests/targets/test_tflite_schema.py \
              tests/toolchain/test_label.py tests/toolchain/test_install.py tests/sample_apps

.PHONY: demo test setup clean

## make demo: the main job, offline, on the built-in sample data: build (retrain, convert to
## Core ML and TFLite, verify), then label one photo with each artifact. The artifacts are
## verified on 2004 other drawn photos: float32's 0.999 needs 2000 to be shown (README,
## "Verification"); the 24 held-out photos of the 240 would leave the verdict inconclusive.
demo: $(STAMP)
	$(BIN)/toolchain sample-data $(DEMO)/sample_photos
	$(BIN)/toolchain sample-data $(DEMO)/check_photos --per-class 334 --seed 1
	$(BIN)/toolchain build --image-dir $(DEMO)/sample_photos --weights none \
	    --architecture mobilenet_v3_small_224 --bottleneck-dir $(DEMO)/bottlenecks \
	    --target coreml --target tflite --tflite-variant dynamic \
	    --verify-images $(DEMO)/check_photos --output-dir $(DEMO)/out
	$(BIN)/toolchain label --model $(DEMO)/out/model_float32.mlmodel --image $(DEMO)/sample_photos/forest/forest_000.jpg --top-k 3
	$(BIN)/toolchain label --model $(DEMO)/out/model_dynamic.tflite --image $(DEMO)/sample_photos/forest/forest_000.jpg --top-k 3

## make test: the CPU it runs on (quantized kernels differ between CPUs), the linter, then the
## whole test suite (what CI runs).
test: $(STAMP) $(LITE_STAMP)
	$(BIN)/python -m tests.machine
	$(BIN)/ruff check .
	$(BIN)/python $(PYTEST)
	$(LITE)/bin/python $(PYTEST) $(LITE_TESTS)

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install-system-deps
	scripts/install-system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,tasklib,mediapipe]'
	touch $(STAMP)

$(LITE_STAMP): pyproject.toml
	test -x $(LITE)/bin/python || $(PYTHON) -m venv $(LITE)
	$(LITE)/bin/python -m pip install --quiet --upgrade pip
	$(LITE)/bin/python -m pip install --quiet -e '.[test,mediapipe]'
	touch $(LITE_STAMP)

clean:
	rm -rf $(VENV) $(LITE) build
