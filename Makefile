# The two commands of the README: `make demo` and `make test`. Each creates the virtual
# environment on first use (torch is large: the first run takes a few minutes to install).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.panning-installed
DEMO_AGENT := runs/demo/agent
PYTEST_ARGS ?=

.PHONY: demo test test-all lint typecheck imports layout mutation gpu-check gpu-bundle bench-indices clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,ray]'
	touch $(STAMP)

# The main job: prune digits' MLP to 99% and 99.5% with the shipped default agent and with the fixed methods, fully train
# each over 3 seeds and print the table (about 2 min on 2 cores). `make demo RETRAIN=1` first trains the agent
# as the shipped one was (configs/agent/default_layer_actions_lowstd.yaml, PPO seed 2) and compares that one instead.
# Rerunning resumes: the agent from its last checkpoint, the sweep without recomputing finished cells.
RETRAIN ?= 0
DEMO_AGENT_CONFIG := configs/agent/default_layer_actions_lowstd.yaml
DEMO_AGENT_SEED := 2

demo: $(STAMP)
ifeq ($(RETRAIN),1)
	@if [ -f $(DEMO_AGENT)/agent.yaml ]; then \
		$(VENV)/bin/panning train-agent --resume $(DEMO_AGENT); \
	else \
		$(VENV)/bin/panning train-agent --config $(DEMO_AGENT_CONFIG) --seed $(DEMO_AGENT_SEED) --out $(DEMO_AGENT); \
	fi
	$(VENV)/bin/panning benchmark --config configs/bench/demo_retrained.yaml --out runs/demo/retrained
else
	$(VENV)/bin/panning benchmark --config configs/bench/demo.yaml --out runs/demo/shipped
endif

# The default run: lint, types and the import contract first, then every test not marked slow. CI runs this.
# pytest exits 5 when it selected no test: say so, rather than let an empty run look like a pass. The pytest
# script (not `python -m pytest`) keeps the repository root off sys.path: tests import the installed package.
# The tests are the CPU's (their bit-for-bit expectations, `device: auto` in configs): on a GPU machine they still
# run on the CPU (no visible GPU), and `make gpu-check` runs the CUDA tests.
CPU_ONLY := CUDA_VISIBLE_DEVICES=
test: lint typecheck imports
	$(CPU_ONLY) $(VENV)/bin/pytest -q -m "not slow" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check panning envs agents tests benchmarks

# mypy and the import contract read the installed layout (envs/ and agents/ become panning.envs and
# panning.agents there), built fresh from the working tree into build/layout; errors name the source files.
LAYOUT := build/layout

layout: $(STAMP)
	rm -rf $(LAYOUT) build/lib build/bdist.*
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation --no-compile \
		--target $(LAYOUT) . 2>&1 | grep -v "^WARNING: Location" || true
	test -f $(LAYOUT)/panning/envs/panning_env.py

typecheck: layout
	cd $(LAYOUT) && ../../$(VENV)/bin/mypy -p panning --config-file ../../pyproject.toml \
		| sed -e 's#^panning/envs/#envs/#' -e 's#^panning/agents/#agents/#'; exit $${PIPESTATUS[0]}

imports: layout
	cd build && PYTHONPATH=$(CURDIR)/$(LAYOUT) $(CURDIR)/$(VENV)/bin/lint-imports $(CURDIR)/pyproject.toml --no-cache

test-all: $(STAMP)
	$(CPU_ONLY) $(VENV)/bin/pytest -q $(PYTEST_ARGS)

# Mutation testing of the core modules (configured in pyproject.toml, [tool.mutmut]); not part of `make test`.
# Resumable: a rerun only tests mutants of functions that changed. Prints the score per module.
mutation: $(STAMP)
	$(VENV)/bin/mutmut run --max-children 2 || true
	$(PY) benchmarks/mutation_score.py

# On a machine with a GPU: the CUDA tests, then the GPU rows of the batched benchmark, with the device's name,
# into benchmarks/results/gpu_* (or $OUT where set). Each stage has its own time limit, under 8 minutes in all (how long
# the stages take on a GPU is not measured yet).
gpu-check:
	bash .ci/gpu_check.sh

# For a GPU machine without network whose image has torch but not the rest: .gpu/ (git-ignored) gets the wheels
# of the packages it lacks and the MNIST files. Carry .gpu there and run `bash .ci/gpu_check.sh`.
GPU_WHEELS := gymnasium farama-notifications stable-baselines3
DATA ?= $(or $(PANNING_DATA),../shared/data)
gpu-bundle: $(STAMP)
	rm -rf .gpu && mkdir -p .gpu/whl .gpu/data/MNIST/raw
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux2014_x86_64 -d .gpu/whl \
		$$($(PY) -c "import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in '$(GPU_WHEELS)'.split()))")
	cp $(DATA)/MNIST/raw/*.gz .gpu/data/MNIST/raw/
	du -sh .gpu

bench-indices: $(STAMP)
	$(PY) benchmarks/bench_indices.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis mutants build
