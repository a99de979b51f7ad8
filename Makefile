# Two commands a newcomer needs:  make demo   (whole local pipeline)   and   make test   (the test suite).
# Both create .venv and install the pinned set first. Windows: see README "Without make".
#   make install PYTHON=/path/to/python3.11   the interpreter to build the venvs with
#   make install TORCH=cpu                    PyTorch's CPU-only build instead of PyPI's (CUDA on Linux)

# Empty = the first of python3.11, python3.12, python3 that is 3.11 or 3.12 and can create a venv;
# scripts/find-python.sh stops with what to install when none is (pyproject.toml: >=3.11,<3.13).
PYTHON ?=
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo chat test test-fast bench fixtures teardown clean constraints azureml-serving agent-framework chat-maf

# Azure ML's own scoring stack (azureml-inference-server-http + the model's requirements), a test peer
# for /score: a venv of its own (it pins opentelemetry 1.33), resolved in ONE pip command.
AZ_VENV  ?= .venv-azureml
AZ_STAMP := $(AZ_VENV)/.installed
# Microsoft Agent Framework's venv: its opentelemetry pins exclude promptflow's (maf_flows/requirements.txt).
MAF_VENV  ?= .venv-maf
MAF_STAMP := $(MAF_VENV)/.installed

# Which torch build the venvs get (both install torch==$(TORCH_VERSION), the pin in constraints.txt):
#   pypi (default): whatever pip resolves for that pin. From PyPI on Linux that is the CUDA 13 build: a
#     527 MB torch wheel that pulls nvidia-*, cuda-* and triton wheels, 2.7 GB of downloads in all
#     (PyPI's file sizes for cp311 x86_64, read 2026-12-04). macOS and Windows get a CPU build.
#   cpu: PyTorch's CPU-only build (torch==$(TORCH_VERSION)+cpu, ~190 MB, no nvidia packages) from
#     PyTorch's own index, the one pytorch.org/get-started gives for "Compute Platform: CPU". Only torch
#     comes from there (--no-deps: no other package can be taken from a second index); everything else
#     resolves from PyPI against constraints.txt, whose torch==$(TORCH_VERSION) the installed +cpu
#     build satisfies (PEP 440 ignores a local label when the pin has none), so pip keeps it.
# TORCH=cpu on a venv that holds another torch rebuilds that venv from scratch: swapping torch in place
# would leave the CUDA build's 2+ GB of nvidia packages behind. A later plain `make` keeps a +cpu torch
# for the same reason pip does; back to PyPI's build: make clean install.
TORCH ?= pypi
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_VERSION   := $(shell sed -n 's/^torch==//p' constraints.txt)
UNAME_S         := $(shell uname -s)
# The CPU index names its Linux (and Windows) wheels 2.x.y+cpu, its macOS ones plain 2.x.y (e.g. the
# 2.11.0 files nixpkgs pins in pkgs/development/python-modules/torch/bin/binary-hashes.nix). Where it
# has +cpu, pinning it makes an unreachable index an error instead of a silent CUDA download from an
# extra index in the user's pip config. macOS has no CUDA build to switch away from.
TORCH_CPU_PIN   := torch==$(TORCH_VERSION)$(if $(filter Darwin,$(UNAME_S)),,+cpu)
ifeq ($(filter $(TORCH),pypi cpu),)
$(error TORCH=$(TORCH): use TORCH=cpu (PyTorch's CPU-only build) or TORCH=pypi (the default: what pip resolves, CUDA on Linux))
endif
# $(call torch_in,venv dir): cpu when the venv holds a +cpu torch, other for any other torch, else empty.
# Read from the dist-info folder's name: no torch import (seconds) on every make.
torch_in = $(if $(wildcard $(1)/lib/python3*/site-packages/torch-*+cpu.dist-info),cpu,$(if \
	$(wildcard $(1)/lib/python3*/site-packages/torch-*.dist-info),other))
# $(call switch_to_cpu,venv dir): non-empty when TORCH=cpu must rebuild that venv.
switch_to_cpu = $(if $(and $(filter cpu,$(TORCH)),$(filter-out Darwin,$(UNAME_S))),$(filter \
	other,$(call torch_in,$(1))))
TORCH_SWITCH    := $(call switch_to_cpu,$(VENV))
AZ_TORCH_SWITCH := $(call switch_to_cpu,$(AZ_VENV))
ifeq ($(TORCH),cpu)
TORCH_SAYS := $(TORCH_CPU_PIN) (CPU-only, ~190 MB) from $(TORCH_CPU_INDEX)
else ifeq ($(UNAME_S),Linux)
TORCH_SAYS := torch $(TORCH_VERSION) as pip resolves it; from PyPI that is the CUDA 13 build, ~2.7 GB \
	of wheels with its nvidia-*/triton packages (no NVIDIA GPU? make install TORCH=cpu)
else
TORCH_SAYS := torch $(TORCH_VERSION) from PyPI (this platform's build)
endif
# $(call torch_cpu,venv python): install the CPU build alone, before the one resolution of the rest.
torch_cpu = $(if $(filter cpu,$(TORCH)),$(1) -m pip install -q --disable-pip-version-check --no-deps \
	--index-url $(TORCH_CPU_INDEX) "$(TORCH_CPU_PIN)")
# The shell command that prints the interpreter to use, or explains why there is none and fails.
FIND_PYTHON = MAKE_GOALS="$(or $(MAKECMDGOALS),install)" PYTHON_ORIGIN="$(origin PYTHON)" \
	bash scripts/find-python.sh "$(PYTHON)"

$(STAMP): pyproject.toml constraints.txt $(if $(TORCH_SWITCH),torch-switch)
	$(if $(TORCH_SWITCH),@echo "$(VENV) holds a torch other than +cpu; rebuilding it for TORCH=cpu")
	$(if $(TORCH_SWITCH),rm -rf $(VENV))
	@python=$$($(FIND_PYTHON)) && echo "creating $(VENV) with $$python" && "$$python" -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade "pip==26.3"
	@echo "$(if $(and $(filter pypi,$(TORCH)),$(filter cpu,$(call torch_in,$(VENV)))),keeping the \
		torch $(TORCH_VERSION)+cpu that $(VENV) holds,installing $(TORCH_SAYS))"
	$(call torch_cpu,$(PY))
	# One resolution for everything else: constraints.txt pins every transitive package of the CPU set.
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

.PHONY: torch-switch
torch-switch:

$(AZ_STAMP): tests/azureml-serving-requirements.txt tests/azureml-serving-constraints.txt \
		$(if $(AZ_TORCH_SWITCH),torch-switch)
	rm -rf $(AZ_VENV)
	@python=$$($(FIND_PYTHON)) && echo "creating $(AZ_VENV) with $$python" && "$$python" -m venv $(AZ_VENV)
	@echo "installing $(TORCH_SAYS)"
	$(call torch_cpu,$(AZ_VENV)/bin/python)
	$(AZ_VENV)/bin/python -m pip install -q --disable-pip-version-check \
		-r tests/azureml-serving-requirements.txt -c tests/azureml-serving-constraints.txt
	touch $(AZ_STAMP)

azureml-serving: $(AZ_STAMP)

$(MAF_STAMP): maf_flows/requirements.txt maf_flows/constraints.txt
	rm -rf $(MAF_VENV)
	@python=$$($(FIND_PYTHON)) && echo "creating $(MAF_VENV) with $$python" && "$$python" -m venv $(MAF_VENV)
	$(MAF_VENV)/bin/python -m pip install -q --disable-pip-version-check \
		-r maf_flows/requirements.txt -c maf_flows/constraints.txt
	touch $(MAF_STAMP)

agent-framework: $(MAF_STAMP)

demo: $(STAMP)
	$(PY) -m finetune_phi.demo

# Chat with the deployed model in the terminal (after make demo); Prompt flow runs with the project's home.
chat: $(STAMP)
	$(PY) -m finetune_phi.pf_env $(VENV)/bin/pf flow test --flow chat_flow --interactive

chat-maf: $(MAF_STAMP)
	$(MAF_VENV)/bin/python -m maf_flows chat

# Two pytest-xdist workers, one test file each (492 tests: 6 min on two cores, 2026-12-04; one process,
# TEST_WORKERS=0: 10 min 23 s). The one test that depended on the other worker's load (9 of 10 requests
# in one decoding step: a request still being tokenized joined a step later) now waits for tokenized
# requests. FINETUNE_PHI_ALLOWED_SKIPS=none|fixtures|fixtures:<names> makes skips fail the run
# (tests/conftest.py; .ci/run). The 15 slowest tests are listed at the end: where the 10 minutes go.
TEST_WORKERS ?= 2

test: $(STAMP) $(AZ_STAMP) $(MAF_STAMP)
	bash scripts/ensure-chromium.sh
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) bench/serve_bench.py
	$(PY) bench/train_bench.py

# Third-party test fixtures into the cache (hash-checked); a no-op where ../shared/fixtures has them.
# Tests never download: without them the tests that need real third-party data skip and say how to get it.
fixtures: $(STAMP)
	$(PY) -m testkit.fixtures fetch

teardown: $(STAMP)
	$(PY) deploy_model.py --teardown

# Regenerate constraints.txt from the current venv (after changing a pin in pyproject.toml).
constraints:
	$(PY) -m pip freeze --exclude-editable | sed -E 's/\+cpu$$//' > constraints.txt

clean:
	rm -rf $(VENV) $(AZ_VENV) $(MAF_VENV) .finetune_phi data .pytest_cache
