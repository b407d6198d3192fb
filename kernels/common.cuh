// Helpers shared by every kernel. The compute crate prepends this file to each kernel source
// (followed by a #line directive, so compile errors name the kernel file and line). No CUDA
// headers are needed: bf16 is handled as raw 16-bit patterns (the top half of an f32).
typedef unsigned short bf16_t;

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float bf16_to_f32(bf16_t v) { return __uint_as_float(((unsigned int)v) << 16); }

// Round to nearest even, as torch does.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of up to 1024 threads; every thread gets the result. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? scratch[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? scratch[threadIdx.x] : -INFINITY;
    if (warp == 0) v = warp_max(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

// The canonical exp and sigmoid (crates/moe-compute/src/gpu_plan/numerics.rs): IEEE-rounded
// operations only, written with intrinsics the compiler never contracts into other operations,
// so the host and the device compute the same bits. The constants are checked against the Rust
// ones by a test (kernels.rs).
#define EXP_C_LOG2E 1.44269504088896341f
#define EXP_C_LN2_HI 0.693359375f
#define EXP_C_LN2_LO -2.1219444e-4f
#define EXP_C_P0 1.9875691e-4f
#define EXP_C_P1 1.3982e-3f
#define EXP_C_P2 8.333452e-3f
#define EXP_C_P3 4.1665796e-2f
#define EXP_C_P4 0.16666665f
#define EXP_C_P5 0.5f
#define EXP_C_MAX 88.72284f
#define EXP_C_MIN -103.97208f

__device__ __forceinline__ float pow2_exact(int i) { return __int_as_float((i + 127) << 23); }

__device__ __forceinline__ float exp_canonical(float x) {
    if (x != x) return x;
    if (x > EXP_C_MAX) return INFINITY;
    if (x < EXP_C_MIN) return 0.0f;
    const float n = rintf(__fmul_rn(x, EXP_C_LOG2E));
    float r = fmaf(n, -EXP_C_LN2_HI, x);
    r = fmaf(n, -EXP_C_LN2_LO, r);
    float p = EXP_C_P0;
    p = fmaf(p, r, EXP_C_P1);
    p = fmaf(p, r, EXP_C_P2);
    p = fmaf(p, r, EXP_C_P3);
    p = fmaf(p, r, EXP_C_P4);
    p = fmaf(p, r, EXP_C_P5);
    const float y = __fadd_rn(fmaf(p, __fmul_rn(r, r), r), 1.0f);
    const int ni = (int)n;
    if (ni > 127) return __fmul_rn(__fmul_rn(y, pow2_exact(127)), pow2_exact(ni - 127));
    if (ni < -126) return __fmul_rn(__fmul_rn(y, pow2_exact(-126)), pow2_exact(ni + 126));
    return __fmul_rn(y, pow2_exact(ni));
}

__device__ __forceinline__ float sigmoid_canonical(float x) {
    return __fdiv_rn(1.0f, __fadd_rn(1.0f, exp_canonical(-x)));
}

// A gate logit as routing reads it: NaN counts as -inf, +inf as the largest float.
__device__ __forceinline__ float gate_logit(float x) {
    if (x != x) return -INFINITY;
    if (x == INFINITY) return 3.40282347e38f;
    return x;
}

// Shared-memory address of a generic pointer (for cp.async and ldmatrix).
__device__ __forceinline__ unsigned int smem_addr(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned int)a;
}

// 16 bytes global -> shared without registers; `bytes` 0 zero-fills (rows or columns past the end).
__device__ __forceinline__ void cp_async16(unsigned int dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Tensor cores (sm_80+): mma.sync.m16n8k16 with bf16 inputs and f32 accumulators (A row-major in
// four registers, B column-major in two, C in four, per the PTX fragment layouts), and ldmatrix
// of four 8x8 bf16 matrices from shared memory (`_trans`: each matrix transposed).
__device__ __forceinline__ void mma_bf16_16816(float* c, const unsigned int* a, unsigned int b0, unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned int addr, unsigned int* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned int addr, unsigned int* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// The n-th (0-based) uniform in [0, 1) of SplitMix64 seeded with `seed` (gpu_plan::draws::nth_unit):
// the state after n draws is seed + (n + 1) * gamma, so no history is needed.
__device__ __forceinline__ float splitmix64_nth_unit(unsigned long long seed, unsigned long long n) {
    unsigned long long z = seed + 0x9E3779B97F4A7C15ull * (n + 1ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return __fdiv_rn((float)(z >> 40), 16777216.0f);
}
