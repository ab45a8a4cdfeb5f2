# facebce: `make demo` and `make test` work on a fresh machine (Python 3.10+ with venv).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.facebce-installed
DEMO   ?= demo_out
PYTEST_ARGS ?=
# the default suite runs on 2 pytest-xdist workers, one test file each at a time (CI has 2 cores;
# PYTEST_WORKERS=auto uses one per core, 0 runs everything in this process)
PYTEST_WORKERS ?= 2
BENCH_ARGS ?=

.PHONY: install lint test test-slow demo bench clean

install: $(STAMP)

# torch is pinned to the local CPU wheel (no torchvision, no CUDA packages) before facebce, whose
# torch>=2.1 range it already satisfies; everything else from PyPI. --no-compile: pip would
# byte-compile every installed module up front (85 s of a 3-minute install on 2 cores); Python
# compiles the ones a run imports, once, as it imports them.
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile torch==2.13.0
	$(BIN)/python -m pip install -q --no-compile -e '.[dev,serve,milvus]'
	touch $(STAMP)

# ruff (config in pyproject.toml) runs first: a finding fails the test run in seconds.
lint: install
	$(BIN)/ruff check .

# pytest exits 5 when it collects nothing, so an empty run fails here instead of passing.
test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow $(PYTEST_ARGS)

demo: install
	$(BIN)/python tools/demo.py --out $(DEMO)

# every benchmark beside its same-run baseline, one table (runs/bench/bench.md + bench.json); 2 cores: 7.5 min
# (Zen 4) to 49 min (Zen 2: no bf16 instructions, the bf16 training rows run emulated).
# BENCH_ARGS="--only data gallery" or "--quick" (a smoke run) to narrow it.
bench: install
	$(BIN)/python tools/bench/suite.py --out runs/bench $(BENCH_ARGS)

clean:
	rm -rf $(DEMO) build *.egg-info .pytest_cache
