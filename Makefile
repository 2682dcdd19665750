# Two commands a user needs: `make demo` (the main job, end to end, on the embedded corpus) and
# `make test` (the test suite). Both build the virtualenv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first and alone: the exact pin resolves to the build already on the machine (the
# CPU wheel here), so no later dependency can pull a CUDA torch. See README "GPU installs".
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test bench reproduce lint clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,eval,hf]"
	$(PY) -c "import torch, megatron.core, deepspeed, webdataset, sentencepiece; print('torch', torch.__version__)"
	touch $@

demo: install
	$(PY) -m tools.demo

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

reproduce: install
	$(PY) -m tools.reproduce $(REPRODUCE_ARGS)

bench: install
	$(PY) -m tools.bench

lint: install
	$(VENV)/bin/ruff check megatron_bd3 tools tests

clean:
	rm -rf $(VENV) runs build *.egg-info
