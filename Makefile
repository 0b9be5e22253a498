# Everything a fresh machine needs: `make test` and `make demo` create .venv and install on first use.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: test test-fast durations demo bench bench-peer fixtures install browser app clean

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q -e '.[app]'
	touch $(STAMP)

# The app's tests drive Debian's Chromium through its chromedriver (tests/test_app.py); installed when
# missing (CI runs as root with the package archive reachable; elsewhere through sudo).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

install: $(STAMP) browser

# Three workers on two cores: a third fills the gaps (checkpoint writes, CLI start-up) the other two leave.
TEST_WORKERS ?= 3
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
# Every tier: the unit tests, the learning experiments (marker `learning`) and the long ones (`slow`).
test: $(STAMP) browser
	$(PYTEST) $(PYTEST_ARGS)

# The fast tier, for development: no learning experiment, no long test (under 5 minutes on 2 cores).
test-fast: $(STAMP)
	$(PYTEST) -m "not learning and not slow" $(PYTEST_ARGS)

# `make test` that also records each file's seconds in tests/durations.json (commit it): the order in
# which the files start (tests/conftest.py).
durations: $(STAMP) browser
	$(PYTEST) --record-durations=tests/durations.json $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m launch.demo --workdir=$${WORKDIR:-runs/demo}

# The listening room (launch/app.py) on BUNDLE (default: the demo's, made by `make demo` when missing).
BUNDLE ?= runs/demo/bundle
app: $(STAMP)
	$(if $(filter runs/demo/bundle,$(BUNDLE)),test -f runs/demo/bundle/bundle.json || $(MAKE) demo)
	$(PY) -m launch.app $(addprefix --bundle=,$(BUNDLE)) $(APP_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# The PyTorch peer (benchmarks/peer.py): its own venv, never a dependency of melody-jax.
PEER_VENV := benchmarks/peers/.venv
PEER_STAMP := $(PEER_VENV)/.installed
PEER_PIP_ARGS ?= --retries 1

$(PEER_STAMP): benchmarks/peers/requirements.txt
	test -x $(PEER_VENV)/bin/python || python3 -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install -q $(PEER_PIP_ARGS) -r benchmarks/peers/requirements.txt
	touch $(PEER_STAMP)

bench-peer: $(PEER_STAMP) $(STAMP)
	$(PY) -m benchmarks.peer $(BENCH_ARGS)

# The converters' golden fixtures (tests/fixtures/hf/, committed; the tests need no torch): tiny
# random-weight transformers models and their outputs, made in the peer venv.
fixtures: $(PEER_STAMP)
	$(PEER_VENV)/bin/python benchmarks/peers/fixtures_musicgen.py --out tests/fixtures/hf
	$(PEER_VENV)/bin/python benchmarks/peers/fixtures_encodec.py --out tests/fixtures/hf
	$(PEER_VENV)/bin/python benchmarks/peers/fixtures_hubert.py --out tests/fixtures/hf

clean:
	rm -rf runs .pytest_cache
