# Two commands matter: `make demo` and `make test`. Each bootstraps .venv by itself
# from requirements.lock (exact pins of everything, runtime and tools).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean chaos redis fuzz

# The relay cluster's tests (and its benchmark row) start their own redis-server on
# loopback: Debian's package, installed where it is missing (CI runs as root).
redis:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/p2p demo

install: $(STAMP)  # .venv with the exact versions of requirements.lock, p2p in it

lint: $(STAMP)
	$(BIN)/ruff check p2p tests bench demos
	$(BIN)/ruff format --check p2p tests bench demos

typecheck: $(STAMP)
	$(BIN)/mypy

# The property modules run twice: with fresh random examples (the default profile, in
# the full run) and with the derandomized examples of every earlier run (replay).
PROPERTIES := tests/test_wire.py tests/test_relay_protocol.py tests/test_yupdate.py \
	tests/test_fuzz_inputs.py tests/test_index.py tests/test_convergence.py tests/test_chaos_sync.py

unit: $(STAMP) redis
	$(BIN)/pytest -q
	$(BIN)/pytest -q --hypothesis-profile=replay -m property $(PROPERTIES)

test: lint typecheck unit

# The fast tests on other Pythons (pyenv's, or pythonX.Y on PATH), each in .venv-X.Y from
# requirements.lock. Warnings fail the suite there too (3.13 warns about an SQLite
# connection left to the garbage collector: close every one).
COMPAT_PYTHONS ?= 3.12 3.13
compat:
	set -e; for v in $(COMPAT_PYTHONS); do \
	  py=$$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$$v*/bin/python 2>/dev/null | tail -1); \
	  py=$${py:-$$(command -v python$$v)}; \
	  test -n "$$py" || { echo "no Python $$v"; exit 1; }; \
	  test -x .venv-$$v/bin/python || $$py -m venv .venv-$$v; \
	  .venv-$$v/bin/python -m pip install --quiet -r requirements.lock; \
	  .venv-$$v/bin/python -m pip install --quiet --no-deps -e .; \
	  .venv-$$v/bin/python -m pytest -q -m "not slow and not chaos"; \
	done

# The long chaos and adversarial runs (issue 8; docs/reliability.md): many seeds, kills
# and inputs. Figures go to $(CHAOS_REPORT), one JSON line per run, summed up at the end.
CHAOS_REPORT ?= $(VENV)/chaos-figures.jsonl

chaos: $(STAMP) redis
	rm -f $(CHAOS_REPORT)
	FUZZ_SECONDS=$(FUZZ_SECONDS) P2P_CHAOS=1 P2P_CHAOS_REPORT=$(abspath $(CHAOS_REPORT)) \
	$(BIN)/pytest -q -m chaos tests; \
	status=$$?; $(BIN)/python tests/chaos.py summary $(CHAOS_REPORT); exit $$status

# Coverage-guided fuzzing (atheris) of every parser of outside bytes, FUZZ_SECONDS each
# (tests/fuzz/run.py; crashes land in tests/fuzz/crashes/, replayed by make test).
# make chaos runs the same through tests/test_fuzz_regressions.py.
FUZZ_SECONDS ?= 60

fuzz: $(STAMP)
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python tests/fuzz/run.py

# `make bench` (BENCH_ARGS="--quick" for a smoke run): p2p against pycrdt-websocket and
# y-websocket, tables + plots in bench/out/ (see docs/performance.md). Its own venv,
# .venv-bench (requirements.lock + bench/requirements.txt), and bench/node_modules
# (bench/package-lock.json) are bootstrapped on first use.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
NODE_STAMP := bench/node_modules/.installed

$(BENCH_STAMP): requirements.lock bench/requirements.txt pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -r requirements.lock -r bench/requirements.txt
	$(BENCH_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(BENCH_STAMP)

$(NODE_STAMP): bench/package.json bench/package-lock.json
	cd bench && npm ci --no-audit --no-fund --ignore-scripts
	touch $(NODE_STAMP)

bench: $(BENCH_STAMP) $(NODE_STAMP) redis
	$(BENCH_VENV)/bin/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
