# Two commands after `git clone`:  `make demo` (the main job on digits) and `make test` (the test suite).
# Both create .venv and install requirements.txt into it on first use; a second run installs nothing.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
SHELL := /bin/bash

.PHONY: demo test install gpu-test bench clean

$(STAMP): requirements.txt
	@set -e; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s libturbojpeg0-dev libopencv-dev >/dev/null 2>&1; then \
	  echo "installing FFCV's system libraries (libopencv-dev libturbojpeg0-dev)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopencv-dev libturbojpeg0-dev >/dev/null; \
	fi; \
	[ -x $(VENV)/bin/python ] || $(PY) -m venv $(VENV); \
	$(VENV)/bin/pip install -q --upgrade pip wheel setuptools; \
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1 2>/dev/null || true; \
	$(VENV)/bin/pip install -q numpy cython pkgconfig; \
	$(VENV)/bin/pip install -q -r requirements.txt; \
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python main_transfer.py

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

gpu-test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m gpu

bench: $(STAMP)
	$(VENV)/bin/python scripts/benchmark.py

clean:
	rm -rf outputs multirun cache checkpoints
