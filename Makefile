# Each target installs what it needs first (pip skips what is already there).
PYTHON ?= python3
PIP := DS_BUILD_OPS=0 $(PYTHON) -m pip install --disable-pip-version-check -q
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup slurm-deps test lint demo bench

setup:
	$(PIP) -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(PIP) --no-deps --no-build-isolation -e .

# Debian's Slurm, munge and shellcheck for tests/test_slurm.py (needs root; skipped where apt is unavailable).
slurm-deps:
	@if command -v slurmctld >/dev/null && command -v shellcheck >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    slurmctld slurmd slurm-client munge shellcheck >/dev/null; \
	else echo "slurm-deps: not root or no apt-get: the Slurm tests will be skipped"; fi

lint: setup
	$(PYTHON) -m ruff check .

test: setup slurm-deps
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=30 tests

demo: setup
	bash scripts/demo.sh $(DEMO_DIR)

bench: setup
	$(PYTHON) bench/shard_reader.py
	$(PYTHON) bench/train_speed.py
	$(PYTHON) bench/infer_speed.py
	$(PYTHON) bench/fid_speed.py
	$(PYTHON) bench/data_path.py
