# Set-up and checks. `make test` and `make demo` create and reuse .venv/ in the repo root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU build of torch that lies on this machine's disk; GPU users: install your torch into .venv first.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e .
	touch $@

# Tests also need the napari plugin's extra and the test tools (napari tests run under Xvfb).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev,napari]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed-test
	PYTHONUTF8=1 $(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) -m medcam3d demo

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_explainers.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
