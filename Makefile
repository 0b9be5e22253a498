# Everything a fresh machine needs: `make test` and `make demo` create .venv and install on first use.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: test demo bench install clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m launch.demo --workdir=$${WORKDIR:-runs/demo}

bench: $(STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf runs .pytest_cache
