# Each target installs what it needs first (pip skips what is already there).
PYTHON ?= python3
PIP := DS_BUILD_OPS=0 $(PYTHON) -m pip install --disable-pip-version-check -q
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test lint demo bench

setup:
	$(PIP) -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(PIP) --no-deps --no-build-isolation -e .

lint: setup
	$(PYTHON) -m ruff check .

test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -n 2 --dist loadfile tests

demo: setup
	bash scripts/demo.sh $(DEMO_DIR)

bench: setup
	$(PYTHON) bench/shard_reader.py
