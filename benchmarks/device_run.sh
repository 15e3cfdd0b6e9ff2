#!/usr/bin/env bash
# One full GPU session: set up on a bare CUDA machine, run the GPU tests and the GPU benchmarks,
# and leave logs and results JSON under $OUT (default ./.out). Wheels for packages the CUDA image
# lacks travel in .whl/; bubblewrap travels as a .deb in .debs/ (unpacked under /tmp, not /).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/kda . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/kda:${PYTHONPATH:-}
if ! command -v bwrap >/dev/null && ls .debs/bubblewrap_*.deb >/dev/null 2>&1; then
  dpkg -x .debs/bubblewrap_*.deb /tmp/bwrap && export PATH=/tmp/bwrap/usr/bin:$PATH
fi
# shared/ does not travel beside the checkout: a copy rides in .shared/ (ignored by git).
[ -d .shared ] && export KDA_SHARED_DIR=$PWD/.shared && FIDELITY_ARGS="--dataset $PWD/.shared/fixtures/flashinfer-trace ${FIDELITY_ARGS:-}"
for d in /opt/nvidia/nsight-compute/*/; do [ -x "$d/ncu" ] && export PATH=$d:$PATH; done
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('triton', triton.__version__)"
  nvcc --version | tail -1; ncu --version | tail -1
  bwrap --version && bwrap --ro-bind / / --dev /dev --proc /proc --unshare-all --die-with-parent true && echo "bwrap works"
} 2>&1 | tee "$OUT/env.txt"
STEPS=${STEPS-"gputests benchtests"}  # set but empty: set-up only
TIMING_STATE_ARGS=${TIMING_STATE_ARGS:-}

NOWIKI="--ignore=tests/test_wiki_schema.py --ignore=tests/test_wiki_search.py --ignore=tests/wiki_eval"
for step in $STEPS; do
  echo "=== $step"
  case $step in
    gputests) timeout ${GPUTESTS_TIMEOUT:-360} python3 -m pytest -q -rs -m gpu -p no:cacheprovider $NOWIKI tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 ;;
    benchtests) timeout ${BENCHTESTS_TIMEOUT:-330} python3 -m pytest -q -rf -p no:cacheprovider ${BENCHTESTS_FILES:-tests/test_bench.py tests/adversarial} 2>&1 | tee "$OUT/bench_tests.log" | tail -30 ;;
    attacks) timeout 240 python3 -m pytest -q -vv -p no:cacheprovider tests/test_bench_gpu.py tests/adversarial tests/test_exchange_and_trace.py -k "${ATTACKS:-torch_fallback or gpu_attack or rmsnorm_on_all}" 2>&1 | tee "$OUT/attack_tests.log" | tail -15 ;;
    alltests) timeout 500 python3 -m pytest -q -p no:cacheprovider $NOWIKI tests 2>&1 | tee "$OUT/all_tests.log" | tail -40 ;;
    fidelity) timeout ${FIDELITY_TIMEOUT:-420} python3 benchmarks/fidelity.py --out "$OUT" $FIDELITY_ARGS 2>&1 | tee "$OUT/fidelity.log" | tail -40 ;;
    profile) timeout 240 python3 benchmarks/profile.py --repeats 3 --device-repeats 3 2>&1 | tee "$OUT/profile.log" | tail -30 ;;
    timing_state) timeout ${TIMING_STATE_TIMEOUT:-300} python3 benchmarks/timing_state.py --out "$OUT" --dataset "$PWD/.shared/fixtures/flashinfer-trace" $TIMING_STATE_ARGS 2>&1 | tee "$OUT/timing_state.log" | tail -30 ;;
    ncu_residue) timeout ${NCU_RESIDUE_TIMEOUT:-300} python3 benchmarks/ncu_residue.py --out "$OUT" --dataset "$PWD/.shared/fixtures/flashinfer-trace" ${NCU_RESIDUE_ARGS:-} 2>&1 | tee "$OUT/ncu_residue.log" | tail -30 ;;
    compile) timeout 120 python3 benchmarks/compile.py --out "$OUT/compile.json" 2>&1 | tee "$OUT/compile.log" | tail -20 ;;
  esac
done
