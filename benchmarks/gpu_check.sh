#!/usr/bin/env bash
# GPU check of the MoE kernels: install MegaBlocks' kernels next to the installed torch, run the kernel tests on the
# GPU, then the GPU MoE-layer benchmark. Run from the repository root on a CUDA machine:
#
#     bash benchmarks/gpu_check.sh                 # installs from PyPI
#     SDIST_DIR=.whl bash benchmarks/gpu_check.sh  # offline: grouped_gemm / megablocks / stanford-stk sdists there
#
# Logs go to $OUT (default ./gpu_check_out). Packages are installed with --target into $SITE (default
# /tmp/mb-site) so the environment's torch is never replaced by MegaBlocks' torch==2.7.0 pin.
set -u
OUT=${OUT:-./gpu_check_out}
SITE=${SITE:-/tmp/mb-site}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$SITE"
export PYTHONUNBUFFERED=1
# Build for the GPU in this machine only (Hopper: 9.0), with all cores.
CAP=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP} MAX_JOBS=${MAX_JOBS:-$(nproc)}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'capability', torch.cuda.get_device_capability())"
  nvcc --version | tail -1
} 2>&1 | tee "$OUT/env.txt"

pkg() {  # pkg NAME: a local sdist when SDIST_DIR is set, else the PyPI name
  if [ -n "${SDIST_DIR:-}" ]; then ls "$SDIST_DIR"/"$1"-*.tar.gz; else echo "$1"; fi
}
install() {  # install NAME...: no build isolation (build against this torch), no dependencies (no torch pin)
  local index=()
  [ -n "${SDIST_DIR:-}" ] && index=(--no-index)
  $PY -m pip install -q --no-build-isolation --no-deps "${index[@]}" --target "$SITE" "$@"
}

start=$SECONDS
(time install "$(pkg grouped_gemm)") >"$OUT/build_grouped_gemm.log" 2>&1 &
gg=$!
megablocks_src() {  # MegaBlocks 0.10.0's csrc/cumsum.h passes CUB's removed debug_synchronous argument (CUDA 13's
  # CCCL rejects it): unpack the sdist and drop that argument before building.
  local src=/tmp/megablocks-src
  rm -rf "$src" && mkdir -p "$src"
  if [ -n "${SDIST_DIR:-}" ]; then tar xzf "$(pkg megablocks)" -C "$src"
  else $PY -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$src" megablocks==0.10.0 &&
    tar xzf "$src"/megablocks-*.tar.gz -C "$src"; fi
  local dir; dir=$(ls -d "$src"/megablocks-*/)
  perl -0pi -e 's/stream,\s*debug_synchronous\)\)/stream))/g' "$dir/csrc/cumsum.h"
  echo "$dir"
}
(time install "$(megablocks_src)" "$(pkg stanford_stk)") >"$OUT/build_megablocks.log" 2>&1 &
mb=$!
[ -n "${BENCH_ONLY:-}" ] && kill $mb 2>/dev/null
wait $gg; echo "grouped_gemm install: rc=$? after $((SECONDS - start)) s" | tee -a "$OUT/env.txt"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import grouped_gemm.ops as g; print('grouped_gemm OK', g.gmm)" 2>&1 | tail -3 | tee -a "$OUT/env.txt"

set -o pipefail
[ -z "${BENCH_ONLY:-}" ] && $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_moe_block_parity.py 2>&1 | tee "$OUT/pytest.txt" | tail -25
$PY -m benchmarks.moe_layer_gpu ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"

wait $mb; echo "megablocks install: rc=$? after $((SECONDS - start)) s" | tee -a "$OUT/env.txt"
$PY - <<'EOF' 2>&1 | tail -5 | tee -a "$OUT/env.txt"
import torch
import megablocks  # noqa: F401
from megablocks.layers.arguments import Arguments
from megablocks.layers.dmoe import dMoE

args = Arguments(hidden_size=256, ffn_hidden_size=512, moe_num_experts=8, moe_top_k=2, mlp_impl="grouped",
                 mlp_type="glu", bf16=True, fp16=False, device=torch.device("cuda"))
layer = dMoE(args)
x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
out = layer(x)
y = out[0] if isinstance(out, tuple) else out
y.float().sum().backward()
print("megablocks dMoE OK", tuple(y.shape), "grad", float(x.grad.float().norm()))
EOF
echo "total $((SECONDS - start)) s"
