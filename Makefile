# Two commands for a fresh clone (see README):
#   make demo   - tiny CPU training demo on 2 gloo ranks
#   make test   - the test suite
# Both create/reuse .venv and install torch FIRST and pinned, then the rest with torch held.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: demo test lint venv bench clean gpu-check

GPU_CHECK_OUT ?= gpu_check_report.json

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -r requirements.txt -r requirements-dev.txt "$(TORCH_SPEC)"
	$(PIP) --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m megatron_omni.cli.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

# On a GPU node (inside the container of docker/Dockerfile, no venv needed): every GPU path one
# GPU can show, table + JSON report. PY_GPU overrides the interpreter (default: python3). `-m`
# from the repository root: the package need not be installed.
PY_GPU ?= python3
gpu-check:
	$(PY_GPU) -m megatron_omni.cli.gpu_check --out $(GPU_CHECK_OUT)

# Lint + import order + line length 100 (pyproject.toml [tool.ruff]); CI runs it before the tests.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) bench/bench_llm.py

clean:
	rm -rf $(VENV) .pytest_cache
