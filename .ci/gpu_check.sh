#!/usr/bin/env bash
# `make gpu-check`: the CUDA tests, then the GPU rows of benchmarks/bench_batched.py, each figure with the
# device's name. Results go to $OUT when it is set (the lent device machine copies that folder back), else
# to benchmarks/results/: gpu_device.txt, gpu_tests.log, gpu_batched.json (rewritten after every row) and
# gpu_batched.md.
#
# Python, in this order: the project's .venv; else the bundle `make gpu-bundle` prepared in .gpu/ for a GPU
# machine without network (wheels of what its image lacks, installed beside its own torch, plus the MNIST
# files); else `make` sets up .venv (needs the network).
#
# A failing test does not stop the benchmark (both are the point of a short GPU lease); the exit status is
# the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
dest="${OUT:-benchmarks/results}"
mkdir -p "$dest"

if [ -x .venv/bin/python ]; then
    py=.venv/bin/python
elif [ -d .gpu/whl ]; then
    site=/tmp/panning-site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .gpu/whl/*.whl \
        || { echo "gpu_check: installing the wheels of .gpu/whl failed" >&2; exit 1; }
    # the project itself into the same folder, in its installed layout (envs/ and agents/ under panning/)
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
        --target "$site" . || { echo "gpu_check: installing the project failed" >&2; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    py=python3
else
    make .venv/.panning-installed || exit 1
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
# -P: the repository root stays off sys.path, so the tests import the installed package (as `make test` does)
"$py" -P -m pytest -q -rs -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$dest/gpu_tests.log" || rc=$?
"$py" benchmarks/bench_batched.py --device cuda --n 1,8,32,64,128 --episodes 32 --warmup 0 \
    --json "$dest/gpu_batched.json" 2>&1 | tee "$dest/gpu_batched.md" || { s=$?; [ "$rc" -ne 0 ] || rc=$s; }
# the proxy's sparse route (cuSPARSE) at the agent's sparsity, against the dense one-at-a-time proxy
"$py" benchmarks/bench_batched.py --device cuda --model lenet300 --dataset mnist --sparse --sparsity 0.99 \
    --skip-episodes --n 1,8,32,64,128 --json "$dest/gpu_batched_sparse.json" 2>&1 \
    | tee "$dest/gpu_batched_sparse.md" || { s=$?; [ "$rc" -ne 0 ] || rc=$s; }
exit "$rc"
