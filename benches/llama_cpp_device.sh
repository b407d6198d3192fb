#!/usr/bin/env bash
# The llama.cpp comparison (benches/llama_cpp_compare.py) on a machine with no network and no
# Rust, such as a GPU host lent by the `device` tool, whose Xeon runs AVX-512 where the
# development machines do not (issue 38 asks for "this kind of machine").
#
#   here, once:      benches/llama_cpp_device.sh --prepare [WORK]
#                    (WORK: where llama_cpp_compare.py fetched the llama.cpp sources, default
#                    /tmp/llamacpp; builds llama-bench and llama-batched-bench for AVX-512 with
#                    BF16/VNNI/VBMI into WORK/.../build-avx512, or $LLAMA_BUILD, and copies what the run needs
#                    compressed into .llama/, which git ignores: carry ".llama" and ".dist")
#   on the device:   bash benches/llama_cpp_device.sh [ROUNDS] [THREADS]
#                    (writes comparison.json and comparison.log to $OUT; MOE_ARGS: extra
#                    arguments to `moe bench --core`, e.g. "--cpu-kernels avx512")
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--prepare" ]]; then
    work=${2:-/tmp/llamacpp}
    src=$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp | tail -1)
    build=${LLAMA_BUILD:-$src/build-avx512}
    cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF \
        -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \
        -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF > /dev/null
    cmake --build "$build" -j "$(nproc)" --target llama-bench llama-batched-bench > /dev/null
    rel=${src#"$work"/}
    rm -rf .llama
    mkdir -p ".llama/work/$rel/build/bin" .llama/lib
    strip -o ".llama/work/$rel/build/bin/llama-bench" "$build/bin/llama-bench"
    strip -o ".llama/work/$rel/build/bin/llama-batched-bench" "$build/bin/llama-batched-bench"
    cp -r "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" ".llama/work/$rel/"
    # OpenMP's runtime, which the static build still links dynamically.
    cp "$(gcc -print-file-name=libgomp.so.1)" .llama/lib/
    # Compressed: the device's working tree travels under 64 MiB with .dist beside it.
    tar cJf .llama.tar.xz -C .llama work lib
    rm -rf .llama
    mkdir .llama
    mv .llama.tar.xz .llama/bundle.tar.xz
    grep -qx '/.llama/' .git/info/exclude 2>/dev/null || echo '/.llama/' >> .git/info/exclude
    du -sh .llama
    exit 0
fi
rounds=${1:-3}
threads=${2:-2}
out=${OUT:-/tmp/llama-device}
mkdir -p "$out"
rm -rf /tmp/llama-bundle
mkdir -p /tmp/llama-bundle
tar xJf .llama/bundle.tar.xz -C /tmp/llama-bundle
work=/tmp/llama-bundle/work
export LD_LIBRARY_PATH=/tmp/llama-bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
grep -m1 "model name" /proc/cpuinfo | tee "$out/comparison.log"
PYTHONUNBUFFERED=1 python3 benches/llama_cpp_compare.py --moe .dist/moe --work "$work" --rounds "$rounds" \
    --threads "$threads" --moe-args "${MOE_ARGS:-}" --out "$out/comparison.json" 2>&1 | tee -a "$out/comparison.log"
