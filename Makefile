# The README's two commands. Each sets up .venv in the checkout if it is missing.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
# torch is used only by the export test; this pin matches the local CPU wheel.
TORCH   ?= torch==2.13.0
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
	$(PIP) install -q "$(TORCH)" || echo "warning: $(TORCH) not installed; the torch export test will be skipped"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VPY) experiments/train.py --config=configs/simclr.py:digits --workdir=$(DEMO_WORKDIR)

test: $(VENV)/.installed-test
	$(VPY) -m pytest -q

clean-demo:
	rm -rf $(DEMO_WORKDIR)
