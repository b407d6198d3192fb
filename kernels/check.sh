#!/usr/bin/env bash
# The GPU check in one call (issue 6): `moe kernels check` runs every kernel on the GPU against
# the CPU backend (fresh random inputs, poisoned outputs, ragged and zero-token expert loads),
# then times each one against cuBLAS bf16 GEMM and the device copy bandwidth, and writes the
# table to $OUT/check.md (or kernels/check.md). Exits non-zero when a kernel is wrong.
#
# Where cargo exists it builds the binary. The lent GPU machines have no Rust toolchain, so
# there it runs the binary carried in .dist/: build that here first with
#   kernels/check.sh --build-dist        (then carry ".dist" with the device run)
# and on the device:  bash kernels/check.sh            (about 1 to 3 minutes; --quick: seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--build-dist" ]]; then
    cargo build --release -p moe-cli
    mkdir -p .dist
    strip -o .dist/moe target/release/moe
    ls -la .dist/moe
    exit 0
fi
bin=.dist/moe
if [[ ! -x "$bin" ]]; then
    cargo build --release -p moe-cli
    bin=target/release/moe
fi
# NVRTC and cuBLAS: the CUDA toolkit's, or the pip wheels' (nvidia/cu13/lib, nvidia/*/lib).
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(python3 -c 'import nvidia, glob; print(" ".join(d for p in nvidia.__path__ for d in glob.glob(p + "/*/lib")))' 2>/dev/null); do
    [[ -d "$d" ]] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
out="${OUT:-kernels}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv 2>/dev/null || true
"$bin" --version
timeout 290 "$bin" kernels check --markdown "$out/check.md" "$@"
