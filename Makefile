# Two commands do all set-up:  `make demo` (the main job) and `make test` (the suite).
# Both create .venv on first use. GPU users with their own torch: `make TORCH= test`
# (then the venv sees the system site-packages, so the torch you have is kept).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
DEMO_STAMP = $(VENV)/.installed-demo
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

# the demo needs the core dependencies only (no test tools, OCR or web app)
$(DEMO_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e .
	touch $(DEMO_STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

demo:
	@echo "make demo: installs flowalign and its core dependencies into $(VENV) (first run only: about 3 minutes),"
	@echo "then trains a LoRA on the shipped tiny pipeline (Centered Reward Distillation on the toy GenEval exact"
	@echo "check, configs/toy_demo.yaml) and writes demo_out/report.md with its grids and plots."
	@echo "About 11-12 minutes in all on a 2-core CPU (667-733 s from a fresh clone on an AMD EPYC, docs/results.md)."
	@$(MAKE) --no-print-directory $(DEMO_STAMP)
	$(VENV)/bin/flowalign demo --out demo_out --overwrite

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
