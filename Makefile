# The two commands of the README: `make quickstart` and `make test`.
# Both set up a virtual environment in .venv first. It sees the system's packages, so a PyTorch
# that is already installed is reused instead of downloading another (multi-GB) build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build pinned for machines without PyTorch; bring your own (e.g. CUDA) build by
# installing it before running make.
TORCH_SPEC ?= torch==2.13.0

.PHONY: quickstart test install clean

$(BIN)/orchard: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/orchard

quickstart: install
	$(BIN)/orchard quickstart

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
