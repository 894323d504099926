# Two commands after `git clone`:  `make demo` (the main job on digits) and `make test` (the test suite).
# Both create .venv and install requirements.txt into it on first use; a second run installs nothing.
PY ?= python3
VENV := .venv
# the install stamp is keyed on requirements.txt's content, not its mtime: a checkout that touches the file without
# changing it installs nothing
REQ_HASH := $(shell cat requirements.txt requirements-text-data.txt 2>/dev/null | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)
# a first install needs ~8 GiB free (torch is a CUDA build)
MIN_FREE_KB ?= 8000000
SHELL := /bin/bash

.PHONY: demo test test-trained install gpu-test bench bench-gpu reproduce rehearse clean

$(STAMP):
	@set -e; \
	pkgs="libopencv-dev libturbojpeg0-dev pkg-config g++"; \
	inc=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
	[ -f "$$inc/Python.h" ] || pkgs="$$pkgs python3-dev"; \
	can_apt=0; if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then can_apt=1; fi; \
	if [ $$can_apt = 1 ] && ! dpkg -s $$pkgs >/dev/null 2>&1; then \
	  echo "installing FFCV's build dependencies with apt ($$pkgs)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs >/dev/null; \
	fi; \
	free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
	if ! $(VENV)/bin/python -c 'import torch' 2>/dev/null && [ "$${free_kb:-0}" -lt $(MIN_FREE_KB) ]; then \
	  echo "error: only $$((free_kb / 1048576)) GiB free in $$(pwd): the virtual environment (torch, a CUDA build) needs about 8 GiB; free some space and rerun make" >&2; \
	  exit 1; \
	fi; \
	[ -x $(VENV)/bin/python ] || $(PY) -m venv $(VENV); \
	$(VENV)/bin/pip install -q --upgrade pip wheel setuptools; \
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1 2>/dev/null || true; \
	grep -v '^ffcv' requirements.txt > $(VENV)/requirements-core.txt; \
	$(VENV)/bin/pip install -q -r $(VENV)/requirements-core.txt; \
	$(VENV)/bin/pip install -q --no-deps -r requirements-text-data.txt; \
	ffcv_req="$$(grep '^ffcv' requirements.txt)"; \
	if ! $(VENV)/bin/pip install -q "$$ffcv_req"; then \
	  if [ $$can_apt = 1 ]; then echo "pip install $$ffcv_req failed" >&2; exit 1; fi; \
	  echo "WARNING: $$ffcv_req did not build (it needs $$pkgs: ask an admin to apt-get install them, or use" \
	       "conda's opencv/libjpeg-turbo); everything but loader=ffcv works, its tests are skipped" >&2; \
	fi; \
	rm -f $(VENV)/.installed $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

# the paper's point in ~1.5 minutes: KL and KL+DP from the same weaker teacher into a stronger student, 3 transfer
# seeds each, side by side (mean ± std [95% CI]); trains the two zoo models it needs on a fresh checkout
demo: $(STAMP)
	@set -e; d=outputs/demo/$$(date +%Y-%m-%d_%H-%M-%S); mkdir -p $$d; \
	echo "KL vs KL+DP, mlp_small (weaker teacher) -> resnet8, transfer seeds 0,1,2; the sweep log: $$d/sweep.log"; \
	$(VENV)/bin/python main_transfer.py -m teacher=mlp_small student=resnet8 method=kl,kl_dp trainer.seed=0,1,2 \
	  hydra.sweep.dir=$$d \
	  > $$d/sweep.log 2>&1 || { tail -n 20 $$d/sweep.log; exit 1; }; \
	$(VENV)/bin/python scripts/aggregate.py $$d --out $$d/aggregate --print transfer_pairs

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# the tests that assert on trained models, again (CI runs them under ATEN_CPU_CAPABILITY=default too)
test-trained: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m trained

# every family's claims over 3 seeds, one suite after the other (scripts/reproduce.py's SUITES), into the untracked
# outputs/reproduce/: the digits suite (~26 min on 2 cores), the text suite (~12 min), then KDEP's dense downstreams
# (segmentation mIoU and detection mAP / AP50, ~16 min); the committed results/<suite>/ reports are refreshed with
# `python scripts/reproduce.py --out results/<folder>`
reproduce: $(STAMP)
	$(VENV)/bin/python scripts/reproduce.py
	$(VENV)/bin/python scripts/reproduce.py --suite text
	$(VENV)/bin/python scripts/reproduce.py --suite dense

# every full-scale preset for 2 steps at its real resolution on small data in the real formats (19 rows, ~4 min on
# 2 cores); the table lands in outputs/rehearsal/rehearsal.md. `make test` runs the same rows (pytest -m rehearse).
rehearse: $(STAMP)
	$(VENV)/bin/python scripts/rehearse.py --out outputs/rehearsal

gpu-test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m gpu

bench: $(STAMP)
	$(VENV)/bin/python scripts/benchmark.py

# one GPU, <= ~5 min: KL+DP R50->R18 224px bf16 (eager + compile), loaders, FFCV, flips/KL, DDP with 2 GPUs;
# writes bench_results/bench_gpu_cuda.{json,md}. BENCH_GPU_ARGS="--device cpu --tiny" runs it anywhere.
bench-gpu: $(STAMP)
	$(VENV)/bin/python scripts/bench_gpu.py $(BENCH_GPU_ARGS)

clean:
	rm -rf outputs multirun cache checkpoints
