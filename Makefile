# Two entry points: `make demo` and `make test`. Both build the virtual environment themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first, pinned: a bare `torch` requirement with nothing installed pulls the CUDA build.
# GPU users: make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# Python must not put this folder on sys.path: our top-level kernels/ would shadow the `kernels`
# package transformers imports (it installs as rosafx.kernels; PYTHONSAFEPATH needs Python 3.11).
RUN    := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONSAFEPATH=1 $(PY)

.PHONY: demo test test-fast bench venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(RUN) -m rosafx.recipes.demo

test: $(STAMP)
	$(RUN) -m pytest -n 2 -q tests bench

test-fast: $(STAMP)   # the tests not marked slow (tests/conftest.py): under 2 minutes on 2 cores
	$(RUN) -m pytest -n 2 -q -m "not slow" tests bench

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/train_step.py

clean:
	rm -rf $(VENV) build dist *.egg-info
