# Two commands a new user needs: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo
QUICK ?=
SEED ?= 0
export PYTHONPATH := $(CURDIR)
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax

.PHONY: demo test venv bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: venv
	$(PY) -m pytest -q

demo: venv
	$(PY) -m irg_jax.synthetic.demo --workdir $(WORKDIR) --seed $(SEED) $(if $(QUICK),--quick,)

bench: venv
	$(PY) bench/run_all.py

clean:
	rm -rf .cache workdirs
