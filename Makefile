# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extra pip arguments, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" for a CPU-only torch.
PIP_ARGS ?=

.PHONY: demo test venv clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(PIP_ARGS) -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) scripts/train.py experiment=shapes_soft

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) outputs multirun data_cache
