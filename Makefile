# Two commands a newcomer needs:  make demo   (whole local pipeline)   and   make test   (the test suite).
# Both create .venv and install the pinned set first. Windows: see README "Without make".
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo chat test test-fast bench teardown clean constraints

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade "pip==26.3"
	# One resolution for everything: constraints.txt pins every transitive package.
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m finetune_phi.demo

# Chat with the deployed model in the terminal (after make demo); Prompt flow runs with the project's home.
chat: $(STAMP)
	$(PY) -m finetune_phi.pf_env $(VENV)/bin/pf flow test --flow chat_flow --interactive

test: $(STAMP)
	bash scripts/ensure-chromium.sh
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) bench/serve_bench.py
	$(PY) bench/train_bench.py

teardown: $(STAMP)
	$(PY) deploy_model.py --teardown

# Regenerate constraints.txt from the current venv (after changing a pin in pyproject.toml).
constraints:
	$(PY) -m pip freeze --exclude-editable | sed -E 's/\+cpu$$//' > constraints.txt

clean:
	rm -rf $(VENV) .finetune_phi data .pytest_cache
