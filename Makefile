# Two commands do all set-up:  `make demo` (the main job) and `make test` (the suite).
# Both create .venv on first use. GPU users with their own torch: `make TORCH= test`
# (then the venv sees the system site-packages, so the torch you have is kept).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
VENV_FLAGS = $(if $(TORCH),,--system-site-packages)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

demo: $(STAMP)
	$(VENV)/bin/flowalign demo --out demo_out --overwrite

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
