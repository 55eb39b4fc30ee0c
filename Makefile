# Two entry points for a fresh machine:
#   make demo   - the real-model demo (Gemma-3 270M, offline, CPU)
#   make test   - the whole test suite
# Each creates its own virtual environment in $(VENV), installs torch ($(TORCH_SPEC), a CPU wheel
# here; override e.g. TORCH_SPEC="torch" for a CUDA build) unless the venv already has torch,
# then the package with its extras.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.peft_unlearn_installed

.PHONY: demo test lint docs bench-ihl clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo_gemma3.py

test: $(STAMP)
	$(PY) -m pytest -q tests

# ruff also formats the Python code blocks of Markdown files: the docs are checked like the code.
lint: $(STAMP)
	$(VENV)/bin/ruff check peft_unlearn tests examples benchmarks scripts
	$(VENV)/bin/ruff format --check peft_unlearn tests examples benchmarks scripts README.md CONTRIBUTING.md docs

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) site build *.egg-info
