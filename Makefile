# The two commands of the README: `make quickstart` and `make test`.
# Both set up a virtual environment in .venv first. It sees the system's packages, so a PyTorch
# that is already installed is reused instead of downloading another (multi-GB) build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build pinned for machines without PyTorch; bring your own (e.g. CUDA) build by
# installing it before running make.
TORCH_SPEC ?= torch==2.13.0

.PHONY: quickstart test install browser clean

$(BIN)/orchard: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/orchard

quickstart: install
	$(BIN)/orchard quickstart

test: install browser
	$(BIN)/python -m pytest

# The chat page's test drives Debian's Chromium: installed here where apt-get can (as root, as in
# CI), else that one test skips with its reason.
browser:
	@if ! { command -v chromium && command -v chromedriver; } >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium and chromium-driver for the chat page test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
	      || echo "could not install chromium: the chat page test will skip"; \
	  else echo "no chromium: the chat page test will skip"; fi; \
	fi

clean:
	rm -rf $(VENV) runs .pytest_cache
