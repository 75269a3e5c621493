# The README's two commands. Each sets up .venv in the checkout if it is missing.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
# torch is used only by the torchvision-export test. It is installed from a local
# CPU wheel when one exists (never a multi-GB CUDA build from the index).
TORCH_VERSION   ?= 2.13.0
TORCH_WHEEL_DIR ?= /opt/wheels
DEMO_WORKDIR ?= runs/demo_simclr_digits

.PHONY: demo test install install-test clean-demo

$(VPY):
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

$(VENV)/.installed: setup.py | $(VPY)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: setup.py $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	@if ls $(TORCH_WHEEL_DIR)/torch-$(TORCH_VERSION)* >/dev/null 2>&1; then \
		$(PIP) install -q --find-links $(TORCH_WHEEL_DIR) "torch==$(TORCH_VERSION)"; \
	else echo "note: no CPU torch wheel in $(TORCH_WHEEL_DIR); the torchvision-export tests will be skipped"; fi
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VPY) experiments/train.py --config=configs/simclr.py:digits --workdir=$(DEMO_WORKDIR)

# Two workers: much of the suite is single-threaded XLA compilation and
# subprocess start-up, which overlaps well on 2 cores. Tests of one file stay
# on one worker (module fixtures are built once).
PYTEST_WORKERS ?= 2

test: $(VENV)/.installed-test
	$(VPY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=40

clean-demo:
	rm -rf $(DEMO_WORKDIR)
