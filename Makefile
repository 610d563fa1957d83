# Everything runs from a virtual environment this Makefile creates.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
# torch first, pinned: these two releases install from this machine's local disk (a CUDA
# build that also runs on CPU); clean-fid needs torchvision. pyproject keeps torch>=2.4.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-slow bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q $(TORCH_PIN)
	$(PYTHON) -m pip install -q -e '.[dev,deepspeed]'
	touch $@

# The paper's swiss-roll experiment on CPU: local files, local sqlite MLflow, no services.
demo: install
	$(VENV)/bin/gapm train --config configs/swissroll.yaml

test: install
	$(PYTHON) -m pytest -q

test-slow: install
	$(PYTHON) -m pytest -q -m slow

bench: install
	$(PYTHON) benchmarks/loader.py
	$(PYTHON) benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
