// Grouped expert GEMM on tensor cores: for each expert e, the rows of slots
// [offsets[e], offsets[e+1]) (tokens already permuted into expert order) times that expert's
// weight W_e ([N, K], row-major as a Hugging Face Linear), bf16 inputs and f32 accumulation
// through mma.sync.m16n8k16 (sm_80 and later, so the H100/H200 too).
//
// Grid: (ceil(N / 64), ceil(max rows of one expert / 64), experts); block: 128 threads, four
// warps of 16 rows each; a warp holds a 16x64 tile as eight 16x8 accumulators. Experts with no
// rows (or fewer than the tile) return early or mask, so ragged loads and zero-token experts are
// fine. grouped_gemm_swiglu_bf16 computes the gate and up tiles together from the fused
// [gate | up] weight and writes silu(gate) * up as bf16, so the intermediate never goes to memory
// in f32.

#define TILE_M 64
#define TILE_N 64

// Two consecutive bf16 of row `row` at column `k` (zeros past K or past the valid rows).
__device__ __forceinline__ unsigned int load_pair(const bf16_t* base, long row, int k, int K, bool valid) {
    if (!valid || k >= K) return 0u;
    const bf16_t* p = base + row * (long)K + k;
    if (k + 1 < K && ((K & 1) == 0)) return *reinterpret_cast<const unsigned int*>(p);
    unsigned int lo = p[0], hi = (k + 1 < K) ? p[1] : 0;
    return lo | (hi << 16);
}

// Accumulates a warp's 16 x (8 * NT) tile: rows [r0, r0+16) of x (count valid rows), columns
// col0 + 8*t + (0..8) of w (n_valid columns).
template <int NT>
__device__ __forceinline__ void warp_tile(const bf16_t* x, long x_row0, int rows_valid, const bf16_t* w, int col0,
                                          int n_valid, int K, float (*acc)[4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bool r0_ok = g < rows_valid, r1_ok = g + 8 < rows_valid;
    for (int k0 = 0; k0 < K; k0 += 16) {
        unsigned int a0 = load_pair(x, x_row0 + g, k0 + 2 * t, K, r0_ok);
        unsigned int a1 = load_pair(x, x_row0 + g + 8, k0 + 2 * t, K, r1_ok);
        unsigned int a2 = load_pair(x, x_row0 + g, k0 + 2 * t + 8, K, r0_ok);
        unsigned int a3 = load_pair(x, x_row0 + g + 8, k0 + 2 * t + 8, K, r1_ok);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            int n = col0 + nt * 8 + g;
            bool n_ok = n < n_valid;
            unsigned int b0 = load_pair(w, n, k0 + 2 * t, K, n_ok);
            unsigned int b1 = load_pair(w, n, k0 + 2 * t + 8, K, n_ok);
            const unsigned int a[4] = {a0, a1, a2, a3};
            mma_bf16_16816(acc[nt], a, b0, b1);
        }
    }
}

// One expert's tile of the grouped GEMM, its weight `we` ([N, K]) already chosen.
__device__ __forceinline__ void grouped_tile(const bf16_t* __restrict__ x, const bf16_t* __restrict__ we,
                                             float* __restrict__ out, const int* __restrict__ offsets, int N, int K) {
    const int e = blockIdx.z;
    const int start = offsets[e], count = offsets[e + 1] - start;
    const int tile_row = blockIdx.y * TILE_M + (threadIdx.x >> 5) * 16;
    if (tile_row >= count) return;
    const int col0 = blockIdx.x * TILE_N;
    float acc[8][4] = {};
    warp_tile<8>(x, start + tile_row, count - tile_row, we, col0, N, K, acc);
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
        int c = col0 + nt * 8 + 2 * t;
        for (int half = 0; half < 2; ++half) {
            int r = tile_row + g + 8 * half;
            if (r >= count) continue;
            long o = (long)(start + r) * N;
            if (c < N) out[o + c] = acc[nt][2 * half];
            if (c + 1 < N) out[o + c + 1] = acc[nt][2 * half + 1];
        }
    }
}

// Every expert's weight in one [E][N][K] allocation.
extern "C" __global__ void grouped_gemm_bf16(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w,
                                             float* __restrict__ out, const int* __restrict__ offsets, int N,
                                             int K) {
    grouped_tile(x, w + (long)blockIdx.z * N * K, out, offsets, N, K);
}

// Each expert's weight where it is (w_ptrs[e]: the address of an [N, K] bf16 matrix), as the
// backend holds them.
extern "C" __global__ void grouped_gemm_ptrs_bf16(const bf16_t* __restrict__ x,
                                                  const unsigned long long* __restrict__ w_ptrs,
                                                  float* __restrict__ out, const int* __restrict__ offsets, int N,
                                                  int K) {
    grouped_tile(x, reinterpret_cast<const bf16_t*>(w_ptrs[blockIdx.z]), out, offsets, N, K);
}

// w_gate_up is [E][2I][K] (gate rows, then up rows); hidden is [slots][I] bf16.
extern "C" __global__ void grouped_gemm_swiglu_bf16(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w_gate_up,
                                                    bf16_t* __restrict__ hidden, const int* __restrict__ offsets,
                                                    int inter, int K) {
    const int e = blockIdx.z;
    const int start = offsets[e], count = offsets[e + 1] - start;
    const int tile_row = blockIdx.y * TILE_M + (threadIdx.x >> 5) * 16;
    if (tile_row >= count) return;
    const int col0 = blockIdx.x * TILE_N;
    const bf16_t* gate = w_gate_up + (long)e * 2 * inter * K;
    const bf16_t* up = gate + (long)inter * K;
    float g_acc[8][4] = {}, u_acc[8][4] = {};
    warp_tile<8>(x, start + tile_row, count - tile_row, gate, col0, inter, K, g_acc);
    warp_tile<8>(x, start + tile_row, count - tile_row, up, col0, inter, K, u_acc);
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
        int c = col0 + nt * 8 + 2 * t;
        for (int half = 0; half < 2; ++half) {
            int r = tile_row + g + 8 * half;
            if (r >= count) continue;
            long o = (long)(start + r) * inter;
            for (int j = 0; j < 2; ++j) {
                if (c + j < inter) hidden[o + c + j] = f32_to_bf16(silu(g_acc[nt][2 * half + j]) * u_acc[nt][2 * half + j]);
            }
        }
    }
}
