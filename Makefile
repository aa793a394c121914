# Two commands for a fresh clone (see README):
#   make demo   - tiny CPU training demo on 2 gloo ranks
#   make test   - the test suite
# Both create/reuse .venv and install torch FIRST and pinned, then the rest with torch held.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: demo test venv bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -r requirements.txt -r requirements-dev.txt "$(TORCH_SPEC)"
	$(PIP) --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) tools/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/bench_llm.py

clean:
	rm -rf $(VENV) .pytest_cache
