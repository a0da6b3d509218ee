# glm-build: `make demo` and `make test` both start from `make setup`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0

.PHONY: setup test demo tiny-model clean

setup: $(VENV)/.installed

# Re-run the install when the project's metadata changes; torch only when none is installed
# (on a GPU host install your CUDA build of torch into .venv first, and it is kept).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH)" "numpy<2"
	$(PIP) install --quiet -e ".[dev]"
	# the CPU decode kernel (C++, needs g++ and ninja); without it torch's kernels are used
	-$(PY) -m builder.model.cpu_kernels
	touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m builder.demo

# Re-create the embedded tiny checkpoint (deterministic; about 35 minutes on 2 cores).
tiny-model: setup
	$(PY) scripts/make_tiny_model.py --probe-every 2000

clean:
	rm -rf $(VENV) build dist *.egg-info
