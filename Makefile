# Set-up and checks. `make test` and `make demo` create and reuse .venv/ in the repo root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU build of torch that lies on this machine's disk; GPU users: install your torch into .venv first.
TORCH_SPEC ?= torch==2.13.0

# Extra pytest arguments, e.g. make test PYTEST_ARGS='-m "not slow"' or PYTEST_ARGS=tests/test_cli.py
PYTEST_ARGS ?=

.PHONY: install system-deps test demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e .
	touch $@

# Tests also need the napari plugin's extra and the test tools (napari tests run under Xvfb).
# The nnU-Net extra under a constraint that keeps the installed torch (nnunetv2 -> timm -> torchvision would
# otherwise replace a CPU torch with the newest CUDA build).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install --quiet -e ".[dev,napari,nnunet]" -c $(VENV)/torch-constraint.txt
	touch $@

install: $(VENV)/.installed

# Xvfb and Qt's xcb libraries for the napari tests (apt-get; a no-op once installed). Where they
# cannot be installed the script says so and the napari tests are skipped (tests/conftest.py).
system-deps:
	@bash scripts/install-system-deps.sh

test: $(VENV)/.installed-test system-deps
	PYTHONUTF8=1 $(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(PY) -m medcam3d demo --out out/demo

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_explainers.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
