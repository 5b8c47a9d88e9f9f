#!/usr/bin/env bash
# `make gpu-check`: the CUDA tests, then the GPU rows of benchmarks/bench_batched.py, each figure with the
# device's name. Results go to $OUT when it is set (the lent device machine copies that folder back, at most
# 8 files), else to benchmarks/results/: gpu_device.txt, gpu_tests.log, gpu_batched.log (every stage's output)
# and gpu_batched.json (every stage's rows so far, each with its stage's name, merged again after each stage).
#
# A lease is short (15 minutes of device time a session, 10 a command), so each stage runs under its own time
# limit, the issue's GPU targets (proxy at N = 64, lenet300/mnist and resnet20) first, and what a stage measured
# before its limit is kept. The limits add up to under 8 minutes (470 s); the stages should end well inside them.
#
# Python, in this order: the bundle `make gpu-bundle` prepared in .gpu/ for a GPU machine without network (wheels
# of what its image lacks, installed beside its own torch, plus the MNIST files); else the project's .venv once
# `make` has finished installing it (its stamp); else `make` sets up .venv (needs the network).
#
# A failing stage does not stop the others (all of them are the point of a short lease); the exit status is
# the first failure's (124: a stage reached its time limit).
set -uo pipefail
cd "$(dirname "$0")/.."
dest="${OUT:-benchmarks/results}"
mkdir -p "$dest"

if [ -d .gpu/whl ]; then
    site=/tmp/panning-site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .gpu/whl/*.whl || { echo "gpu_check: installing the wheels of .gpu/whl failed" >&2; exit 1; }
    # the project itself into the same folder, in its installed layout (envs/ and agents/ under panning/)
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
        --target "$site" . || { echo "gpu_check: installing the project failed" >&2; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    py=python3
elif [ -f .venv/.panning-installed ]; then
    py=.venv/bin/python
else
    make .venv/.panning-installed || { echo "gpu_check: no .gpu bundle and no .venv could be set up" >&2; exit 1; }
    py=.venv/bin/python
fi
if [ -z "${PANNING_DATA:-}" ] && [ -d .gpu/data/MNIST/raw ]; then
    export PANNING_DATA="$PWD/.gpu/data"
fi
export PYTHONUNBUFFERED=1

"$py" -c "import torch; assert torch.cuda.is_available(), 'make gpu-check needs a CUDA GPU'; \
print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)" \
    | tee "$dest/gpu_device.txt" || exit 1

rc=0
stages=$(mktemp -d)
log="$dest/gpu_batched.log"
: > "$log"

# stage NAME SECONDS ARGS...: one bench_batched.py run on the GPU under a time limit, its rows merged into
# gpu_batched.json (each row with its stage's name)
stage() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): bench_batched.py --device cuda $*" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$py" benchmarks/bench_batched.py --device cuda "$@" \
        --json "$stages/$name.json" 2>&1 | tee -a "$log"
    local s=${PIPESTATUS[0]}
    [ "$s" -eq 0 ] || { echo "== $name ended with status $s" | tee -a "$log"; [ "$rc" -ne 0 ] || rc=$s; }
    "$py" - "$stages" "$dest/gpu_batched.json" <<'EOF'
import json, pathlib, sys
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json"), key=lambda p: p.stat().st_mtime):
    rows += [{**r, "stage": f.stem} for r in json.loads(f.read_text())]
pathlib.Path(sys.argv[2]).write_text(json.dumps(rows, indent=2) + "\n")
EOF
}

# -P: the repository root stays off sys.path, so the tests import the installed package (as `make test` does)
timeout --kill-after=10 110 "$py" -P -m pytest -q -rs -s -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 \
    | tee "$dest/gpu_tests.log" || rc=$?
# the issue's targets first: proxy >= 10x at N = 64 over one at a time, lenet300/mnist and resnet20 (the
# one-at-a-time side timed on 16 candidates: each runs alone, so its rate does not depend on N)
stage target_lenet300 60 --model lenet300 --dataset mnist --skip-episodes --n 1,8,64 --sequential-at-most 16
stage target_resnet20 75 --model resnet20 --dataset cifar_random --skip-episodes --n 1,8,64 --sequential-at-most 16
# the remaining proxy rows the issue names (N = 1, 8, 32 and 128 on a GPU)
stage proxy_rows 75 --skip-episodes --n 1,8,32,128 --sequential-at-most 16
# whole episodes per second, the vectorised env against two SubprocVecEnv workers (a stage's rows come at its
# end: a stage cut off by its limit leaves none)
stage episodes_mlp 60 --model mlp --dataset digits --skip-proxy --n 64 --episodes 32 --warmup 32
stage episodes_lenet300 60 --model lenet300 --dataset mnist --skip-proxy --n 32 --episodes 32 --warmup 0
# the proxy's sparse route (cuSPARSE) at the agent's sparsity, against the dense one-at-a-time proxy
stage sparse_lenet300 30 --model lenet300 --dataset mnist --sparse --sparsity 0.99 --skip-episodes --n 1,64 \
    --sequential-at-most 16
rm -rf "$stages"
exit "$rc"
