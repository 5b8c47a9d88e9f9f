# The two commands of the README: `make demo` and `make test`. Each creates the virtual
# environment on first use (torch is large: the first run takes a few minutes to install).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.panning-installed
DEMO_AGENT := runs/demo/agent
PYTEST_ARGS ?=

.PHONY: demo test test-all bench-indices clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# The main job: train the default agent on digits (about 12 min on 2 cores), then prune + fully train
# with it and with every fixed method at 99% sparsity and print the table. Rerunning resumes both
# halves: the agent from its last checkpoint, the sweep without recomputing finished cells.
demo: $(STAMP)
	@if [ -f $(DEMO_AGENT)/agent.yaml ]; then \
		$(VENV)/bin/panning train-agent --resume $(DEMO_AGENT); \
	else \
		$(VENV)/bin/panning train-agent --config configs/agent/digits_mlp.yaml --out $(DEMO_AGENT); \
	fi
	$(VENV)/bin/panning benchmark --config configs/bench/demo.yaml --out runs/demo/bench

# The default run: everything but tests marked slow. CI runs this.
# pytest exits 5 when it selected no test: say so, rather than let an empty run look like a pass.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench-indices: $(STAMP)
	$(PY) benchmarks/bench_indices.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
