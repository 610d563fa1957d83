# Everything runs from a virtual environment this Makefile creates. The machine needs Python
# >= 3.10 with venv; .ci/prerequisites checks that (and what the tests use) first, and installs
# what is missing with apt-get when run as root.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
# the interpreter the environment is made with
BASE_PYTHON ?= python3
# torch first, pinned: these two releases install from this machine's local disk (a CUDA
# build that also runs on CPU); clean-fid needs torchvision. pyproject keeps torch>=2.4.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install install-dev install-deepspeed demo test test-slow bench docs clean

# Extras only where they are used: the demo and the benchmarks need the package alone, the
# tests add [dev] (pytest, moto), the slow tests [deepspeed] (DeepSpeed + transformers, which
# accelerate's DeepSpeed integration imports) for tests/integration/test_deepspeed.py.
install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
install-deepspeed: $(VENV)/.installed-deepspeed

$(VENV)/.installed: pyproject.toml Makefile
	PYTHON=$(BASE_PYTHON) .ci/prerequisites python
	test -x $(PYTHON) || $(BASE_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q $(TORCH_PIN)
	$(PYTHON) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PYTHON) -m pip install -q -e '.[dev]'
	touch $@

$(VENV)/.installed-deepspeed: $(VENV)/.installed-dev
	$(PYTHON) -m pip install -q -e '.[dev,deepspeed]'
	touch $@

# The paper's swiss-roll experiment on CPU: local files, local sqlite MLflow, no services.
demo: install
	$(VENV)/bin/gapm train --config configs/swissroll.yaml

test: install-dev
	.ci/prerequisites test
	$(PYTHON) -m pytest -q

test-slow: install-deepspeed
	.ci/prerequisites test
	$(PYTHON) -m pytest -q -m slow

bench: install
	$(PYTHON) benchmarks/loader.py
	$(PYTHON) benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# The documentation site (docs/, mkdocs.yml) at http://127.0.0.1:8000; `make test` builds it strictly.
docs: install-dev
	$(VENV)/bin/mkdocs serve
